"""dpeft vs Flower's simulation engine on the same task: wall time, total PSS, accuracy per round.

For each client count (``--clients 10,100``): run ``benchmarks/flower/flower_task.py`` in
``benchmarks/.venv-flower`` (created by ``setup_venv.sh`` if missing) and ``dpeft simulate``
with the same ``key=value`` settings, one after the other, each as a fresh process tree. Wall
time is start to finish of the command (imports, model and data loading included on both
sides); memory is the PSS summed over the whole process tree (Flower: driver, Ray daemons and
actors; dpeft: coordinator and worker processes), sampled every 0.5 s, peak. Both use two
training processes with one torch thread each and evaluate on the same 600 examples every
round.

    python benchmarks/flower/compare.py [--clients 10,100] [--per-round 4] [--rounds 5] [key=value ...]

``--per-round 3,5`` runs each client count at those clients per round too: uneven shapes, whose
last task of a round leaves one of the two training processes idle. ``--dpeft`` adds settings to
the dpeft side only (default ``simulate.work_conserving=true``: the training processes and the
evaluation share the cores; docs/simulation-performance.md).

CPU heavy: run it when the machine is otherwise idle (the 1-minute load average is printed
with the results).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))

from procmem import run_measured  # noqa: E402
from results import machine_note, write_section  # noqa: E402

from dpeft_launch.cli import LEAN_TUNABLES  # noqa: E402

VENV = ROOT / "benchmarks" / ".venv-flower"
MiB = 1 << 20


def ensure_venv() -> str:
    subprocess.run(["bash", str(HERE / "setup_venv.sh")], check=True)  # quick when ready; adds late small deps
    out = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", "import flwr, ray; print(flwr.__version__, ray.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def _leftovers(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def run_flower(overrides: list[str], tmp: str, extra_env: dict[str, str] | None = None) -> dict:
    out = os.path.join(tmp, "flower.jsonl")
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=f"{ROOT}:{HERE}",
        RAY_DEDUP_LOGS="0",
        **(extra_env or {}),
    )
    env.pop("VIRTUAL_ENV", None)
    before = {p.pid for p in _leftovers(str(VENV))}
    proc, wall, pss = run_measured(
        [str(VENV / "bin" / "python"), str(HERE / "flower_task.py"), "--out", out, *overrides], env=env, cwd=str(ROOT)
    )
    # Ray daemons that outlived the driver: ours (started during this run), ended by pid
    stray = [p for p in _leftovers(str(VENV)) if p.pid not in before]
    for p in stray:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if proc.returncode != 0 or not Path(out).exists():
        raise SystemExit(f"Flower run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    rows = [json.loads(x) for x in Path(out).read_text().splitlines()]
    return {
        "wall_s": wall,
        "pss": pss.peak,
        "procs": pss.peak_procs,
        "acc": [r["eval_accuracy"] for r in sorted(rows, key=lambda r: r["round"])],
        "stray": len(stray),
    }


def run_dpeft(overrides: list[str], tmp: str) -> dict:
    run_dir = os.path.join(tmp, "dpeft")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc, wall, pss = run_measured(
        [sys.executable, "-m", "dpeft_launch.cli", "simulate", "--fresh", f"run_dir={run_dir}", *overrides],
        env=env,
        cwd=str(ROOT),
    )
    if proc.returncode != 0:
        raise SystemExit(f"dpeft simulate failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    rows = [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": wall, "pss": pss.peak, "procs": pss.peak_procs, "acc": [r["eval_accuracy"] for r in rows]}


def _medians(runs: list[dict]) -> dict:
    """One side's runs of a shape as one: median wall time and peak PSS, the runs' wall times,
    the first run's accuracies (seeded: every run's are the same)."""
    walls = sorted(r["wall_s"] for r in runs)
    return {
        **runs[0],
        "wall_s": statistics.median(walls),
        "walls": walls,
        "pss": statistics.median(r["pss"] for r in runs),
        "stray": sum(r.get("stray", 0) for r in runs),
    }


def _wall(side: dict) -> str:
    walls = side["walls"]
    return f"{side['wall_s']:.1f} s" + (f" ({walls[0]:.1f}-{walls[-1]:.1f})" if len(walls) > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="10,100")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", default="", help="clients per round to run (comma-separated); default: the config's")
    parser.add_argument(
        "--dpeft", default="simulate.work_conserving=true", help="space-separated settings for the dpeft side only"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of each side per shape, alternating; the table gives medians (and ranges)"
    )
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--no-flower-tunables",
        action="store_true",
        help="skip the extra Flower run (first client count) with the glibc tunables dpeft's CLI starts with",
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    versions = ensure_venv()
    load_start = os.getloadavg()[0]
    results = []
    shapes = [
        (int(c), p)
        for c in args.clients.split(",")
        for p in ([int(x) for x in args.per_round.split(",")] if args.per_round else [None])
    ]
    for n, per_round in shapes:
        overrides = [
            f"rounds={args.rounds}",
            f"clients={n}",
            *([f"clients_per_round={per_round}"] if per_round else []),
            *args.overrides,
        ]
        fls, dps, fl_lean = [], [], None
        for i in range(max(1, args.repeats)):  # alternating: the machine drifts over the minutes a shape takes
            with tempfile.TemporaryDirectory() as tmp:
                fls.append(run_flower(overrides, tmp))
                fl = fls[-1]
                print(
                    f"clients={n} flower: {fl['wall_s']:.1f}s, {fl['pss'] / MiB:.0f} MiB PSS ({fl['procs']} procs), acc {fl['acc']}",
                    flush=True,
                )
                dps.append(run_dpeft([*overrides, *args.dpeft.split()], tmp))
                dp = dps[-1]
                print(
                    f"clients={n} dpeft:  {dp['wall_s']:.1f}s, {dp['pss'] / MiB:.0f} MiB PSS ({dp['procs']} procs), acc {dp['acc']}",
                    flush=True,
                )
                if i or args.no_flower_tunables or results:
                    continue
                fl_lean = run_flower(overrides, tmp, {"GLIBC_TUNABLES": LEAN_TUNABLES})
                print(
                    f"clients={n} flower, GLIBC_TUNABLES={LEAN_TUNABLES}: {fl_lean['wall_s']:.1f}s, {fl_lean['pss'] / MiB:.0f} MiB PSS",
                    flush=True,
                )
        label = f"{n}" if per_round is None else f"{n} ({per_round} per round)"
        results.append((label, overrides, _medians(fls), _medians(dps), fl_lean))
    lines = [
        f"`python benchmarks/flower/compare.py --clients {args.clients} --rounds {args.rounds}"
        f"{' --per-round ' + args.per_round if args.per_round else ''}{f' --repeats {args.repeats}' if args.repeats > 1 else ''}"
        f"{' --no-flower-tunables' if args.no_flower_tunables else ''} --dpeft '{args.dpeft}'"
        f"{' ' + ' '.join(args.overrides) if args.overrides else ''}`",
        "",
        machine_note() + f" Flower {versions.split()[0]} (Ray {versions.split()[1]}) in benchmarks/.venv-flower. "
        f"1-min load average: {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.",
        "",
        "| clients | | wall time | peak PSS (process tree) | processes | final accuracy |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for n, _o, fl, dp, fl_lean in results:
        lines.append(
            f"| {n} | Flower simulation | {_wall(fl)} | {fl['pss'] / MiB:,.0f} MiB | {fl['procs']} | {fl['acc'][-1]:.4f} |"
        )
        lines.append(f"| {n} | dpeft simulate | {_wall(dp)} | {dp['pss'] / MiB:,.0f} MiB | {dp['procs']} | {dp['acc'][-1]:.4f} |")
        lines.append(
            f"| {n} | **Flower / dpeft** | **{fl['wall_s'] / dp['wall_s']:.2f}x** | **{fl['pss'] / dp['pss']:.2f}x** | | |"
        )
        if fl_lean is not None:
            lines.append(
                f"| {n} | Flower, `GLIBC_TUNABLES={LEAN_TUNABLES}` | {fl_lean['wall_s']:.1f} s | {fl_lean['pss'] / MiB:,.0f} MiB | {fl_lean['procs']} | {fl_lean['acc'][-1]:.4f} |"
            )
            lines.append(
                f"| {n} | Flower (same tunables) / dpeft | {fl_lean['wall_s'] / dp['wall_s']:.2f}x | {fl_lean['pss'] / dp['pss']:.2f}x | | |"
            )
    lines += [
        "",
        "Accuracy per round (round 0 = the initial adapter):",
        "",
        "| clients | | " + " | ".join(f"r{i}" for i in range(args.rounds + 1)) + " |",
        "| --- | --- |" + " --- |" * (args.rounds + 1),
    ]
    for n, _o, fl, dp, _fl_lean in results:
        lines.append(f"| {n} | Flower | " + " | ".join(f"{a:.4f}" for a in fl["acc"]) + " |")
        lines.append(f"| {n} | dpeft | " + " | ".join(f"{a:.4f}" for a in dp["acc"]) + " |")
    lines += [
        "",
        f"Settings: `{' '.join(results[0][1])}` (the default task otherwise: MiniLM + LoRA r=8 q/v + classifier, "
        "Rotten Tomatoes, Dirichlet(1.0), 4 clients per round, 20 local steps of batch 16, AdamW 2e-3, prior-calibrated "
        "loss, FedAvg, evaluation on 600 examples every round). Both sides: the same initial adapter, split, per-round "
        "client sample, per-(round, client) batches and dropout seeds (the Flower client calls the same plain-PyTorch "
        "`local_train`), two training processes with one torch thread each (Flower: `num_cpus=1` per virtual client on "
        "a 2-CPU Ray backend; dpeft: `simulate.processes=2`, forked from the coordinator once it has loaded the model and data), server-side evaluation with 2 threads. Flower's actors "
        "cache the model and data across rounds. The accuracies agree up to float rounding because the work is the same; "
        "the differences in time and memory are the frameworks'. dpeft's training commands start with "
        f"`GLIBC_TUNABLES={LEAN_TUNABLES}` (glibc's per-thread cache of small blocks off; documentation, \"GPUs, precision and memory\"); the extra Flower row gives Flower's "
        "processes the same tunables, to show what of the memory gap is that setting.",
    ]
    if any(fl["stray"] for _n, _o, fl, _d, _l in results):
        lines.append("")
        lines.append("Ray processes that outlived the Flower driver were ended by pid after the run (not counted in wall time).")
    text = "\n".join(lines)
    if not args.no_write:
        write_section("flower", "Against Flower: same task, Flower's simulation engine vs dpeft simulate", text)
    print(text)


if __name__ == "__main__":
    main()
