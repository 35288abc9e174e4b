"""Worker memory vs glibc's allocator settings, on the default task.

``dpeft simulate rounds=R clients=10`` (the default task: 2 forked worker processes, one torch
thread each) four times in one invocation:

1. glibc's defaults (``GLIBC_TUNABLES=glibc.malloc.tcache_count=7``, glibc's own value);
2. only a fixed 2 MiB mmap threshold in the workers (``train.worker_mmap_threshold_kib=2048``);
3. dpeft's defaults: glibc's tcache off (the CLI starts itself with it), no threshold;
4. both;
5. a 1 MiB threshold with the tcache off (the leaner, slower end).

Reports the peak PSS of the process tree, the largest worker USS and the mean round time
(rounds 1..R), each as a ratio to the first row.

    python benchmarks/worker_memory.py [--rounds 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from procmem import run_measured  # noqa: E402
from results import machine_note, write_section  # noqa: E402

MiB = 1 << 20
GLIBC_DEFAULT = "glibc.malloc.tcache_count=7"
SETTINGS = [
    ("glibc defaults", GLIBC_DEFAULT, "null"),
    ("`train.worker_mmap_threshold_kib: 2048` only", GLIBC_DEFAULT, "2048"),
    ("dpeft defaults: tcache off (`train.worker_mmap_threshold_kib: null`)", None, "null"),
    ("`train.worker_mmap_threshold_kib: 2048` + tcache off", None, "2048"),
    ("`train.worker_mmap_threshold_kib: 1024` + tcache off", None, "1024"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, tunables, threshold) in enumerate(SETTINGS):
            env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
            env.pop("GLIBC_TUNABLES", None)
            if tunables:
                env["GLIBC_TUNABLES"] = tunables
            run_dir = os.path.join(tmp, f"run{i}")
            cmd = [
                sys.executable,
                "-m",
                "dpeft_launch.cli",
                "simulate",
                "--fresh",
                f"run_dir={run_dir}",
                f"rounds={args.rounds}",
                "clients=10",
                f"train.worker_mmap_threshold_kib={threshold}",
                *args.overrides,
            ]
            proc, wall, mem = run_measured(cmd, env=env, interval_s=0.3)
            if proc.returncode != 0:
                raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
            metrics = [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
            trained = [r for r in metrics if r["round"] > 0]
            per_round = sum(r["wall_s"] for r in trained) / len(trained)
            rows.append((label, mem.peak, mem.peak_child_uss, per_round, metrics[-1]["eval_accuracy"]))
            print(
                f"{label}: peak PSS {mem.peak / MiB:.0f} MiB, worker USS {mem.peak_child_uss / MiB:.0f} MiB, {per_round:.2f} s/round",
                flush=True,
            )
    ref = rows[0]
    table = [
        "| setting | peak PSS, process tree | vs glibc defaults | largest worker USS | vs glibc defaults | time per round | vs glibc defaults | final accuracy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, pss, uss, per_round, acc in rows:
        table.append(
            f"| {label} | {pss / MiB:,.0f} MiB | **{pss / ref[1]:.3f}** | {uss / MiB:,.0f} MiB | {uss / ref[2]:.3f} | {per_round:.2f} s | **{per_round / ref[3]:.3f}** | {acc:.4f} |"
        )
    text = "\n".join(
        [
            f"`python benchmarks/worker_memory.py --rounds {args.rounds}{' ' + ' '.join(args.overrides) if args.overrides else ''}`",
            "",
            machine_note() + f" 1-min load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.",
            "",
            f"`dpeft simulate rounds={args.rounds} clients=10` (the default task: 2 worker processes forked from the coordinator, "
            "1 torch thread each, 4 clients per round, 20 local steps of batch 16). PSS summed over the process tree and the largest "
            "USS of a worker, sampled every 0.3 s, peaks; time per round is the mean `wall_s` of rounds 1..R.",
            "",
            *table,
            "",
            "glibc keeps small freed blocks in a per-thread cache (tcache) that the heap cannot coalesce around, and its "
            "mmap threshold grows to the largest block freed, so every activation ends up in the heap: a worker's heap "
            "settles near twice its live activations. The tcache is a start-up tunable, so dpeft's training commands start "
            "themselves again once with it off. A fixed mmap threshold (`train.worker_mmap_threshold_kib`, off by default) "
            'hands large blocks back at once, paid for in page faults when they are allocated again (documentation: "GPUs, precision and memory", worker memory).',
        ]
    )
    if not args.no_write:
        write_section("worker_memory", "Worker memory vs glibc's allocator settings", text)
    print(text)


if __name__ == "__main__":
    main()
