"""One split cloud, many edges: batched serving vs one-at-a-time serving.

N edges (1, 4, 16) train at once against one cloud; each takes ``--steps`` timed steps
after one warm-up step. The cloud either runs each edge's step alone on its frozen base
(``split.max_batch_edges=1``: one session thread per edge, each with its own forward and
backward) or stacks the steps that arrive together into one pass (``max_batch_edges=16``,
``batch_window_ms`` as given). Both modes run in this one invocation, interleaved (alone,
batched, then batched, alone for the next repetition), on the same edges and data.

Cloud and edges share this process (each edge a thread with its own loopback gRPC stream,
its own EdgeModel with the frozen body dropped, its own Rotten Tomatoes rows, so sequence
lengths differ between edges); all-MiniLM-L6-v2 (6 layers, LoRA r=8 on query/value), fp32
wire. Reported: steps per second served (all edges' timed steps over the wall time from the
common start to the last edge's end), per-edge step latency as the edge sees it (median and
p95 over every timed step of every edge) and the mean number of edges per batch.

    python benchmarks/split_batching.py [--quick] [--steps N] [--edges 1,4,16] [--reps R] [--cloud-device cuda]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from results import machine_note, write_section  # noqa: E402

NOTE = (
    "With one edge both modes run the same code (a lone step never waits or batches), so the gap between those two rows is this "
    "machine's noise. With several edges stepping at once, one pass of the base over all their rows serves more steps per second "
    "than a pass per edge, and each edge waits less for its step, even on these two shared CPU cores: the batched matrix products "
    "are larger and the sessions' threads contend less for the cores. A GPU base is expected to gain more (one pass over many edges' rows costs "
    "little more than one edge's; not measured here: no GPU on this machine). Batching stays off by default "
    "(`split.max_batch_edges=1`): a batch moves at the pace of its slowest edge, which edges on very different links do not "
    "want. Set `split.max_batch_edges` to the number of edges for a cloud that serves several alike edges at once."
)


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def trial(model, edges, data_rows, run, split, steps: int, cloud_device: str = "") -> dict:
    """All ``len(edges)`` edges step at once; throughput, latencies, batch sizes."""
    from dpeft.split.cloud import CloudModel
    from dpeft.split.service import CloudService, handshake
    from dpeft.transport.split_stream import EdgeConnection, SplitServer

    n = len(edges)
    service = CloudService(
        CloudModel(copy.deepcopy(model), device=torch.device(cloud_device) if cloud_device else None), run, split
    )
    server = SplitServer(service.handle, "127.0.0.1:0", max_sessions=n + 2).start()
    conns = [EdgeConnection(server.address, patience_s=10) for _ in range(n)]
    lat: list[list[float]] = [[] for _ in range(n)]
    errors: list[BaseException] = []
    start = threading.Barrier(n + 1)
    try:
        for k, c in enumerate(conns):
            handshake(c.channel, f"edge{k}").tensors({})

        def work(k: int) -> None:
            try:
                batches = data_rows[k]
                b = batches[0]
                edges[k].step(conns[k].channel, b["input_ids"], b["attention_mask"], b["labels"], train=True)  # warm-up
                start.wait()
                for b in batches[1 : steps + 1]:
                    st, _ = edges[k].step(conns[k].channel, b["input_ids"], b["attention_mask"], b["labels"], train=True)
                    lat[k].append(st.wall_s)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                start.abort()

        threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(n)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        if errors:
            raise errors[0]
    finally:
        for c in conns:
            c.leave(grace_s=2)
        server.stop(0.5)
    flat = [x for per in lat for x in per]
    sizes = service.batcher.batch_sizes if service.batcher is not None else [1]
    return {
        "steps_s": len(flat) / wall,
        "median": statistics.median(flat),
        "p95": _pct(flat, 0.95),
        "edges_per_batch": sum(sizes) / len(sizes),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 steps, 1 and 4 edges, one repetition (does not write RESULTS.md)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per edge (after one warm-up step)")
    ap.add_argument("--edges", default="1,4,16")
    ap.add_argument("--reps", type=int, default=2, help="repetitions of each (edges, mode) pair, interleaved")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=16)
    ap.add_argument("--window-ms", type=float, default=5.0)
    ap.add_argument("--cloud-device", default="", help="device of the cloud's base (e.g. cuda); default: CPU")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the process (cloud and edges share them)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from dpeft.adapters import build_model, extract_state
    from dpeft.config import AdapterConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
    from dpeft.data import load_dataset, tokenize
    from dpeft.split.config import SplitConfig
    from dpeft.split.edge import EdgeModel

    counts = [1, 4] if args.quick else [int(x) for x in args.edges.split(",")]
    steps = 2 if args.quick else args.steps
    reps = 1 if args.quick else args.reps
    load0 = os.getloadavg()[0]
    t_start = time.time()
    model_cfg = ModelConfig(max_length=args.max_length)
    run = RunConfig(model=model_cfg, train=TrainConfig(loss="cross_entropy", lr=2e-3, batch_size=args.batch_size))
    bundle = build_model(model_cfg, AdapterConfig(), 2, 0)
    most = max(counts)
    per_edge = (steps + 1) * args.batch_size
    train, _ = load_dataset(DataConfig(max_train_examples=most * per_edge, test_examples=8), 0)
    data = tokenize(bundle.tokenizer, train.texts, train.labels, args.max_length)
    rows = [
        [
            data.batch(list(range(k * per_edge + s * args.batch_size, k * per_edge + (s + 1) * args.batch_size)))
            for s in range(steps + 1)
        ]
        for k in range(most)
    ]
    state0 = extract_state(bundle.model)
    edges = []
    for _ in range(most):
        e = EdgeModel(copy.deepcopy(bundle.model), run.train)
        e.drop_body()
        edges.append(e)
    modes = {
        "one at a time": SplitConfig(federated=False, max_batch_edges=1),
        "batched": SplitConfig(federated=False, max_batch_edges=16, batch_window_ms=args.window_ms),
    }
    results: dict[tuple[int, str], list[dict]] = {}
    for n in counts:
        for rep in range(reps):
            order = list(modes) if rep % 2 == 0 else list(reversed(modes))
            for mode in order:
                for e in edges[:n]:
                    e.load(state0)
                r = trial(bundle.model, edges[:n], rows, run, modes[mode], steps, args.cloud_device)
                results.setdefault((n, mode), []).append(r)
                print(
                    f"  {n:2d} edges, {mode:13s}: {r['steps_s']:6.1f} steps/s, median {1000 * r['median']:.0f} ms, p95 {1000 * r['p95']:.0f} ms, "
                    f"{r['edges_per_batch']:.1f} edges/batch ({time.time() - t_start:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    lines = [
        "| edges | serving | steps/s served | vs one at a time | per-edge step median ms | p95 ms | edges per batch (mean) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n in counts:
        base = statistics.median(r["steps_s"] for r in results[(n, "one at a time")])
        for mode in modes:
            rs = results[(n, mode)]
            sps = statistics.median(r["steps_s"] for r in rs)
            med = statistics.median(r["median"] for r in rs)
            p95 = statistics.median(r["p95"] for r in rs)
            epb = statistics.mean(r["edges_per_batch"] for r in rs)
            lines.append(f"| {n} | {mode} | {sps:.1f} | {sps / base:.2f}x | {1000 * med:.0f} | {1000 * p95:.0f} | {epb:.1f} |")
    table = "\n".join(lines)
    print(table, flush=True)
    elapsed = time.time() - t_start
    if args.quick:
        return 0
    body = "\n\n".join(
        [
            "Written by `python benchmarks/split_batching.py`. "
            + machine_note()
            + f" Total {elapsed / 60:.1f} min; load average {load0:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end: other jobs share this machine, so absolute times are noisy; both modes ran interleaved in the one "
            "invocation and each number is the median of the repetitions.",
            f"all-MiniLM-L6-v2 (6 layers, LoRA r=8 on query/value), batch {args.batch_size} per edge, sequences up to {args.max_length} tokens "
            f"(each edge its own rows, so lengths differ), {steps} timed steps per edge after one warm-up step, {reps} repetitions, fp32 wire, "
            f"{args.threads} torch threads. Cloud and edges share one process and its cores (each edge a thread with its own loopback gRPC stream). "
            f"One at a time: `split.max_batch_edges=1` (each step its own pass of the base); batched: `max_batch_edges=16`, `batch_window_ms={args.window_ms:g}`. "
            "Latency is one step as the edge sees it (cloud compute, every round trip and the wait for the batch included).",
            table,
            NOTE,
        ]
    )
    write_section("split_batching", "Split mode: one cloud serving many edges, batched vs one at a time", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
