"""Streaming FedAvg aggregation: fold throughput vs a plain ``torch.add_`` baseline, and peak
memory vs the number of folded updates.

Throughput: ``StreamingWeightedMean.add`` (what the coordinator runs per accepted update: a
float64 accumulator, weighted by examples) folds K fp32 updates of ``--update-mib`` MiB (64
tensors); GB/s = bytes of updates folded per second, timing the ``add`` calls as the baseline
times its ``add_`` calls (a whole round, building the aggregator and ``result()`` included, is
reported too), for the default float64 and the opt-in float32 accumulator. Baseline in the same
run: ``acc.add_(x, alpha=w)`` into an fp32 accumulator over the same tensors (the
memory-bandwidth floor of a weighted sum), plus the mixed-dtype float64 variant for reference.

Memory: each N runs in a fresh subprocess that makes N updates one at a time (as uploads
arrive), folds each and drops it; the process's peak RSS (``ru_maxrss``) is reported for the
streaming aggregator and for keeping every update and averaging at the end.

    python benchmarks/aggregation.py [--update-mib 64] [--folds 8] [--mem-update-mib 16] [--no-write]
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
    """GB/s of fp32 updates folded (best of ``repeats``; every variant runs once per repeat, interleaved).

    ``streaming``/``streaming_fp32``: the ``add`` calls alone (the aggregator is built before the
    clock starts, as the baselines' accumulators are); ``*_round``: building the aggregator
    (zeroed accumulator), every ``add`` and ``result()`` (the division into fp32), i.e. one round.
    """
    import torch

    from dpeft.strategies.aggregate import StreamingWeightedMean
    from dpeft.strategies.base import ClientUpdate

    numel = update_mib * MiB // 4
    updates = [_state(numel, 64, s) for s in range(folds)]
    nbytes = folds * sum(t.numel() * 4 for t in updates[0].tensors.values())
    keys = ["streaming", "streaming_round", "streaming_fp32", "streaming_fp32_round", "add_fp32", "add_fp64"]
    best = dict.fromkeys(keys, float("inf"))

    def streaming(name: str, dtype: torch.dtype) -> None:
        t0 = time.perf_counter()
        agg = StreamingWeightedMean(updates[0], dtype=dtype)
        t1 = time.perf_counter()
        for i, u in enumerate(updates):
            agg.add(ClientUpdate(i, u, 100 + i, {}))
        t2 = time.perf_counter()
        agg.result()
        t3 = time.perf_counter()
        best[name] = min(best[name], t2 - t1)
        best[name + "_round"] = min(best[name + "_round"], t3 - t0)

    for _ in range(repeats):
        streaming("streaming", torch.float64)
        acc = OrderedDict((k, torch.zeros_like(v)) for k, v in updates[0].items())
        t0 = time.perf_counter()
        for i, u in enumerate(updates):
            for k, a in acc.items():
                a.add_(u.tensors[k], alpha=float(100 + i))
        best["add_fp32"] = min(best["add_fp32"], time.perf_counter() - t0)
        acc64 = OrderedDict((k, torch.zeros(v.shape, dtype=torch.float64)) for k, v in updates[0].items())
        t0 = time.perf_counter()
        for i, u in enumerate(updates):
            for k, a in acc64.items():
                a.add_(u.tensors[k], alpha=float(100 + i))  # mixed dtype: torch casts each tensor into a float64 temporary first
        best["add_fp64"] = min(best["add_fp64"], time.perf_counter() - t0)
        del acc, acc64
        streaming("streaming_fp32", torch.float32)
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
                capture_output=True,
                text=True,
                check=True,
                timeout=1800,
            )
            res[mode] = json.loads(proc.stdout.strip().splitlines()[-1])["peak"]
        out.append((n, res["streaming"], res["keep_all"]))
        print(
            f"N={n}: streaming growth {res['streaming'] / MiB:.0f} MiB, keep-all {res['keep_all'] / MiB if res['keep_all'] else float('nan'):.0f} MiB",
            flush=True,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update-mib", type=int, default=64)
    parser.add_argument("--folds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mem-update-mib", type=int, default=16)
    parser.add_argument("--mem-ns", default="1,10,100,1000", help="N values of the memory table; empty = skip it")
    parser.add_argument("--keep-max", type=int, default=100, help="largest N for the keep-every-update comparison")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="streaming", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md alone")
    args = parser.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child, args.mem_update_mib, args.mode)
        return
    import torch

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    tp = throughput(args.update_mib, args.folds, args.repeats)
    print(tp, flush=True)
    mem = memory([int(x) for x in args.mem_ns.split(",")], args.mem_update_mib, args.keep_max) if args.mem_ns else []
    base = tp["add_fp32"]
    lines = [
        f"`python benchmarks/aggregation.py --update-mib {args.update_mib} --folds {args.folds} --mem-update-mib {args.mem_update_mib}`",
        "",
        machine_note()
        + f" torch threads {args.threads}; 1-min load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.",
        "",
        f"Fold throughput, {args.folds} fp32 updates of {args.update_mib} MiB (64 tensors), best of {args.repeats} (all rows interleaved in each repeat):",
        "",
        "| aggregator | GB/s of updates folded | vs `add_` fp32 baseline |",
        "| --- | --- | --- |",
        f"| `StreamingWeightedMean.add`, float64 accumulator (default) | {tp['streaming']:.2f} | **{tp['streaming'] / base:.2f}** |",
        f"| same, whole round: build (zeroed accumulator) + adds + `result()` | {tp['streaming_round']:.2f} | {tp['streaming_round'] / base:.2f} |",
        f"| `StreamingWeightedMean.add`, float32 accumulator (`strategy.options.accumulator: float32`) | {tp['streaming_fp32']:.2f} | {tp['streaming_fp32'] / base:.2f} |",
        f"| same, whole round | {tp['streaming_fp32_round']:.2f} | {tp['streaming_fp32_round'] / base:.2f} |",
        f"| baseline: `acc.add_(x, alpha=w)`, fp32 accumulator | {base:.2f} | 1.00 |",
        f"| reference: `acc64.add_(x, alpha=w)`, float64 accumulator (mixed dtype: a float64 temporary per tensor) | {tp['add_fp64']:.2f} | {tp['add_fp64'] / base:.2f} |",
        "",
        "A float64 fold moves 20 bytes per element (the fp32 update read, the float64 sum read and written) against "
        "`add_`'s 12, so even a fused kernel would stop near 0.6x; torch on CPU has no fused mixed-dtype add, so the "
        "fold casts each block of the update into a cache-resident float64 scratch, then adds it (two kernels, "
        "the cast's read of the update does not overlap the add's traffic). The float32 accumulator is the "
        "baseline's own `add_` (its rounding depends on the arrival order; see the strategies page of the documentation).",
    ]
    if mem:
        lines += [
            "",
            f"Peak RSS growth (over the process after imports) while folding N updates of {args.mem_update_mib} MiB, made one at a time:",
            "",
            "| N updates | streaming (fold and drop) | keep every update, average at the end |",
            "| --- | --- | --- |",
        ]
    for n, s, k in mem:
        lines.append(f"| {n} | {s / MiB:,.0f} MiB | {f'{k / MiB:,.0f} MiB' if k else 'not run'} |")
    if mem:
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
