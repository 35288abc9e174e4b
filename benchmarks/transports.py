"""Per-round transport overhead: gRPC (simulate) vs Ray actors vs torch.distributed all-reduce.

Everything but training is timed: encoding and publishing the global adapter, moving it to N
workers, the workers decoding it, their (precomputed, same-size) updates coming back, the
coordinator decoding and validating them, streaming FedAvg, and the server step. All-reduce
has no coordinator: each rank folds its own update and the group all-reduces the float64
weighted sums, then applies the step. Workers are real processes (gRPC worker processes, Ray
actors, gloo ranks) on this machine, so on a small machine the numbers include CPU contention.

    python benchmarks/transports.py [--params 16000000] [--workers 2 3 4] [--rounds 3]

Writes the `transports` section of benchmarks/RESULTS.md and benchmarks/transports.png.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402
from results import machine_note, write_section  # noqa: E402

TENSORS = 8


def make_state(params: int, seed: int | None = None):
    from dpeft.state import AdapterState

    per = params // TENSORS
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return AdapterState(
        OrderedDict(
            (f"layer{i}.lora_{'AB'[i % 2]}", torch.randn(per, generator=g) if g is not None else torch.zeros(per))
            for i in range(TENSORS)
        ),
        {"round": 0},
    )


def _decoder_factory(schema):
    from dpeft.codec.tensors import Limits, StateDecoder

    return lambda task_id, client_id: StateDecoder(schema, Limits(max_total_bytes=1 << 40))


def _star_rounds(transport, params: int, workers: int, rounds: int) -> tuple[list[float], int, int]:
    """Coordinator side of gRPC/Ray: publish, submit one task per worker, fold results, step."""
    import hashlib

    from dpeft.codec import encode_state
    from dpeft.strategies import ClientUpdate
    from dpeft.strategies.aggregate import StreamingWeightedMean, apply_delta
    from dpeft.transport.base import TaskResult, TrainTask

    glob = make_state(params)
    times = []
    up0, down0 = transport.bytes_moved()
    for r in range(1, rounds + 2):  # round 1 is a warm-up (connections, first allocation)
        t0 = time.perf_counter()
        payload = encode_state(glob)
        digest = hashlib.sha256(payload).digest()
        blob = f"r{r}"
        transport.publish_blob(blob, payload)
        transport.submit([TrainTask(f"r{r}-{i}", r, i, blob, len(payload), digest, {}) for i in range(workers)], {})
        agg = StreamingWeightedMean(glob)
        while agg.count < workers:
            ev = transport.next_event(5.0)
            if isinstance(ev, TaskResult):
                agg.add(ClientUpdate(ev.client_id, ev.delta, ev.num_examples))
            elif ev is not None:
                raise RuntimeError(f"rejected: {ev}")
        glob = apply_delta(glob, agg.result())
        if r == 1:
            up0, down0 = transport.bytes_moved()
        else:
            times.append(time.perf_counter() - t0)
    up1, down1 = transport.bytes_moved()
    return times, (up1 - up0) // rounds, (down1 - down0) // rounds


# ---------------------------------------------------------------- gRPC


def _grpc_worker(address: str, worker_id: str, params: int, seed: int) -> None:
    torch.set_num_threads(1)
    from dpeft.codec import decode_state, encode_state
    from dpeft.transport.grpc import GrpcWorkerConnection

    update = encode_state(make_state(params, seed))
    conn = GrpcWorkerConnection(address, patience_s=20, heartbeat=False)
    conn.join(worker_id, None)
    while True:
        item = conn.poll()
        if isinstance(item, str):
            break
        if isinstance(item, float):
            continue
        payload = conn.fetch(item)
        decode_state(payload)  # what a real worker does before training
        conn.push(item, update, 100, {})
    conn.leave()


def bench_grpc(params: int, workers: int, rounds: int) -> tuple[list[float], int, int]:
    from dpeft.config import TransportConfig
    from dpeft.transport.grpc import GrpcCoordinatorTransport

    schema = make_state(params).schema()
    t = GrpcCoordinatorTransport(
        "127.0.0.1:0",
        TransportConfig(poll_timeout_s=0.5),
        run_id="bench",
        config_yaml="{}",
        num_clients=workers,
        decoder_factory=_decoder_factory(schema),
    )
    address = t.start()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_grpc_worker, args=(address, f"w{i}", params, i)) for i in range(workers)]
    for p in procs:
        p.start()
    try:
        while sum(1 for w in t.workers().values() if w["alive"]) < workers:
            time.sleep(0.05)
        return _star_rounds(t, params, workers, rounds)
    finally:
        t.shutdown("done", grace_s=5)
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()


# ---------------------------------------------------------------- Ray


class FakeTrainActor:
    """Stands in for TrainActor: decodes the payload, returns a precomputed update of the same size."""

    def __init__(self, config_tree, worker_id, threads=1):
        import numpy as np

        from dpeft.codec import encode_state

        torch.set_num_threads(1)
        self.update = np.frombuffer(encode_state(make_state(config_tree["params"], int(worker_id.split("-")[1]))), dtype=np.uint8)

    def ready(self):
        return {"pid": os.getpid()}

    def train(self, task, payload):
        from dpeft.codec import decode_state

        decode_state(memoryview(payload))
        return self.update, 100, {}


def bench_ray(params: int, workers: int, rounds: int, temp_dir: str) -> tuple[list[float], int, int]:
    import ray

    from dpeft.transport.ray_transport import RayActorSpec, RayCoordinatorTransport

    ray.init(
        num_cpus=max(2, workers),
        include_dashboard=False,
        _temp_dir=temp_dir,
        logging_level="ERROR",
        log_to_driver=False,
        object_store_memory=max(512 << 20, 6 * params * 4 * (workers + 2)),
    )
    try:
        schema = make_state(params).schema()

        t = RayCoordinatorTransport(
            config_tree={"params": params},
            decoder_factory=_decoder_factory(schema),
            spec=RayActorSpec(actors=workers, num_cpus=1),
            actor_cls=FakeTrainActor,
        )
        t.start()
        try:
            return _star_rounds(t, params, workers, rounds)
        finally:
            t.shutdown("done")
    finally:
        ray.shutdown()


# ---------------------------------------------------------------- all-reduce


def _allreduce_rank(rank: int, world: int, port: int, params: int, rounds: int, out) -> None:
    import torch.distributed as dist

    from dpeft.rounds.allreduce import allreduce_aggregator
    from dpeft.strategies import ClientUpdate
    from dpeft.strategies.aggregate import StreamingWeightedMean, apply_delta
    from dpeft.transport.distributed_allreduce import init_group

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    init_group("gloo")
    glob = make_state(params)
    update = make_state(params, rank)
    times = []
    for r in range(rounds + 1):
        dist.barrier()
        t0 = time.perf_counter()
        agg = StreamingWeightedMean(glob)
        agg.add(ClientUpdate(rank, update, 100))
        allreduce_aggregator(agg)
        glob = apply_delta(glob, agg.result())
        dist.barrier()
        if r:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put(times)
    dist.destroy_process_group()


def bench_allreduce(params: int, workers: int, rounds: int) -> tuple[list[float], int, int]:
    import socket

    from dpeft.transport.distributed_allreduce import ring_bytes_per_rank

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_allreduce_rank, args=(i, workers, port, params, rounds, q)) for i in range(workers)]
    for p in procs:
        p.start()
    times = q.get(timeout=900)
    for p in procs:
        p.join(30)
    per_rank = ring_bytes_per_rank(params * 8, workers)
    return times, per_rank * workers, per_rank * workers


# ---------------------------------------------------------------- report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=int, default=16_000_000, help="adapter parameters (float32)")
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per cell (after one warm-up)")
    ap.add_argument("--transports", nargs="+", default=["grpc", "ray", "allreduce"])
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()

    import tempfile

    S = args.params * 4
    rows: list[dict] = []
    for n in args.workers:
        for name in args.transports:
            t0 = time.time()
            if name == "grpc":
                times, up, down = bench_grpc(args.params, n, args.rounds)
            elif name == "ray":
                with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as tmp:
                    times, up, down = bench_ray(args.params, n, args.rounds, tmp)
            else:
                times, up, down = bench_allreduce(args.params, n, args.rounds)
            med = statistics.median(times)
            if name == "allreduce":
                paper = 2 * (n - 1) / n * args.params * 8  # float64 sums, per rank each way
            else:
                paper = S  # per worker each way; the coordinator link carries n * S
            rows.append(
                {
                    "transport": name,
                    "workers": n,
                    "round_s": med,
                    "min_s": min(times),
                    "up_per_worker": up / n,
                    "down_per_worker": down / n,
                    "paper_per_worker": paper,
                }
            )
            print(
                f"{name:9s} N={n}: median {med:.3f}s (min {min(times):.3f}s) up/worker {up / n / 2**20:.1f} MiB "
                f"down/worker {down / n / 2**20:.1f} MiB paper {paper / 2**20:.1f} MiB  [{time.time() - t0:.0f}s]",
                flush=True,
            )

    report(rows, args.params, args.rounds, write=not args.no_write)
    return 0


def report(rows: list[dict], params: int, rounds: int, write: bool = True) -> str:
    """The RESULTS.md section (and the PNG) for measured rows."""
    S = params * 4
    mib = 2**20
    by = {(r["transport"], r["workers"]): r["round_s"] for r in rows}
    ns = sorted({r["workers"] for r in rows})
    summary = ""
    if all((t, n) in by for t in ("grpc", "ray", "allreduce") for n in ns) and len(ns) > 1:
        lo, hi = ns[0], ns[-1]
        summary = (
            f"From {lo} to {hi} workers the gRPC round grows {by[('grpc', hi)] / by[('grpc', lo)]:.1f}x (every byte through the "
            f"coordinator's process), Ray's {by[('ray', hi)] / by[('ray', lo)]:.1f}x (one shared-memory copy of the payload per node, "
            f"zero-copy reads), all-reduce {by[('allreduce', hi)] / by[('allreduce', lo)]:.1f}x. On this one small machine "
            f"all-reduce beats Ray's star at {_listing([n for n in ns if by[('allreduce', n)] < by[('ray', n)]])} workers and Ray "
            f"wins at {_listing([n for n in ns if by[('allreduce', n)] >= by[('ray', n)]])}: gloo goes through loopback TCP with "
            "float64 sums (2x the bytes) and N ranks share the cores. "
            "Across machines the ring's advantage is the coordinator link: a star pushes N*S each way through one NIC, the ring "
            "at most 2S' per rank whatever N."
        )
    lines = [
        f"Adapter: {params / 1e6:.0f}M float32 parameters in {TENSORS} tensors (S = {S / mib:.0f} MiB). "
        f"Median of {rounds} rounds after a warm-up; training is replaced by a precomputed update, so the "
        "time is pure overhead: encode + move + decode + validate + FedAvg + server step. Workers are "
        "processes on this machine.",
        "",
        "| transport | workers | round overhead s (median) | min s | MiB up / worker | MiB down / worker | on paper MiB / worker each way |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['transport']} | {r['workers']} | {r['round_s']:.3f} | {r['min_s']:.3f} | {r['up_per_worker'] / mib:.1f} | "
            f"{r['down_per_worker'] / mib:.1f} | {r['paper_per_worker'] / mib:.1f} |"
        )
    lines += [
        "",
        "On paper, N workers, adapter of S bytes: a star (gRPC or Ray; the coordinator sends the global and "
        "receives each update) moves S down and S up per worker, and N*S each way through the coordinator's "
        "link, so its round time grows linearly with N at the coordinator. A ring all-reduce moves "
        "2(N-1)/N * S' per rank each way (S' = 2S here: the sums are reduced in float64 so the result "
        "matches the coordinator's FedAvg to rounding), which stays below 2S' for any N and has no hot spot. "
        "The measured Ray bytes are logical (payload counted once per actor; the object store ships it once "
        "per node). All-reduce bytes are the ring formula (gloo picks its own algorithm), not a measurement.",
        "",
        summary,
        "",
        machine_note(),
        "",
        "![transports](transports.png)",
    ]
    body = "\n".join(lines)
    print(body)
    if write:
        write_section("transports", "Transport overhead per round: gRPC vs Ray vs all-reduce", body)
        _plot(rows, HERE / "transports.png", S)
    return body


def _listing(ns: list[int]) -> str:
    return ", ".join(str(n) for n in ns) if ns else "no number of"


def _plot(rows, path: Path, S: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["transport"] for r in rows):
        rs = [r for r in rows if r["transport"] == name]
        ax1.plot([r["workers"] for r in rs], [r["round_s"] for r in rs], marker="o", label=name)
        if name != "allreduce":  # all-reduce bytes are the ring formula, drawn below
            ax2.plot(
                [r["workers"] for r in rs],
                [(r["up_per_worker"] + r["down_per_worker"]) / 2**20 for r in rs],
                marker="o",
                label=f"{name} measured",
            )
    ns = sorted({r["workers"] for r in rows})
    ax2.plot(ns, [2 * S / 2**20 for _ in ns], ls="--", color="gray", label="star on paper (per worker)")
    ax2.plot(ns, [n * 2 * S / 2**20 for n in ns], ls=":", color="gray", label="star: coordinator link")
    ax2.plot(ns, [2 * 2 * (n - 1) / n * 2 * S / 2**20 for n in ns], ls="-.", color="black", label="ring on paper (float64)")
    ax1.set_xlabel("workers")
    ax1.set_ylabel("round overhead, s (median)")
    ax1.set_title("time per round without training")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.set_xlabel("workers")
    ax2.set_ylabel("MiB per worker per round (up + down)")
    ax2.set_title("bytes")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
