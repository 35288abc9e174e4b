"""Coordinator memory with a large (> 2 GiB) adapter: peak RSS vs adapter size and chunk size.

A real coordinator process (RoundEngine + GrpcCoordinatorTransport, the same code `dpeft
coordinator` runs) owns a synthetic adapter of several float32 tensors; ``--workers`` real
worker processes (GrpcWorkerConnection) each download the global, then upload a precomputed
delta (a constant per worker, written to a file beforehand and sent from a memory map). The
coordinator validates and spools each upload, folds it into the streaming FedAvg aggregate,
takes the server step and writes its checkpoint; it then checks a sample of the new global
against the exact expected value. This script samples the coordinator's RSS (psutil, every
20 ms, with the anonymous/file split from /proc) and reports, per configuration:

- base: RSS once the global adapter is built and the server listens;
- transfer peak: the highest RSS from then until the server step begins (downloads of the
  global, uploads, validation and folding into the aggregate);
- step peak: the highest RSS during the server step and the checkpoint.

    python benchmarks/large_adapter.py [--configs 256:4,1024:1,1024:4,1024:16,2200:4] [--workers 2] [--no-spool-at 1024]

``SIZE:CHUNK`` pairs are MiB of adapter and MiB per gRPC chunk. ``--no-spool-at`` adds a run
at that adapter size with spooling switched off (transport.spool_bytes larger than any
payload: uploads buffered in memory, the global served from a serialized copy) for contrast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MiB = 1 << 20
TENSORS = 4  # the adapter is split into this many equal float32 tensors


def shapes(size_mib: int) -> list[tuple[str, tuple[int, int]]]:
    """Tensor names and shapes of a synthetic adapter of ``size_mib`` MiB of float32."""
    per = size_mib * MiB // 4 // TENSORS
    cols = 4096
    return [(f"layers.{i}.lora.weight", (per // cols, cols)) for i in range(TENSORS)]


# -- coordinator process ---------------------------------------------------------------------------
class SyntheticModel:
    """Stands in for GlobalModel: a seeded synthetic adapter, no evaluation, no PEFT export."""

    def __init__(self, size_mib: int) -> None:
        self.size_mib = size_mib

    def initial_state(self):
        from collections import OrderedDict

        import torch

        from dpeft.state import AdapterState

        # every page touched (torch.full), so the base RSS really holds the global
        return AdapterState(OrderedDict((n, torch.full(s, 0.5)) for n, s in shapes(self.size_mib)), {"round": 0})

    def evaluate(self, state) -> dict[str, float]:
        return {}

    def export(self, state, directory) -> Path:
        return Path(directory)


def coordinator(args: argparse.Namespace) -> None:
    import torch

    from dpeft.transport.grpc import GrpcCoordinatorTransport
    from dpeft.validate import load_config
    from dpeft_coordinator.engine import RoundEngine

    torch.set_num_threads(1)
    if not args.glibc_default:
        from dpeft_launch.simulate import return_large_frees

        return_large_frees()  # as `dpeft coordinator` does
    run_dir = Path(args.run_dir)
    overrides = [
        f"run_dir={run_dir}",
        f"clients={args.workers}",
        f"clients_per_round={args.workers}",
        "rounds=1",
        f"transport.chunk_bytes={args.chunk_mib * MiB}",
        f"transport.max_update_bytes={1 << 34}",
        f"transport.max_tensor_bytes={1 << 34}",
        f"transport.spool_bytes={args.spool_bytes}",
        "sync.round_timeout_s=1800",
    ]
    cfg = load_config(None, overrides)
    engine = RoundEngine(cfg, SyntheticModel(args.size_mib), run_dir, resume=False)  # type: ignore[arg-type]
    finish = engine.strategy.finish_round

    def timed_finish(global_state, aggregator):
        print(json.dumps({"phase": "step", "t": time.time()}), flush=True)
        return finish(global_state, aggregator)

    engine.strategy.finish_round = timed_finish  # type: ignore[method-assign]
    transport = GrpcCoordinatorTransport(
        "127.0.0.1:0",
        dataclasses.replace(cfg.transport, poll_timeout_s=0.5, dead_after_s=600.0),
        run_id="large",
        config_yaml="{}",
        num_clients=cfg.clients,
        decoder_factory=engine.decoder_for,
    )
    address = transport.start()
    print(json.dumps({"phase": "ready", "t": time.time(), "address": address}), flush=True)
    t0 = time.time()
    engine.run(transport)
    wall = time.time() - t0
    # FedAvg of constant deltas (client c sends c + 1, in 1e-3 units, equal weights) on 0.5
    want = 0.5 + 1e-3 * sum(c + 1 for c in range(args.workers)) / args.workers
    worst = max(float((t.reshape(-1)[:: 1 << 16] - want).abs().max()) for t in engine.global_state.tensors.values())
    rows = engine.metrics.rows
    print(json.dumps({"phase": "done", "t": time.time(), "wall_s": wall, "max_err": worst, "row": rows[-1]}), flush=True)
    transport.shutdown("done", grace_s=2.0)


# -- worker process ----------------------------------------------------------------------------------
def write_delta(path: Path, size_mib: int, value: float) -> None:
    """A payload in dpeft's wire format (safetensors layout) with every element = ``value``."""
    import torch

    header: dict = {"__metadata__": {"dpeft": "{}"}}
    offset = 0
    for name, shape in shapes(size_mib):
        n = shape[0] * shape[1] * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    piece = torch.full((16 * MiB // 4,), value).numpy().tobytes()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        left = offset
        while left:
            fh.write(piece[: min(left, len(piece))])
            left -= min(left, len(piece))


def worker(args: argparse.Namespace) -> None:
    import mmap

    from dpeft.transport.base import TrainTask
    from dpeft.transport.grpc import GrpcWorkerConnection

    conn = GrpcWorkerConnection(args.address, chunk_bytes=args.chunk_mib * MiB, patience_s=600, heartbeat=True)
    reg = conn.join(f"w{args.index}", 100)  # owns one client slot: the round waits for every worker
    client = reg.client_ids[0]
    path = Path(args.delta_file)
    write_delta(path, args.size_mib, 1e-3 * (client + 1))
    report: dict = {"client": client}
    while True:
        task = conn.poll()
        if isinstance(task, str):
            break
        if not isinstance(task, TrainTask):
            continue
        t0 = time.time()
        got = conn.fetch(task)
        report["down_s"], report["down_bytes"] = time.time() - t0, len(got)
        del got
        conn._cache = None  # noqa: SLF001 - free the downloaded global before uploading
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as payload:
            t0 = time.time()
            ok, reason = conn.push(task, payload, 100, {"train_loss": 0.0})  # type: ignore[arg-type]
            report.update(up_s=time.time() - t0, ok=ok, reason=reason)
    path.unlink()
    conn.leave()
    print(json.dumps(report), flush=True)


# -- driver ------------------------------------------------------------------------------------------
def _proc_mem(pid: int) -> tuple[int, int, int]:
    """(rss, rss - RssFile, RssFile) bytes from /proc: the middle one is the process's own memory
    (anonymous + shared anonymous), the last the file-backed pages (libraries, mapped spool files)."""
    fields = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
                k, v = line.split(":", 1)
                fields[k] = int(v.split()[0]) * 1024
    return fields.get("VmRSS", 0), fields.get("VmRSS", 0) - fields.get("RssFile", 0), fields.get("RssFile", 0)


def run_one(size_mib: int, chunk_mib: int, workers: int, spool: bool, glibc_default: bool = False) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="dpeft-large-", dir=os.environ.get("DPEFT_BENCH_TMP")))
    spool_bytes = 64 * MiB if spool else 1 << 40
    cmd = [
        sys.executable,
        __file__,
        "--role",
        "coordinator",
        "--size-mib",
        str(size_mib),
        "--chunk-mib",
        str(chunk_mib),
        "--workers",
        str(workers),
        "--run-dir",
        str(tmp / "run"),
        "--spool-bytes",
        str(spool_bytes),
    ]
    env = dict(os.environ)
    if glibc_default:  # contrast: glibc's default malloc thresholds, as before dpeft set its own
        cmd.append("--glibc-default")
    coord = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    samples: list[tuple[float, int, int, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                rss, anon, file_ = _proc_mem(coord.pid)
            except (OSError, ValueError):
                break
            samples.append((time.time(), rss, anon, file_))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    phases: dict[str, dict] = {}
    procs = []
    try:
        line = coord.stdout.readline()  # type: ignore[union-attr]
        phases["ready"] = json.loads(line)
        for i in range(workers):
            wcmd = [
                sys.executable,
                __file__,
                "--role",
                "worker",
                "--size-mib",
                str(size_mib),
                "--chunk-mib",
                str(chunk_mib),
                "--address",
                phases["ready"]["address"],
                "--index",
                str(i),
                "--delta-file",
                str(tmp / f"delta-{i}.bin"),
            ]
            procs.append(subprocess.Popen(wcmd, stdout=subprocess.PIPE, text=True))
        for line in coord.stdout:  # type: ignore[union-attr]
            if not line.startswith("{"):
                continue
            msg = json.loads(line)
            phases[msg["phase"]] = msg
            if msg["phase"] == "done":
                break
        coord.wait(120)
        worker_out = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    finally:
        stop.set()
        for p in [*procs, coord]:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    sampler.join(5)
    t_ready, t_step, t_done = phases["ready"]["t"], phases["step"]["t"], phases["done"]["t"]
    base = [s for s in samples if s[0] <= t_ready + 0.05][-1]

    def peak(lo: float, hi: float) -> tuple[int, int, int]:
        window = [s for s in samples if lo <= s[0] <= hi]
        top = max(window, key=lambda s: s[1])
        return top[1], top[2], top[3]

    return {
        "size_mib": size_mib,
        "chunk_mib": chunk_mib,
        "workers": workers,
        "spool": spool,
        "glibc_default": glibc_default,
        "base": base[1],
        "base_split": base[2:],
        "transfer_peak": peak(t_ready, t_step),
        "step_peak": peak(t_step, t_done),
        "wall_s": phases["done"]["wall_s"],
        "max_err": phases["done"]["max_err"],
        "workers_out": worker_out,
        "row": phases["done"]["row"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="256:4,1024:1,1024:4,1024:16,2200:4", help="SIZE_MIB:CHUNK_MIB pairs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-spool-at", type=int, default=1024, help="adapter MiB of one extra run with spooling off (0 = none)")
    parser.add_argument(
        "--malloc-row",
        type=int,
        default=1024,
        help="adapter MiB of one extra run with glibc's default malloc thresholds (0 = none)",
    )
    parser.add_argument("--glibc-default", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--role", default="driver", choices=["driver", "coordinator", "worker"], help=argparse.SUPPRESS)
    parser.add_argument("--size-mib", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--chunk-mib", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--spool-bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--delta-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "coordinator":
        return coordinator(args)
    if args.role == "worker":
        return worker(args)
    from results import machine_note, write_section

    runs = [(int(a), int(b), True, False) for a, b in (c.split(":") for c in args.configs.split(","))]
    if args.malloc_row:
        runs.append((args.malloc_row, 4, True, True))
    if args.no_spool_at:
        runs.append((args.no_spool_at, 4, False, False))
    results = []
    for size_mib, chunk_mib, spool, glibc_default in runs:
        r = run_one(size_mib, chunk_mib, args.workers, spool, glibc_default)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "row"}), flush=True)
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    table = [
        "| adapter A | chunk | spool | base RSS (anon) | transfer peak RSS (anon / file) | transfer: anon above base + 2A | step peak RSS (anon) | step: anon above base | round wall | exact |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        a = r["size_mib"] * MiB
        tp, sp, (b_anon, _) = r["transfer_peak"], r["step_peak"], r["base_split"]
        extra = tp[1] - b_anon - 2 * a
        table.append(
            f"| {r['size_mib'] / 1024:.2f} GiB | {r['chunk_mib']} MiB | {('on' if r['spool'] else 'off') + (', glibc default malloc' if r['glibc_default'] else '')} | {gib(r['base'])} GiB ({gib(b_anon)}) | "
            f"{gib(tp[0])} GiB ({gib(tp[1])} / {gib(tp[2])}) | {extra / MiB:+,.0f} MiB | "
            f"{gib(sp[0])} GiB ({gib(sp[1])}) | {(sp[1] - b_anon) / a:.2f} A | {r['wall_s']:.0f} s | {'yes' if r['max_err'] < 1e-6 else 'NO'} |"
        )
    body = "\n".join(
        [
            f"`python benchmarks/large_adapter.py --configs {args.configs} --workers {args.workers} --no-spool-at {args.no_spool_at} "
            f"--malloc-row {args.malloc_row}`",
            "",
            machine_note() + f" 1-min load average at the end {os.getloadavg()[0]:.1f}.",
            "",
            *table,
            "",
            f"A = adapter size (float32, {TENSORS} tensors). {args.workers} worker processes each download the global and upload a "
            "delta of size A over real gRPC on loopback; the coordinator (one process: round engine, gRPC servicer, FedAvg, "
            "checkpoint) is sampled every 20 ms from outside (RSS, and `anon` = RSS minus the file-backed pages, which are "
            "shared libraries and mapped spool pages the kernel can drop). Base: the global adapter (A) plus the runtime. "
            "The FedAvg aggregate is a float64 running sum, 2A, touched as the first update is folded in, so the transfer phase "
            "(downloads, uploads, validation, folding) cannot go below base + 2A; the `above base + 2A` column is what the "
            "transfers cost beyond that, in MiB and in chunks. The server step holds the old global, the sum, the mean update "
            "and the new global (base + 4A; its float64 temporaries are sliced to 8 MiB). With spooling "
            "(transport.spool_bytes, default 64 MiB) each upload goes to an unlinked temp file as its chunks arrive and is "
            "validated and folded slice by slice from a memory map whose pages are released as the pass goes; the global is "
            "written once per round to a temp file and served chunk by chunk. `spool off` is the previous behaviour: uploads "
            "buffered whole in memory, the global held as one serialized copy. `exact`: a sample of the new global equals 0.5 + "
            "the mean of the workers' constant deltas. What remains above base + 2A with spooling does not grow with the adapter: "
            "the coordinator sets glibc's mmap threshold to 1 MiB at start (`mallopt(M_MMAP_THRESHOLD)`, as `dpeft coordinator` "
            "does: every allocation from 1 MiB on is its own mapping, returned on free); the `glibc default malloc` row leaves "
            "glibc's dynamic threshold, under which freed chunk-sized buffers (gRPC allocates one bytes object per message) stay "
            "cached in per-thread arenas, a few hundred MiB that do not grow with the adapter. The file-backed part above the base (shared libraries) is spool pages being read, given back every 8 slices "
            "(32 MiB of float32) of each pass.",
        ]
    )
    if not args.no_write:
        write_section("large_adapter", "Large adapters: coordinator memory vs adapter and chunk size", body)
    print(body)


if __name__ == "__main__":
    main()
