"""Load test of the edge coordinator: many concurrent lightweight gRPC workers on loopback.

The coordinator (a child process) is the real GrpcCoordinatorTransport with token auth, driven
by a minimal round loop: publish a synthetic global adapter, queue one task per worker, fold
every validated update into a float64 sum, next round. The workers are threads in this process,
each a real GrpcWorkerConnection (join, long-poll, chunked download, checksummed upload,
heartbeats) sending a precomputed synthetic update, so the numbers measure the transport, not
training. Reports throughput, upload latency percentiles (client side, whole PushUpdate call),
errors (must be 0) and the coordinator's resident memory; writes the `edge_load` section of
benchmarks/RESULTS.md.

    python benchmarks/edge_load.py [--workers 200] [--rounds 3] [--tensor-kb 64]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from dpeft.codec import encode_state  # noqa: E402
from dpeft.config import TransportConfig
from dpeft.state import AdapterState  # noqa: E402


def _schema(tensor_kb: int) -> OrderedDict[str, tuple[tuple[int, ...], torch.dtype]]:
    n = max(1, tensor_kb * 1024 // 4 // 64)
    return OrderedDict([(f"layer{i}.lora_A.weight", ((n, 64), torch.float32)) for i in range(4)])


def _state(schema, seed: int) -> AdapterState:
    g = torch.Generator().manual_seed(seed)
    return AdapterState(OrderedDict((k, torch.randn(s, generator=g, dtype=d) * 0.01) for k, (s, d) in schema.items()), {})


def coordinator(conn, workers: int, rounds: int, tensor_kb: int, tokens_file: str, chunk_bytes: int) -> None:
    """Child process: serve ``rounds`` rounds to ``workers`` workers, report to ``conn``."""
    import psutil

    from dpeft.codec.tensors import Limits, StateDecoder
    from dpeft.transport.auth import TokenStore
    from dpeft.transport.base import Rejection, TaskResult, TrainTask
    from dpeft.transport.grpc import GrpcCoordinatorTransport

    torch.set_num_threads(1)
    proc = psutil.Process()
    peak = [proc.memory_info().rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], proc.memory_info().rss)

    threading.Thread(target=sample, daemon=True).start()
    schema = _schema(tensor_kb)
    transport = GrpcCoordinatorTransport(
        "127.0.0.1:0",
        TransportConfig(
            chunk_bytes=chunk_bytes,
            max_concurrent_uploads=workers,
            poll_timeout_s=2.0,
            heartbeat_s=5.0,
            dead_after_s=60.0,
            server_threads=workers + 32,
        ),
        run_id="edge-load",
        config_yaml="{}",
        num_clients=workers,
        decoder_factory=lambda tid, cid: StateDecoder(schema, Limits(max_total_bytes=1 << 30)),
        tokens=TokenStore(tokens_file),
    )
    address = transport.start()
    rss_idle = proc.memory_info().rss
    conn.send({"address": address})
    deadline = time.time() + 300
    while sum(1 for w in transport.workers().values() if w["alive"]) < workers and time.time() < deadline:
        time.sleep(0.05)
    global_state = _state(schema, 0)
    per_round = []
    rejected = 0
    up0, down0 = transport.bytes_moved()
    t_all = time.time()
    for r in range(1, rounds + 1):
        t0 = time.time()
        payload = encode_state(global_state)
        digest = hashlib.sha256(payload).digest()
        blob = f"r{r}"
        transport.publish_blob(blob, payload)
        tasks = [TrainTask(f"r{r}-c{c}", r, c, blob, len(payload), digest) for c in range(workers)]
        transport.submit(tasks, {})
        acc = {k: torch.zeros(s, dtype=torch.float64) for k, (s, _) in schema.items()}
        got = 0
        while got < workers:
            ev = transport.next_event(60.0)
            if ev is None:
                raise SystemExit(f"round {r}: only {got}/{workers} updates after 60 s")
            if isinstance(ev, Rejection):
                rejected += 1
                continue
            assert isinstance(ev, TaskResult)
            for k, t in ev.delta.items():
                acc[k] += t.double()
            got += 1
        global_state = AdapterState(OrderedDict((k, (global_state[k].double() + acc[k] / workers).float()) for k in acc), {})
        transport.cancel_pending()
        per_round.append(time.time() - t0)
    wall = time.time() - t_all
    up1, down1 = transport.bytes_moved()
    transport.shutdown("benchmark done", grace_s=10.0)
    stop.set()
    conn.send(
        {
            "per_round": per_round,
            "wall": wall,
            "rejected": rejected,
            "rss_idle": rss_idle,
            "rss_peak": peak[0],
            "bytes_up": up1 - up0,
            "bytes_down": down1 - down0,
            "update_bytes": len(encode_state(_state(schema, 1))),
            "stats": transport.stats(),
        }
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tensor-kb", type=int, default=64, help="size of each of the 4 adapter tensors")
    ap.add_argument("--chunk-kb", type=int, default=64, help="upload/download chunk size")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    args = ap.parse_args()

    from dpeft.transport.grpc import GrpcWorkerConnection

    tmp = tempfile.mkdtemp(prefix="dpeft-edge-load-")
    tokens = {f"w{i}": hashlib.sha256(f"tok{i}".encode()).hexdigest() for i in range(args.workers)}
    tokens_file = os.path.join(tmp, "tokens.json")
    Path(tokens_file).write_text(json.dumps(tokens))
    parent, child = mp.get_context("spawn").Pipe()
    coord = mp.get_context("spawn").Process(
        target=coordinator, args=(child, args.workers, args.rounds, args.tensor_kb, tokens_file, args.chunk_kb << 10), daemon=True
    )
    coord.start()
    address = parent.recv()["address"]
    payload = encode_state(_state(_schema(args.tensor_kb), 1))
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    t_start = time.time()

    def worker(i: int) -> None:
        wid = f"w{i}"
        try:
            conn = GrpcWorkerConnection(address, token=tokens[wid], chunk_bytes=args.chunk_kb << 10, patience_s=120)
            conn.join(wid, None)
            while True:
                item = conn.poll()
                if isinstance(item, str):
                    break
                if isinstance(item, float):
                    continue
                conn.fetch(item)
                t0 = time.perf_counter()
                ok, reason = conn.push(item, payload, 16, {"train_loss": 0.5})
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    if not ok:
                        errors.append(f"{wid}: rejected: {reason}")
            conn.leave()
        except Exception as exc:  # noqa: BLE001 - every failure is an error in the report
            with lock:
                errors.append(f"{wid}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.workers)]
    for th in threads:
        th.start()
    result = parent.recv()
    for th in threads:
        th.join(60)
    coord.join(30)
    lat = sorted(latencies)
    updates = len(lat)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] * 1000 if lat else float("nan")

    mib = 1 << 20
    body = f"""`python benchmarks/edge_load.py --workers {args.workers} --rounds {args.rounds} --tensor-kb {args.tensor_kb} --chunk-kb {args.chunk_kb}`

{args.workers} concurrent workers (threads in one process, each a real `GrpcWorkerConnection`: token
auth on every call, long-poll, chunked download, CRC-checked chunked upload, heartbeat thread)
against the real `GrpcCoordinatorTransport` in a separate process (token auth, plaintext loopback),
{args.rounds} rounds, one task per worker per round, an update of {result["update_bytes"] / 1024:.0f} KiB
(4 float32 tensors) in {args.chunk_kb} KiB chunks; the coordinator validates every update against
the schema and folds it into a float64 sum. Workers and coordinator share the machine's cores.

| metric | value |
| --- | --- |
| updates accepted | {updates} ({args.workers} x {args.rounds}) |
| errors (client exceptions + rejections) | {len(errors) + result["rejected"]} |
| round wall time (s), per round | {", ".join(f"{x:.2f}" for x in result["per_round"])} |
| throughput | {updates / result["wall"]:.0f} updates/s, {result["bytes_up"] / mib / result["wall"]:.1f} MiB/s up, {result["bytes_down"] / mib / result["wall"]:.1f} MiB/s down |
| upload latency p50 / p99 / max (ms) | {pct(50):.1f} / {pct(99):.1f} / {pct(100):.1f} |
| coordinator RSS idle -> peak (MiB) | {result["rss_idle"] / mib:.0f} -> {result["rss_peak"] / mib:.0f} |
| uploads resumed / corrupt chunks | {result["stats"]["uploads_resumed"]} / {result["stats"]["corrupt_chunks"]} |

Total wall time including {args.workers} joins: {time.time() - t_start:.1f} s.
"""
    from results import machine_note, write_section

    body += "\n" + machine_note() + "\n"
    print(body)
    if errors:
        print("ERRORS:\n" + "\n".join(errors[:20]), file=sys.stderr)
    if not args.no_write:
        write_section("edge_load", "Edge load: concurrent gRPC workers", body)
    return 0 if not errors and result["rejected"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
