"""Streaming FedAvg aggregation: fold throughput vs a plain ``torch.add_`` baseline, and peak
memory vs the number of folded updates.

Throughput: ``StreamingWeightedMean.add`` (what the coordinator runs per accepted update: a
float64 accumulator, weighted by examples) folds K fp32 updates of ``--update-mib`` MiB (64
tensors); GB/s = bytes of updates folded per second. Baseline in the same run: ``acc.add_(x,
alpha=w)`` into an fp32 accumulator over the same tensors (the memory-bandwidth floor of a
weighted sum), plus the float64 variant of that baseline for reference.

Memory: each N runs in a fresh subprocess that makes N updates one at a time (as uploads
arrive), folds each and drops it; the process's peak RSS (``ru_maxrss``) is reported for the
streaming aggregator and for keeping every update and averaging at the end.

    python benchmarks/aggregation.py [--update-mib 64] [--folds 8] [--mem-update-mib 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results import machine_note, write_section  # noqa: E402

MiB = 1 << 20


def _state(numel: int, tensors: int, seed: int):
    import torch

    from dpeft.state import AdapterState

    g = torch.Generator().manual_seed(seed)
    per = numel // tensors
    return AdapterState(OrderedDict((f"layer.{i}.lora_A.weight", torch.randn(per, generator=g)) for i in range(tensors)))


def throughput(update_mib: int, folds: int, repeats: int) -> dict[str, float]:
    import torch

    from dpeft.strategies.aggregate import StreamingWeightedMean
    from dpeft.strategies.base import ClientUpdate

    numel = update_mib * MiB // 4
    updates = [_state(numel, 64, s) for s in range(folds)]
    nbytes = folds * sum(t.numel() * 4 for t in updates[0].tensors.values())
    best = {"streaming": float("inf"), "add_fp32": float("inf"), "add_fp64": float("inf")}
    for _ in range(repeats):
        t0 = time.perf_counter()
        agg = StreamingWeightedMean(updates[0])
        for i, u in enumerate(updates):
            agg.add(ClientUpdate(i, u, 100 + i, {}))
        agg.result()
        best["streaming"] = min(best["streaming"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        acc = OrderedDict((k, torch.zeros_like(v)) for k, v in updates[0].items())
        for i, u in enumerate(updates):
            for k, a in acc.items():
                a.add_(u.tensors[k], alpha=float(100 + i))
        best["add_fp32"] = min(best["add_fp32"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        acc64 = OrderedDict((k, torch.zeros(v.shape, dtype=torch.float64)) for k, v in updates[0].items())
        for i, u in enumerate(updates):
            for k, a in acc64.items():
                a.add_(u.tensors[k], alpha=float(100 + i))  # mixed-dtype add_, no temporary copy
        best["add_fp64"] = min(best["add_fp64"], time.perf_counter() - t0)
    return {k: nbytes / v / 1e9 for k, v in best.items()}


def memory_child(n: int, update_mib: int, mode: str) -> None:
    """Fold ``n`` updates made one at a time; print the peak RSS growth over the start, in bytes.

    RSS is sampled after every update is made and after every fold (the moments of peak use);
    the growth is measured from just before the first update is made (after imports).
    """
    import gc

    import psutil
    import torch

    from dpeft.strategies.aggregate import StreamingWeightedMean, weighted_mean
    from dpeft.strategies.base import ClientUpdate

    torch.set_num_threads(1)
    proc = psutil.Process()
    numel = update_mib * MiB // 4
    gc.collect()
    before = proc.memory_info().rss
    peak = before

    def sample() -> None:
        nonlocal peak
        peak = max(peak, proc.memory_info().rss)

    if mode == "streaming":
        agg = None
        for i in range(n):
            u = _state(numel, 16, i)
            sample()
            if agg is None:
                agg = StreamingWeightedMean(u)
            agg.add(ClientUpdate(i, u, 10, {}))
            sample()
            del u
        agg.result()
        sample()
    else:
        kept = []
        for i in range(n):
            kept.append(_state(numel, 16, i))
            sample()
        weighted_mean(kept, [10.0] * n)
        sample()
    print(json.dumps({"peak": peak - before, "before": before}))


def memory(ns: list[int], update_mib: int, keep_max: int) -> list[tuple[int, float, float | None]]:
    out = []
    for n in ns:
        res = {}
        for mode in ("streaming", "keep_all"):
            if mode == "keep_all" and n > keep_max:
                res[mode] = None
                continue
            proc = subprocess.run(
                [sys.executable, __file__, "--memory-child", str(n), "--mem-update-mib", str(update_mib), "--mode", mode],
                capture_output=True, text=True, check=True, timeout=1800,
            )
            res[mode] = json.loads(proc.stdout.strip().splitlines()[-1])["peak"]
        out.append((n, res["streaming"], res["keep_all"]))
        print(f"N={n}: streaming growth {res['streaming'] / MiB:.0f} MiB, keep-all {res['keep_all'] / MiB if res['keep_all'] else float('nan'):.0f} MiB", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update-mib", type=int, default=64)
    parser.add_argument("--folds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mem-update-mib", type=int, default=16)
    parser.add_argument("--mem-ns", default="1,10,100,1000")
    parser.add_argument("--keep-max", type=int, default=100, help="largest N for the keep-every-update comparison")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="streaming", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child, args.mem_update_mib, args.mode)
        return
    import torch

    torch.set_num_threads(args.threads)
    tp = throughput(args.update_mib, args.folds, args.repeats)
    print(tp, flush=True)
    mem = memory([int(x) for x in args.mem_ns.split(",")], args.mem_update_mib, args.keep_max)
    lines = [
        f"`python benchmarks/aggregation.py --update-mib {args.update_mib} --folds {args.folds} --mem-update-mib {args.mem_update_mib}`",
        "",
        machine_note() + f" torch threads {args.threads}; 1-min load average at the end {os.getloadavg()[0]:.1f}.",
        "",
        f"Fold throughput, {args.folds} fp32 updates of {args.update_mib} MiB (64 tensors), best of {args.repeats}:",
        "",
        "| aggregator | GB/s of updates folded | vs `add_` fp32 baseline |",
        "| --- | --- | --- |",
        f"| `StreamingWeightedMean.add` (float64 accumulator) | {tp['streaming']:.2f} | **{tp['streaming'] / tp['add_fp32']:.2f}** |",
        f"| baseline: `acc.add_(x, alpha=w)`, fp32 accumulator | {tp['add_fp32']:.2f} | 1.00 |",
        f"| reference: `acc64.add_(x, alpha=w)`, float64 accumulator, no cast copy | {tp['add_fp64']:.2f} | {tp['add_fp64'] / tp['add_fp32']:.2f} |",
        "",
        f"Peak RSS growth (over the process after imports) while folding N updates of {args.mem_update_mib} MiB, made one at a time:",
        "",
        "| N updates | streaming (fold and drop) | keep every update, average at the end |",
        "| --- | --- | --- |",
    ]
    for n, s, k in mem:
        lines.append(f"| {n} | {s / MiB:,.0f} MiB | {f'{k / MiB:,.0f} MiB' if k else 'not run'} |")
    lines += [
        "",
        "The streaming aggregate holds one float64 copy of the adapter (2x an fp32 update) whatever N is, "
        "plus the update in flight; keeping every update grows linearly.",
    ]
    text = "\n".join(lines)
    if not args.no_write:
        write_section("aggregation", "Aggregation: streaming FedAvg vs add_ bandwidth, memory vs updates folded", text)
    print(text)


if __name__ == "__main__":
    main()
