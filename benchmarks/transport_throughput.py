"""Adapter transfer throughput: dpeft's gRPC path vs a raw TCP socket on loopback.

Download: the coordinator publishes a payload (``GrpcCoordinatorTransport.publish_blob``, which
takes its chunk CRC-32Cs once, untimed, as a round's global is published once for all workers)
and a worker fetches it (``GrpcWorkerConnection.fetch``: chunked stream, offset checks, a CRC-32C
per chunk and the whole payload's CRC-32C combined from them) into its download buffer, which
it reuses round after round as a worker does (the first download of each size goes into a fresh
buffer and is reported apart). Upload: the worker pushes its own payload
(``GrpcWorkerConnection.push``: one CRC-32C pass, then chunks serialized straight from the
payload) and the coordinator checks each chunk's CRC-32C and the combined whole-payload CRC
and feeds it through the schema-checking ``StateDecoder`` into a tensor state, then
acknowledges it. Both are timed on the worker side, from the call to the bytes being usable on
the other side. The baseline is a raw TCP socket (``sendall`` of a memoryview, ``recv_into`` a
preallocated buffer): the loopback ceiling for a Python process.

``--mode process`` (how the transport runs): the coordinator end of every path lives in a
process of its own (``transport_ends.py``), the worker end in this one; ``--mode threads``: both
ends are threads of this process and share one GIL (the socket's ``sendall``/``recv_into`` let
go of it, most of grpcio's Python-side work does not); ``--mode both`` (default) writes one
table for each. Each size is measured ``--repeats`` times; the best time of each side is
compared. CPU time of both ends per MiB is reported too: on a loaded machine it is the steadier
measure of what each path costs, and so is each process's peak RSS. A third side, grpcio alone
(ready-made messages streamed each way, nothing done with them), gives the ceiling of any
protocol built on grpcio's Python API in the same conditions.

    python benchmarks/transport_throughput.py [--sizes 8,64,512,2560] [--repeats 3] [--chunk-mib 4]
        [--mode both|process|threads] [--spool-mib N] [--no-write] [--glibc-defaults]

Both ends run with the glibc malloc settings the ``dpeft`` coordinator and worker commands
start with (the script starts itself again with them), unless ``--glibc-defaults``.

Sizes are MiB; a size runs only when enough memory is free (about 4.5x the payload between
coordinator, worker and the decoded copy) and is reported as skipped otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import crc32c

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results import machine_note, write_section  # noqa: E402
from transport_ends import (  # noqa: E402
    BareClient,
    CoordinatorEnd,
    RemoteEnd,
    cpu_s,
    peak_rss_mib,
    raw_tcp_remote,
    tcp_payload,
    tcp_receiver,
    tensor_payload,
)

MiB = 1 << 20


def raw_tcp(size: int) -> tuple[float, float]:
    """(seconds, CPU seconds) to move ``size`` bytes over a loopback TCP socket (thread to thread)."""
    payload = tcp_payload(size)
    port, th = tcp_receiver(size, ack=False)
    cli = socket.create_connection(("127.0.0.1", port))
    c0, t0 = cpu_s(), time.perf_counter()
    cli.sendall(payload)
    th.join()
    dt, dc = time.perf_counter() - t0, cpu_s() - c0
    cli.close()
    return dt, dc


class LocalEnd:
    """The coordinator end in this process (``--mode threads``): the same commands as
    :class:`~transport_ends.RemoteEnd`, called directly."""

    def __init__(self, chunk_bytes: int, max_bytes: int, spool_bytes: int | None) -> None:
        self.end = CoordinatorEnd(chunk_bytes, max_bytes, spool_bytes)
        self.address, self.bare_port = self.end.addresses()

    def __call__(self, name: str, *args: Any) -> Any:
        return getattr(self.end, name)(*args)

    def close(self) -> None:
        self.end.close()


def grpc_round(end: Any, conn: Any, upload: bytes, size: int, tag: str, remote: bool) -> tuple[float, float, float, float]:
    """(download s, upload s, download CPU s, upload CPU s) for ``size`` bytes through dpeft's gRPC
    path; CPU is both processes' in process mode (the coordinator end's is this process's otherwise)."""
    from dpeft.transport.base import TrainTask

    end("publish", size, tag)
    got = conn.poll()
    while not isinstance(got, TrainTask):
        got = conn.poll()
    other = (lambda: end("cpu")) if remote else (lambda: 0.0)
    o0, c0, t0 = other(), cpu_s(), time.perf_counter()
    data = conn.fetch(got)
    down, down_cpu = time.perf_counter() - t0, cpu_s() - c0 + other() - o0
    assert len(data) == len(upload)
    del data  # as a worker does once it has decoded the global: its connection may reuse the buffer next round
    end("drop", tag)  # the coordinator lets go of the published copy (memory)
    o0, c0, t0 = other(), cpu_s(), time.perf_counter()
    ok, reason = conn.push(got, upload, 1, {})
    up, up_cpu = time.perf_counter() - t0, cpu_s() - c0 + other() - o0
    assert ok, reason
    end("collect", size)
    return down, up, down_cpu, up_cpu


def measure(mode: str, sizes: list[int], repeats: int, chunk_bytes: int, spool_bytes: int | None) -> list[tuple]:
    """Rows (MiB, tcp, down, up, ceiling, peak RSS note, note) of one mode (``process`` or ``threads``)."""
    from dpeft.transport.grpc.channel import channel_options
    from dpeft.transport.grpc.worker import GrpcWorkerConnection

    remote = mode == "process"
    end: Any = RemoteEnd(chunk_bytes, 1 << 34, spool_bytes) if remote else LocalEnd(chunk_bytes, 1 << 34, spool_bytes)
    conn = GrpcWorkerConnection(end.address, chunk_bytes=chunk_bytes, patience_s=30, heartbeat=False)
    conn.join("bench-worker", None)
    bare = BareClient(end.bare_port, chunk_bytes, channel_options(chunk_bytes))
    rows: list[tuple] = []
    try:
        for mib in sizes:
            size = mib * MiB
            need = 4.5 * size
            if available_bytes() and available_bytes() < need:
                rows.append(
                    (
                        mib,
                        None,
                        None,
                        None,
                        None,
                        "",
                        f"skipped: {available_bytes() / 2**30:.1f} GiB free, needs ~{need / 2**30:.1f} GiB",
                    )
                )
                print(rows[-1][-1], flush=True)
                continue
            tcp = min(raw_tcp_remote(end, size) if remote else raw_tcp(size) for _ in range(repeats))
            both_ends = (lambda: cpu_s() + end("cpu")) if remote else cpu_s
            alone = [bare.round(size, both_ends) for _ in range(repeats)]
            # best wall time each way, and the CPU (both ends) of that best run
            ceiling = (min((a[0], a[2]) for a in alone), min((a[1], a[3]) for a in alone))
            upload, _ = tensor_payload(size)  # the worker's update (its own memory)
            rounds = [grpc_round(end, conn, upload, size, f"{mode}{mib}-{i}", remote) for i in range(repeats)]
            del upload
            down = min((r[0], r[2]) for r in rounds)
            up = min((r[1], r[3]) for r in rounds)
            cold = rounds[0]  # the first download of this size went into a fresh buffer (later ones reuse it)
            note = f"best of {repeats}; first download (fresh buffer) {size / cold[0] / MiB:,.0f} MiB/s, {cold[2] * 1000 / mib:.2f} ms/MiB"
            rss = f"{end('peak_rss'):,.0f} / {peak_rss_mib():,.0f}" if remote else f"{peak_rss_mib():,.0f}"
            rows.append((mib, tcp, down, up, ceiling, rss, note))
            print(
                f"[{mode}] {mib} MiB: tcp {size / tcp[0] / MiB:.0f} MiB/s, grpc down {size / down[0] / MiB:.0f} MiB/s "
                f"({tcp[0] / down[0]:.2f}x), up {size / up[0] / MiB:.0f} MiB/s ({tcp[0] / up[0]:.2f}x), peak RSS {rss} MiB",
                flush=True,
            )
    finally:
        conn.leave()
        bare.close()
        end.close()
    return rows


def available_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover
        return 0


def table(mode: str, rows: list[tuple]) -> list[str]:
    rss_head = "peak RSS MiB: coordinator / worker process" if mode == "process" else "peak RSS MiB (the one process)"
    out = [
        f"| payload | raw TCP | dpeft gRPC download | ratio | dpeft gRPC upload | ratio | grpcio alone: down / up ratio | CPU ms/MiB: TCP / down / up | grpcio alone CPU ms/MiB: down / up | {rss_head} | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mib, tcp, down, up, ceiling, rss, note in rows:
        label = f"{mib} MiB" if mib < 1024 else f"{mib / 1024:g} GiB"
        if tcp is None:
            out.append(f"| {label} | | | | | | | | | | {note} |")
            continue
        size = mib * MiB
        bw = lambda s, size=size: f"{size / s / MiB:,.0f} MiB/s"  # noqa: E731
        cpu = " / ".join(f"{c * 1000 / mib:.2f}" for c in (tcp[1], down[1], up[1]))
        alone = f"{tcp[0] / ceiling[0][0]:.2f} / {tcp[0] / ceiling[1][0]:.2f}"
        alone_cpu = f"{ceiling[0][1] * 1000 / mib:.2f} / {ceiling[1][1] * 1000 / mib:.2f}"
        out.append(
            f"| {label} | {bw(tcp[0])} | {bw(down[0])} | **{tcp[0] / down[0]:.2f}** | {bw(up[0])} | **{tcp[0] / up[0]:.2f}** | {alone} | {cpu} | {alone_cpu} | {rss} | {note} |"
        )
    return out


MODE_TITLES = {
    "process": "Two processes (how the transport runs): coordinator end in its own process, worker end in the benchmark's",
    "threads": "One process (both ends as threads sharing one GIL; the raw socket's two ends too)",
}


def as_dpeft_runs(argv: list[str]) -> None:
    """Start again with the glibc malloc settings the `dpeft` coordinator and worker commands run
    with (``dpeft_launch.cli.LEAN_TUNABLES``; read only at process start), so both ends, and the
    raw socket beside them, measure the memory behaviour of a real coordinator and worker."""
    from dpeft_launch.cli import lean_malloc_env

    env = lean_malloc_env(dict(os.environ))
    if env is not None:
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *argv], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="8,64,512,2560", help="payload sizes in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-mib", type=int, default=4, help="gRPC chunk size (transport.chunk_bytes)")
    parser.add_argument(
        "--mode",
        choices=("process", "threads", "both"),
        default="both",
        help="ends in two processes, or as threads of one (both: one table each)",
    )
    parser.add_argument(
        "--spool-mib",
        type=int,
        default=None,
        help="coordinator spools uploads and published payloads of at least this many MiB to a temp file (transport.spool_bytes); default: in memory",
    )
    parser.add_argument("--no-write", action="store_true", help="print the table only (do not update RESULTS.md)")
    parser.add_argument(
        "--glibc-defaults",
        action="store_true",
        help="run both ends with glibc's malloc defaults instead of the settings `dpeft coordinator` and `dpeft worker` start with",
    )
    args = parser.parse_args()
    if not args.glibc_defaults:
        as_dpeft_runs(sys.argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    chunk_bytes = args.chunk_mib * MiB
    spool_bytes = None if args.spool_mib is None else args.spool_mib * MiB
    blob = os.urandom(64 * MiB)
    t0 = time.perf_counter()
    hashlib.sha256(blob).digest()
    sha_mib_s = 64 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    zlib.crc32(blob)
    crc_mib_s = 64 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    crc32c.crc32c(blob)
    crcc_mib_s = 64 / (time.perf_counter() - t0)
    del blob
    load_start = os.getloadavg()[0]
    modes = ["process", "threads"] if args.mode == "both" else [args.mode]
    tables = {mode: measure(mode, sizes, args.repeats, chunk_bytes, spool_bytes) for mode in modes}
    command = f"python benchmarks/transport_throughput.py --sizes {args.sizes} --repeats {args.repeats} --chunk-mib {args.chunk_mib} --mode {args.mode}"
    if args.spool_mib is not None:
        command += f" --spool-mib {args.spool_mib}"
    if args.glibc_defaults:
        command += " --glibc-defaults"
    load_end = os.getloadavg()[0]
    busy = (
        " The load exceeded the cores by half: other jobs shared them, so every throughput here is depressed (the raw socket's"
        " between two processes most of all) and the ratios are not the quiet machine's; CPU ms/MiB is the steadier figure."
        if max(load_start, load_end) > 1.5 * (os.cpu_count() or 1)  # this benchmark's own two ends make ~2
        else ""
    )
    body: list[str] = []
    for mode, rows in tables.items():
        body += [f"{MODE_TITLES[mode]}:", "", *table(mode, rows), ""]
    spool = (
        f"The coordinator spools uploads and published payloads of {args.spool_mib} MiB and more to an unlinked temp file (transport.spool_bytes), as a coordinator does by default at 64 MiB. "
        if args.spool_mib is not None
        else "The coordinator keeps uploads and published payloads in memory (transport.spool_bytes above the sizes; a coordinator's default spools them to a temp file from 64 MiB). "
    )
    text = "\n".join(
        [
            f"`{command}`",
            "",
            machine_note() + f" 1-min load average at the start {load_start:.1f}, at the end {load_end:.1f}." + busy,
            "",
            *body,
            "Ratio = dpeft throughput / raw TCP throughput in the same mode (higher is better; 1.0 = the socket ceiling). "
            f"gRPC chunks of {args.chunk_mib} MiB. Download: per-chunk CRC-32C (taken once when the payload is published, "
            "untimed) and the whole payload's CRC-32C (combined from the chunk CRCs) checked by the worker, written into "
            "one buffer (reused from the previous round of the same size: the best download is a reused buffer's, the note gives the "
            "first one, into fresh memory). Upload: one CRC-32C pass on the worker, chunks serialized straight from the payload (serde's "
            "zero-copy (de)serializers), per-chunk and whole-payload CRC-32C, the finiteness and L2-norm check of the values as "
            "each chunk arrives, and decoding into a tensor state on the coordinator, timed "
            "until the worker has the coordinator's acknowledgement (sent after those checks). The payload is one float32 tensor of "
            "normally distributed values, as an adapter update is (a byte payload would skip the value check). "
            + spool
            + (
                "Both ends run with glibc's malloc defaults (--glibc-defaults). "
                if args.glibc_defaults
                else "Both ends (and the raw socket) run with the glibc malloc settings `dpeft coordinator` and `dpeft worker` "
                "start with (one arena, fixed mmap and trim thresholds, no tcache: buffers are reused rather than handed back "
                "to the kernel and faulted in again; --glibc-defaults to compare). "
            )
            + "Spool files whose upload is done are reused for the next one, as a coordinator does. "
            + "The raw socket (sendall of a memoryview, recv_into a preallocated buffer, in the same placement as the gRPC ends) "
            "does no integrity check at all. CPU ms/MiB is the CPU time of both ends (all threads, both processes) per MiB moved, "
            "steadier than throughput when other jobs share the cores. 'grpcio alone' is grpcio's own ceiling in the same placement: "
            f"ready-made {args.chunk_mib} MiB messages streamed each way with identity (de)serializers and nothing "
            "done with them; its CPU ms/MiB (both ends, of its best run) bounds any protocol on grpcio's Python API: on "
            f"{os.cpu_count()} cores nothing built on it moves more than {os.cpu_count()},000 / that MiB/s, and every check "
            "dpeft adds (CRC-32C, the download buffer, the spool, the value check) is CPU on top. Peak RSS is the high-water mark of each process so far (sizes run in the order given). "
            f"For scale, in the same run: CRC-32C {crcc_mib_s:,.0f} MiB/s, CRC-32 (zlib) {crc_mib_s:,.0f} MiB/s and sha256 "
            f"{sha_mib_s:,.0f} MiB/s on one core.",
        ]
    )
    if not args.no_write:
        write_section("transport", "Transport: dpeft gRPC vs raw TCP on loopback", text)
    print(text)


if __name__ == "__main__":
    main()
