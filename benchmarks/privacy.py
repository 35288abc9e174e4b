"""Accuracy under differential privacy on the default task, and (``--part secagg``) secure aggregation's cost.

``--part accuracy`` runs ``dpeft simulate`` on the default task (MiniLM + LoRA r=8 on
query/value, Rotten Tomatoes split over many clients) and compares the final accuracy of:

- FedAvg and FFA-LoRA without DP (the references);
- central DP-FedAvg (user level) with FedAvg and with FFA-LoRA, the noise multiplier derived for
  a target epsilon of about 1, 4 and 8 over the planned rounds (RDP accountant, fixed-size client
  sampling, delta as given);
- local DP-SGD (record level) with FedAvg at one noise multiplier (its largest client epsilon is
  reported).

Every run shares the seed, clients, rounds and local steps, so the table's differences are the
noise's. Writes the ``privacy`` section of benchmarks/RESULTS.md.

``--part secagg`` runs the secure-aggregation cost table of ``benchmarks/privacy_secagg.py``
(its ``main(argv)``; imported only for that part); ``--part all`` runs both.

    python benchmarks/privacy.py                    # accuracy (about 15 min on a loaded 2-core machine)
    python benchmarks/privacy.py --quick            # a smoke run with tiny settings
    python benchmarks/privacy.py --part secagg      # the secure-aggregation cost table
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

#: (label, strategy, privacy overrides); "{eps}" is filled in per target epsilon
NO_DP = (("fedavg, no DP", "fedavg", []), ("ffa_lora, no DP", "ffa_lora", []))
CENTRAL = (("fedavg, central DP", "fedavg"), ("ffa_lora, central DP", "ffa_lora"))


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def run_one(label: str, strategy: str, privacy: list[str], args: argparse.Namespace, out_dir: Path) -> tuple[list[dict], float]:
    run_dir = out_dir / label.replace(", ", "_").replace(" ", "_").replace("=", "")
    cmd = [
        sys.executable, "-m", "dpeft_launch.cli", "simulate", "--fresh",
        f"run_dir={run_dir}", f"seed={args.seed}", f"rounds={args.rounds}", f"clients={args.clients}",
        f"clients_per_round={args.per_round}", f"strategy.name={strategy}", f"train.local_steps={args.local_steps}",
        f"data.test_examples={args.test_examples}",
    ]  # fmt: skip
    cmd += [f"train.eval_every={args.rounds}", "train.loss=cross_entropy", *privacy, *args.extra]
    metrics = run_dir / "metrics.jsonl"
    if args.reuse and metrics.exists():  # a finished run of an earlier invocation (same settings)
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        if rows and rows[-1].get("round") == args.rounds:
            print(f"[{label}] reused {run_dir}", file=sys.stderr, flush=True)
            return rows, float((run_dir / "wall_s").read_text()) if (run_dir / "wall_s").exists() else float("nan")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    print(f"[{label}] {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    took = time.time() - t0
    (run_dir / "wall_s").write_text(f"{took:.1f}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    print(
        f"[{label}] done in {took:.0f}s: accuracy {rows[-1].get('eval_accuracy')}, epsilon {rows[-1].get('epsilon')}",
        file=sys.stderr,
        flush=True,
    )
    return rows, took


def accuracy_part(args: argparse.Namespace) -> None:
    out_dir = Path(args.out)
    load0, t_all = load_avg(), time.time()
    runs: list[tuple[str, str, str, list[str]]] = [(label, strategy, "none", p) for label, strategy, p in NO_DP]
    for eps in args.epsilons:
        for label, strategy in CENTRAL:
            privacy = [
                "privacy.mode=central",
                f"privacy.target_epsilon={eps}",
                f"privacy.clip_norm={args.clip}",
                f"privacy.delta={args.delta}",
            ]
            runs.append((f"{label} eps={eps:g}", strategy, "central", privacy))
    local = [
        "privacy.mode=local",
        f"privacy.noise_multiplier={args.local_noise}",
        f"privacy.clip_norm={args.local_clip}",
        f"privacy.delta={args.local_delta}",
    ]
    runs.append(("fedavg, local DP-SGD", "fedavg", "local", local))
    if args.only:
        runs = [r for r in runs if any(r[0].startswith(o) for o in args.only)]
    table = []
    for label, strategy, mode, privacy in runs:
        rows, took = run_one(label, strategy, privacy, args, out_dir)
        last = rows[-1]
        table.append(
            (label, mode, last.get("eval_accuracy"), last.get("epsilon"), last.get("noise_multiplier"), last.get("delta"), took)
        )
    minutes = (time.time() - t_all) / 60
    ref = {r[0].split(",")[0]: r[2] for r in table if r[1] == "none"}
    lines = [
        f"`python benchmarks/privacy.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
        "",
        f"{machine_note()} 1-min load average {load0.split()[0]} at the start, {load_avg().split()[0]} at the end "
        f"(the machine is shared with other jobs: timings are noisy). Total {minutes:.1f} min.",
        "",
        f"Task: the default (MiniLM, LoRA r=8 on query/value + classifier head, Rotten Tomatoes), {args.clients} clients "
        f"(Dirichlet split), {args.per_round} sampled per round, {args.rounds} rounds x {args.local_steps} local steps of batch 16, "
        f"train.loss=cross_entropy, {args.test_examples} held-out examples. Central DP: fixed clip {args.clip:g}, noise "
        f"derived for the target epsilon over the {args.rounds} rounds (RDP, sampling without replacement, replace-one), delta {args.delta:g}. "
        f"Local DP-SGD: per-example clip {args.local_clip:g}, noise multiplier {args.local_noise:g}, Poisson batches, delta {args.local_delta:g} "
        "(epsilon: the largest of any client's).",
        "",
        "| run | DP | final accuracy | vs no DP | epsilon | noise multiplier | delta | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, mode, acc, eps, z, delta, took in table:
        base = ref.get(label.split(",")[0])
        diff = f"{acc - base:+.3f}" if acc is not None and base is not None and mode != "none" else ""
        fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else ""  # noqa: E731
        lines.append(
            f"| {label} | {mode} | {fmt(acc, '.3f')} | {diff} | {fmt(eps, '.2f')} | {fmt(z, '.3f')} | {fmt(delta, 'g')} | {took:.0f} |"
        )
    lines += [
        "",
        "With tens of clients per round the noise a small epsilon needs is large next to a clipped update over "
        "the adapter's ~75k numbers (noise standard deviation on the mean: noise multiplier x clip / clients per round, per number); "
        "DP-FedAvg reaches useful accuracy at small epsilon with hundreds to thousands of clients per round.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.quick:
        write_section("privacy", "Privacy: accuracy under differential privacy", body)


def secagg_part(argv: list[str]) -> None:
    """The secure-aggregation cost table: ``benchmarks/privacy_secagg.py``'s ``main(argv)``."""
    # --- secure-aggregation hook: its own module, imported only for this part ---
    import importlib

    module = importlib.import_module("privacy_secagg")
    module.main(argv)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("accuracy", "secagg", "all"), default="accuracy")
    ap.add_argument("--quick", action="store_true", help="tiny settings (smoke test; RESULTS.md untouched)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--test-examples", type=int, default=200)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--delta", type=float, default=1e-3)
    ap.add_argument("--local-noise", type=float, default=1.0)
    ap.add_argument("--local-clip", type=float, default=1.0)
    ap.add_argument("--local-delta", type=float, default=1e-4)
    ap.add_argument("--out", default="/tmp/dpeft-bench-privacy")
    ap.add_argument(
        "--reuse", action="store_true", help="take finished runs in --out from an earlier invocation with the same settings"
    )
    ap.add_argument(
        "--only", nargs="*", default=None, help="run only the labels starting with these (e.g. 'fedavg, central DP eps=8')"
    )
    ap.add_argument("extra", nargs="*", help="more key=value overrides for every run")
    args, rest = ap.parse_known_args(argv)
    if args.quick:
        args.clients, args.per_round, args.rounds, args.local_steps, args.test_examples = 10, 4, 2, 1, 32
        args.epsilons = [8.0]
        args.extra = [*args.extra, "model.max_length=32", "data.max_train_examples=400"]
    if args.part in ("accuracy", "all"):
        accuracy_part(args)
    if args.part in ("secagg", "all"):
        secagg_part(rest + (["--quick"] if args.quick else []))


if __name__ == "__main__":
    main()
