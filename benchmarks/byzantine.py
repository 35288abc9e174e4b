"""Robust aggregation under Byzantine clients, on the default task.

Runs ``dpeft simulate`` on the default task (MiniLM + LoRA r=8 on query/value, Rotten Tomatoes,
10 clients on a Dirichlet(1.0) split, 20 local steps, the default loss and optimizer) with
every client sampled every round, so each round holds both attackers and the robust rules see
the same population every time:

- ``fedavg`` without attackers (the clean reference);
- ``fedavg``, ``median``, ``trimmed_mean`` (beta 0.2), ``krum`` (f 2) and ``multi_krum`` (f 2)
  with 2 of the 10 clients sending garbage: their real update times 100 with an independent
  random sign per element (``simulate.byzantine_clients``, ``simulate.byzantine_scale``,
  ``simulate.byzantine_random_sign``: the worker corrupts the update it would have sent, so
  the garbage crosses the wire like any other update and passes the schema checks).

Reports the accuracy after every round, the final and best accuracy and the difference to the
clean run. Writes the ``byzantine`` section of benchmarks/RESULTS.md and
benchmarks/byzantine.png (accuracy against rounds).

    python benchmarks/byzantine.py                 # the full comparison (CPU heavy, ~30 min on 2 cores)
    python benchmarks/byzantine.py --quick         # a smoke run with tiny settings
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results import machine_note, write_section  # noqa: E402

# (label, strategy, options, attacked)
RUNS = (
    ("fedavg, clean", "fedavg", "{}", False),
    ("fedavg", "fedavg", "{}", True),
    ("median", "median", "{}", True),
    ("trimmed_mean (beta 0.2)", "trimmed_mean", "{beta: 0.2}", True),
    ("krum (f 2)", "krum", "{f: 2}", True),
    ("multi_krum (f 2)", "multi_krum", "{f: 2}", True),
)


def run_one(
    label: str, strategy: str, options: str, attacked: bool, args: argparse.Namespace, out_dir: Path
) -> tuple[list[dict], float]:
    run_dir = out_dir / label.split(" ")[0].rstrip(",") / ("attacked" if attacked else "clean")
    cmd = [
        sys.executable, "-m", "dpeft_launch.cli", "simulate", "--fresh",
        f"run_dir={run_dir}", f"seed={args.seed}", f"rounds={args.rounds}", f"clients={args.clients}",
        f"clients_per_round={args.clients}", f"strategy.name={strategy}", f"strategy.options={options}",
    ]  # fmt: skip
    if attacked:
        cmd += [
            f"simulate.byzantine_clients=[{', '.join(str(c) for c in args.attackers)}]",
            f"simulate.byzantine_scale={args.scale}",
            "simulate.byzantine_random_sign=true",
        ]
    cmd += args.extra
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    print(f"[{label}{' + attackers' if attacked else ''}] {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    took = time.time() - t0
    print(f"[{label}] done in {took:.0f}s", file=sys.stderr, flush=True)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()], took


def accuracies(rows: list[dict]) -> list[tuple[int, float]]:
    """(round, eval accuracy) pairs, round 0 being the untrained adapter."""
    return [(r["round"], r["eval_accuracy"]) for r in rows if r.get("eval_accuracy") is not None]


def plot(results: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, rows in results.items():
        pts = accuracies(rows)
        style = "--" if "clean" in label else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("global eval accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def section(results: dict[str, list[dict]], times: dict[str, float], args: argparse.Namespace, png: str) -> str:
    clean_label = next(k for k in results if "clean" in k)
    clean_final = accuracies(results[clean_label])[-1][1]
    rounds = [r for r, _ in accuracies(results[clean_label])]
    lines = [
        f"Default task (MiniLM + LoRA r=8, Rotten Tomatoes, {args.clients} clients on the default Dirichlet split, default local "
        f"steps and optimizer), all {args.clients} clients every round, {args.rounds} rounds, seed {args.seed}. Attackers: clients "
        f"{args.attackers} send their real update x{args.scale:g} with an independent random sign per element. Accuracy on the "
        "default held-out set after each round; 'vs clean' is the final accuracy minus clean FedAvg's.",
        "",
        "| strategy | attackers | " + " | ".join(f"r{r}" for r in rounds) + " | final | vs clean | wall s |",
        "| --- | --- | " + " | ".join("---" for _ in rounds) + " | --- | --- | --- |",
    ]
    for label, rows in results.items():
        acc = dict(accuracies(rows))
        final = accuracies(rows)[-1][1]
        cells = " | ".join(f"{acc[r]:.3f}" if r in acc else "-" for r in rounds)
        attacked = "none" if "clean" in label else f"{len(args.attackers)} of {args.clients}"
        name = label.replace(", clean", "")
        lines.append(
            f"| {name} | {attacked} | {cells} | {final:.3f} | {100 * (final - clean_final):+.1f} pts | {times[label]:.0f} |"
        )
    lines += [
        "",
        f"The median, the trimmed mean (beta 0.2 trims {int(0.2 * args.clients)} of {args.clients} per end and coordinate) and "
        "Krum / Multi-Krum (f 2 needs at least 2f+3 = 7 updates per round, hence every client every round) are dpeft's "
        "robust rules; "
        "with x100 garbage one attacker alone is enough to wreck the weighted mean. Krum keeps a single client's update "
        "per round, which on a non-IID split costs accuracy even without attackers; Multi-Krum averages the n - f best.",
        "",
        machine_note()
        + (" Quick (smoke) settings." if args.quick else "")
        + f" Load average at the end: {os.getloadavg()[0]:.1f} (wall times are noisy when other jobs share the cores; accuracies are seeded).",
        "",
        f"![byzantine]({png})",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--attackers", default="3,7", help="comma-separated client ids")
    p.add_argument("--scale", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated strategy names to run (default: all)")
    p.add_argument("--out", default=str(HERE / "runs" / "byzantine"))
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke test of the script, not a measurement)")
    p.add_argument("--no-write", action="store_true", help="print the section (PNG into --out) instead of updating RESULTS.md")
    args = p.parse_args()
    args.attackers = [int(a) for a in args.attackers.split(",") if a.strip()]
    args.extra = []
    if args.quick:
        args.rounds, args.clients, args.attackers = 2, 7, [1, 4]
        args.extra = ["train.local_steps=3", "data.max_train_examples=300", "data.test_examples=64"]
    only = {s for s in args.only.split(",") if s}
    out = Path(args.out)
    results: dict[str, list[dict]] = {}
    times: dict[str, float] = {}
    for label, strategy, options, attacked in RUNS:
        if only and strategy not in only and not (strategy == "fedavg" and not attacked):
            continue
        results[label], times[label] = run_one(label, strategy, options, attacked, args, out)
    png = (out if args.no_write else HERE) / "byzantine.png"
    plot(results, png, f"{len(args.attackers)} of {args.clients} clients send x{args.scale:g} random-sign garbage")
    text = section(results, times, args, png.name)
    if args.no_write:
        print(text)
    else:
        write_section("byzantine", "Robust aggregation: 2 of 10 clients send garbage", text)
        print(f"wrote the byzantine section of {HERE / 'RESULTS.md'} and {png}", file=sys.stderr)


if __name__ == "__main__":
    main()
