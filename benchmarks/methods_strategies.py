"""LoRA-aware aggregation strategies under heterogeneous client ranks, on the default task.

Runs ``dpeft simulate`` (MiniLM + LoRA, rotten tomatoes, IID split) once per strategy, with the
same rounds, clients, local steps and seed for all:

- ``flexlora`` and ``hetlora`` take heterogeneous client ranks, cycled over client ids
  (``--ranks``, default 2/4/8/16), with ``adapter.r`` = the largest;
- ``fedavg``, ``lora_fair``, ``ffa_lora`` and ``flora`` need one rank for every client: they run
  homogeneous at ``adapter.r`` = ``--homogeneous-rank`` (default 8, about the mean of the
  heterogeneous ranks).

``adapter.alpha`` is 2 x ``adapter.r`` in every run, so ``alpha / r`` (the LoRA scale) is the
same. Reports per strategy the eval accuracy after every round, the final accuracy and loss,
bytes down/up per round and wall seconds per round, and writes the
``methods_strategies`` section of benchmarks/RESULTS.md.

    python benchmarks/methods_strategies.py                  # the table (about 15 min on a loaded 2-core machine)
    python benchmarks/methods_strategies.py --quick          # a smoke run with tiny settings
    python benchmarks/methods_strategies.py --strategies hetlora lora_fair --no-write

``main(argv)`` is the entry point (``benchmarks/methods.py --table strategies`` calls it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results import machine_note, write_section  # noqa: E402

STRATEGIES = ("fedavg", "flexlora", "hetlora", "lora_fair", "ffa_lora", "flora")
HETEROGENEOUS = ("flexlora", "hetlora")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument(
        "--ranks", type=int, nargs="+", default=[2, 4, 8, 16], help="client ranks cycled over client ids (flexlora, hetlora)"
    )
    p.add_argument("--homogeneous-rank", type=int, default=8, help="adapter.r of the strategies that need one rank")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=4, help="clients, all sampled every round")
    p.add_argument("--local-steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--train-examples", type=int, default=800)
    p.add_argument("--test-examples", type=int, default=200)
    p.add_argument("--processes", type=int, default=2, help="simulate.processes (worker processes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny smoke settings (2 rounds, 2 clients, 2 steps)")
    p.add_argument("--no-write", action="store_true", help="print the table only, leave RESULTS.md alone")
    p.add_argument("--run-root", type=Path, default=None, help="where the run directories go (default: a temp dir)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.clients, args.local_steps, args.train_examples, args.test_examples = 2, 2, 2, 100, 32
        args.ranks = args.ranks[:2]
    return args


def overrides(strategy: str, args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The ``dpeft simulate`` overrides of one strategy's run."""
    if strategy in HETEROGENEOUS:
        r = max(args.ranks)
        extra = [f"strategy.options={{client_ranks: {list(args.ranks)}}}"]
    else:
        r = args.homogeneous_rank
        extra = []
    return [
        f"run_dir={run_dir}",
        f"seed={args.seed}",
        f"rounds={args.rounds}",
        f"clients={args.clients}",
        f"clients_per_round={args.clients}",
        f"train.local_steps={args.local_steps}",
        f"train.batch_size={args.batch_size}",
        f"train.lr={args.lr}",
        f"model.max_length={args.max_length}",
        f"data.max_train_examples={args.train_examples}",
        f"data.test_examples={args.test_examples}",
        "data.partition=iid",
        f"simulate.processes={args.processes}",
        f"adapter.r={r}",
        f"adapter.alpha={2 * r}",
        f"strategy.name={strategy}",
        *extra,
    ]


def run_one(strategy: str, args: argparse.Namespace, root: Path) -> dict:
    """One simulate run; its metrics rows and the wall time of the whole command."""
    run_dir = root / strategy
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "dpeft_launch.cli", "simulate", "--fresh", *overrides(strategy, args, run_dir)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{strategy}: dpeft simulate exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"rows": rows, "wall_s": wall}


def summarize(strategy: str, result: dict, args: argparse.Namespace) -> dict:
    rows = result["rows"]
    steps = [r for r in rows if r["round"] > 0]
    ranks = f"{'/'.join(map(str, args.ranks))} (hetero)" if strategy in HETEROGENEOUS else f"{args.homogeneous_rank} (all)"
    last = steps[-1] if steps else rows[-1]
    extra = ""
    if strategy == "hetlora":
        extra = f"ranks trained in the last round: {last.get('client_ranks')}, pruned that round: {last.get('hetlora_pruned')}"
    elif strategy == "lora_fair":
        extra = f"residual {last.get('lora_fair_residual_before', 0):.3f} -> {last.get('lora_fair_residual_after', 0):.3f}"
    elif strategy in ("flexlora", "flora"):
        extra = f"truncation error {last.get(f'{strategy}_truncation_error', 0):.3f}"
    return {
        "strategy": strategy,
        "ranks": ranks,
        "acc": [r["eval_accuracy"] for r in rows],
        "final_acc": last["eval_accuracy"],
        "final_loss": last["eval_loss"],
        "down": sum(r["bytes_down"] for r in steps) / max(1, len(steps)),
        "up": sum(r["bytes_up"] for r in steps) / max(1, len(steps)),
        "round_s": sum(r["wall_s"] for r in steps) / max(1, len(steps)),
        "extra": extra,
    }


def table(summaries: list[dict]) -> str:
    lines = [
        "| strategy | client ranks | eval accuracy per round (round 0 = untrained) | final loss | KiB down / round | KiB up / round | s / round | notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        acc = " → ".join(f"{a:.3f}" for a in s["acc"])
        lines.append(
            f"| `{s['strategy']}` | {s['ranks']} | {acc} | {s['final_loss']:.4f} | {s['down'] / 1024:.0f} | {s['up'] / 1024:.0f} | {s['round_s']:.1f} | {s['extra']} |"
        )
    return "\n".join(lines)


def load_note() -> str:
    try:
        one, five, _ = os.getloadavg()
        return f"load average {one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} cores when the table was written (shared, noisy machine)"
    except OSError:  # pragma: no cover
        return "load unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.run_root or Path(tempfile.mkdtemp(prefix="dpeft-strategies-"))
    t0 = time.perf_counter()
    summaries = []
    for strategy in args.strategies:
        print(f"running {strategy} ...", flush=True)
        summaries.append(summarize(strategy, run_one(strategy, args, root), args))
        print(table(summaries[-1:]).splitlines()[-1], flush=True)
    total = time.perf_counter() - t0
    body = table(summaries)
    settings = (
        f"{args.clients} clients (all sampled every round), {args.rounds} rounds, {args.local_steps} local steps of batch "
        f"{args.batch_size} at lr {args.lr}, {args.max_length} tokens, {args.train_examples} training / {args.test_examples} test "
        f"examples, IID, seed {args.seed}, `simulate.processes={args.processes}`; adapter.alpha = 2 x adapter.r in every run."
    )
    text = "\n\n".join(
        [
            "`python benchmarks/methods_strategies.py` (MiniLM + LoRA on rotten tomatoes, `dpeft simulate`). "
            "flexlora and hetlora run heterogeneous client ranks (cycled over client ids, adapter.r = the largest); "
            "fedavg, lora_fair, ffa_lora and flora need one rank for all clients and run homogeneous at "
            f"r = {args.homogeneous_rank}. Default options otherwise (hetlora: norm weighting, self-pruning on; "
            "lora_fair: cosine similarity, lam 0.01).",
            settings + (" Quick (smoke) settings." if args.quick else ""),
            body,
            f"{machine_note()} {load_note()}; the whole table took {total / 60:.1f} min. Small runs: accuracy "
            "differences of a few points between strategies are within run-to-run noise at this size; "
            "bytes per round and the rank behaviour are what the table shows reliably.",
        ]
    )
    print(text)
    if not args.no_write:
        write_section("methods_strategies", "Methods: LoRA-aware aggregation under heterogeneous ranks", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
