"""Sync policies under heterogeneous clients: wall time to a target accuracy.

Runs ``dpeft simulate`` on the default task (MiniLM + LoRA r=8, rotten tomatoes, IID split)
three times — ``sync``, ``deadline`` and ``async`` — with the same simulated heterogeneity:
client slowdowns cycled 1x..8x over the client ids (``simulate.speed_factors``) and a 10%
chance that a task is dropped without a reply (``simulate.dropout``). Every policy gets the
same number of aggregation steps with the same updates per step (``clients_per_round``);
``sync`` re-assigns dropped tasks after ``--task-timeout`` seconds, ``deadline`` over-selects
1.5x and closes at the quorum or the deadline, ``async`` (FedBuff) keeps 2x clients_per_round
tasks in flight and discounts stale updates by (1 + tau)^-0.5.

Reports, per policy, the wall time (``elapsed_s`` in ``metrics.jsonl``, coordinator start
included) at which the global eval accuracy first reached the target, the best and final
accuracy, and the mean staleness. Writes the ``sync_policies`` section of
benchmarks/RESULTS.md and benchmarks/sync_policies.png (accuracy against wall time).

    python benchmarks/sync_policies.py                 # the full comparison (CPU heavy)
    python benchmarks/sync_policies.py --quick         # a smoke run with tiny settings
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

POLICIES = ("sync", "deadline", "async")


def policy_overrides(policy: str, args: argparse.Namespace) -> list[str]:
    """The sync.* keys of one policy."""
    if policy == "sync":
        return ["sync.name=sync", f"sync.task_timeout_s={args.task_timeout}"]
    if policy == "deadline":
        return [
            "sync.name=deadline",
            "sync.over_selection=1.5",
            f"sync.deadline_s={args.deadline}",
            f"sync.task_timeout_s={args.task_timeout}",
        ]
    return [
        "sync.name=async",
        f"sync.buffer_size={args.clients_per_round}",
        f"sync.concurrency={2 * args.clients_per_round}",
        "sync.staleness=polynomial",
        "sync.staleness_a=0.5",
        f"sync.task_timeout_s={args.task_timeout}",
    ]


def run_policy(policy: str, args: argparse.Namespace, out_dir: Path) -> list[dict]:
    run_dir = out_dir / policy
    speeds = [1 + i * 7 / max(1, args.clients - 1) for i in range(args.clients)]  # 1x .. 8x
    cmd = [
        sys.executable,
        "-m",
        "dpeft_launch.cli",
        "simulate",
        "--fresh",
        f"run_dir={run_dir}",
        f"seed={args.seed}",
        f"rounds={args.rounds}",
        f"clients={args.clients}",
        f"clients_per_round={args.clients_per_round}",
        f"train.local_steps={args.local_steps}",
        f"data.max_train_examples={args.train_examples}",
        f"data.test_examples={args.test_examples}",
        "data.partition=iid",
        f"simulate.processes={args.processes}",
        f"simulate.speed_factors=[{', '.join(f'{s:.2f}' for s in speeds)}]",
        f"simulate.dropout={args.dropout}",
        "sync.round_timeout_s=1800",
        *policy_overrides(policy, args),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    print(f"[{policy}] {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{policy} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"[{policy}] done in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summarise(policy: str, rows: list[dict], target: float) -> dict:
    evals = [r for r in rows if r.get("eval_accuracy") is not None]
    reached = next((r for r in evals if r["round"] > 0 and r["eval_accuracy"] >= target), None)
    stale = [r["staleness_mean"] for r in rows if "staleness_mean" in r]
    return {
        "policy": policy,
        "time_to_target": reached["elapsed_s"] if reached else None,
        "steps_to_target": reached["round"] if reached else None,
        "best": max(r["eval_accuracy"] for r in evals),
        "final": evals[-1]["eval_accuracy"],
        "total_s": rows[-1]["elapsed_s"],
        "steps": rows[-1]["round"],
        "updates": sum(r.get("clients", 0) for r in rows),
        "lost_or_reassigned": sum(r.get("lost", 0) + r.get("reassigned", 0) for r in rows),
        "staleness": sum(stale) / len(stale) if stale else 0.0,
    }


def plot(results: dict[str, list[dict]], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for policy, rows in results.items():
        pts = [(r["elapsed_s"], r["eval_accuracy"]) for r in rows if r.get("eval_accuracy") is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=policy)
    ax.axhline(target, color="gray", ls="--", lw=0.8, label=f"target {target:.2f}")
    ax.set_xlabel("wall time since coordinator start (s)")
    ax.set_ylabel("global eval accuracy")
    ax.set_title("sync policies, client slowdowns 1x..8x, 10% dropouts")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def section(summary: list[dict], args: argparse.Namespace, png: str) -> str:
    fmt = lambda v, f="{:.0f}": "not reached" if v is None else f.format(v)  # noqa: E731
    lines = [
        f"Default task (MiniLM + LoRA r=8, rotten tomatoes, IID), {args.clients} clients, {args.clients_per_round} updates per "
        f"aggregation step, {args.rounds} steps, {args.local_steps} local steps, {args.train_examples} training / "
        f"{args.test_examples} test examples, {args.processes} worker processes. Client slowdowns 1x..8x (cycled over "
        f"client ids), {args.dropout:.0%} of tasks dropped without a reply. Target accuracy {args.target:.2f}.",
        "",
        "| policy | wall s to target | steps to target | best acc | final acc | total s | updates aggregated | lost / re-assigned tasks | mean staleness |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summary:
        lines.append(
            f"| {s['policy']} | {fmt(s['time_to_target'])} | {fmt(s['steps_to_target'], '{}')} | {s['best']:.3f} | {s['final']:.3f} | "
            f"{s['total_s']:.0f} | {s['updates']} | {s['lost_or_reassigned']} | {s['staleness']:.2f} |"
        )
    lines += [
        "",
        "`sync` waits for the slowest sampled client every round and re-assigns dropped tasks after "
        f"{args.task_timeout:.0f} s; `deadline` samples 1.5x, closes at the quorum (clients_per_round) or after "
        f"{args.deadline:.0f} s and drops late updates; `async` keeps {2 * args.clients_per_round} tasks in flight and aggregates "
        "every clients_per_round arrivals, so fast clients contribute more often and nobody waits. Wall time includes the "
        "coordinator's evaluation after every step (the same for all three).",
        "",
        machine_note() + (" Quick (smoke) settings." if args.quick else ""),
        "",
        f"![sync policies]({png})",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--clients-per-round", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--train-examples", type=int, default=2000)
    p.add_argument("--test-examples", type=int, default=300)
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--target", type=float, default=0.70)
    p.add_argument("--deadline", type=float, default=60.0)
    p.add_argument("--task-timeout", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--out", default=str(HERE / "runs" / "sync_policies"))
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke test of the script, not a measurement)")
    p.add_argument("--no-write", action="store_true", help="print the section (PNG into --out) instead of updating RESULTS.md")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.clients, args.clients_per_round, args.local_steps = 3, 4, 2, 3
        args.train_examples, args.test_examples, args.processes = 300, 64, 2
        args.deadline, args.task_timeout, args.target = 20.0, 60.0, 0.55
    out = Path(args.out)
    results = {pol: run_policy(pol, args, out) for pol in args.policies.split(",")}
    summary = [summarise(pol, rows, args.target) for pol, rows in results.items()]
    png = (out if args.no_write else HERE) / "sync_policies.png"
    plot(results, args.target, png)
    text = section(summary, args, png.name)
    if args.no_write:
        print(text)
    else:
        write_section("sync_policies", "Sync policies with stragglers and dropouts: wall time to target accuracy", text)
        print(f"wrote the sync_policies section of {HERE / 'RESULTS.md'} and {png}", file=sys.stderr)


if __name__ == "__main__":
    main()
