"""Lean simulation: memory and time per round with 10, 100 and 1,000 virtual clients.

``dpeft simulate`` with N virtual clients (IID split of the whole Rotten Tomatoes training set,
so 1,000 clients get ~12 examples each), 10 sampled per round, tiny local training. Memory is
the PSS summed over the whole process tree (coordinator + worker processes), sampled every
0.5 s, peak reported; time per round is the mean ``wall_s`` of rounds 2..R in ``metrics.jsonl``
(round 1 includes the workers' start-up).

    python benchmarks/scale.py [--clients 10,100,1000] [--rounds 3] [key=value ...]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="10,100,1000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    base = [
        f"rounds={args.rounds}",
        "clients_per_round=10",
        "train.local_steps=2",
        "train.batch_size=8",
        "data.partition=iid",
        "data.test_examples=200",
        *args.overrides,
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(c) for c in args.clients.split(",")]:
            run_dir = os.path.join(tmp, f"n{n}")
            cmd = [sys.executable, "-m", "dpeft_launch.cli", "simulate", "--fresh", f"run_dir={run_dir}", f"clients={n}", *base]
            proc, wall, pss = run_measured(cmd, env=env)
            if proc.returncode != 0:
                logs = "".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(Path(run_dir, "logs").glob("*.log")))
                raise SystemExit(f"clients={n} failed:\n{proc.stderr[-3000:]}\n{logs}")
            metrics = [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
            # round 1 also waits for the worker processes to load the model: steady state is rounds 2..R
            trained = [r for r in metrics if r["round"] > 1] or [r for r in metrics if r["round"] > 0]
            per_round = sum(r["wall_s"] for r in trained) / len(trained)
            rows.append((n, pss.peak, pss.peak_procs, per_round, wall))
            print(
                f"clients={n}: peak PSS {pss.peak / MiB:.0f} MiB over {pss.peak_procs} processes, {per_round:.2f} s/round, {wall:.0f} s total",
                flush=True,
            )
    ref = rows[0][1]
    table = [
        "| virtual clients | peak PSS, whole process tree | vs the first row | processes | time per round | wall time, start to finish |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for n, peak, procs, per_round, wall in rows:
        table.append(f"| {n:,} | {peak / MiB:,.0f} MiB | **{peak / ref:.3f}** | {procs} | {per_round:.2f} s | {wall:.0f} s |")
    text = "\n".join(
        [
            f"`python benchmarks/scale.py --clients {args.clients} --rounds {args.rounds}{' ' + ' '.join(args.overrides) if args.overrides else ''}`",
            "",
            machine_note() + f" 1-min load average at the end {os.getloadavg()[0]:.1f}.",
            "",
            f"`dpeft simulate clients=N {' '.join(base)}` (2 worker processes, 1 torch thread each). PSS summed over "
            "the coordinator and its worker processes, sampled every 0.5 s, peak.",
            "",
            *table,
            "",
            "A virtual client is its data indices only (no optimizer state kept across rounds unless "
            "`train.keep_optimizer_state`; error-feedback residuals and personal tensors live on disk, one file per client).",
        ]
    )
    if not args.no_write:
        write_section("scale", "Scale: memory and time per round vs number of virtual clients", text)
    print(text)


if __name__ == "__main__":
    main()
