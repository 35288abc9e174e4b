"""`python benchmarks/overhead.py --grid`: dpeft simulate against the plain all-core loop over round shapes.

One invocation runs, for each shape, ``dpeft simulate`` and the plain PyTorch loop of
``overhead.py`` (one process, torch threads = cores) on the same work: the same clients,
batches, FedAvg and evaluations. Shapes: 1 to 8 clients per round over 2 worker processes
(most of them leave a round's last task to one process: the tail), and 3 and 5 clients over
4 processes sharing 2 cores (oversubscribed). Each shape runs its own plain loop right after
its dpeft run (a shared one, measured minutes apart, drifts with the machine). With
``--before`` each shape also runs dpeft with ``simulate.work_conserving=false
eval.overlap=false`` (fixed threads per process, evaluation between rounds); the dpeft side
otherwise runs with both on.

Writes the section "Simulation: work-conserving rounds" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from results import machine_note, write_section

HERE = Path(__file__).resolve().parent
#: the default grid's task: short rounds, so the grid runs in about 10-15 minutes on an idle 2-core machine
DEFAULTS = ["rounds=3", "clients=8", "train.local_steps=5", "data.test_examples=200"]
#: (clients per round, worker processes, simulate.cores or None)
SHAPES = [*((c, 2, None) for c in range(1, 9)), (3, 4, 2), (5, 4, 2)]
AFTER = ["simulate.work_conserving=true", "eval.overlap=true"]
BEFORE = ["simulate.work_conserving=false", "eval.overlap=false"]


def _dpeft(overrides: list[str], run_dir: str) -> dict:
    t0 = time.time()
    cmd = [sys.executable, "-m", "dpeft_launch.cli", "simulate", "--fresh", f"run_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"dpeft simulate failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    out = {"wall_s": wall, "acc": rows[-1].get("eval_accuracy"), "rounds": [r["round"] for r in rows]}
    budget = Path(run_dir, "cores.budget")
    if budget.exists():
        from dpeft.train.cores import CoreBudget

        out["cores"] = CoreBudget(budget, 0).stats()
    return out


def _plain(overrides: list[str], tmp: str) -> dict:
    out = os.path.join(tmp, "plain.json")
    t0 = time.time()
    subprocess.run([sys.executable, str(HERE / "overhead.py"), "--plain-only", out, *overrides], check=True, timeout=3600)
    plain = json.loads(Path(out).read_text())
    return {"wall_s": time.time() - t0, "acc": plain["accuracy"][-1]}


def parse_shapes(text: str) -> list[tuple[int, int, int | None]]:
    """``3x2,3x4c2`` -> [(3, 2, None), (3, 4, 2)]: clients per round x processes, optionally c cores."""
    shapes = []
    for part in text.split(","):
        clients, _, rest = part.partition("x")
        procs, _, cores = rest.partition("c")
        shapes.append((int(clients), int(procs), int(cores) if cores else None))
    return shapes


def _cell(walls: list[float]) -> str:
    """Median wall time, with the range when there are several runs."""
    med = median(walls)
    return f"{med:.1f} s" if len(walls) == 1 else f"{med:.1f} s ({min(walls):.1f}-{max(walls):.1f})"


def run_grid(
    overrides: list[str], before: bool = False, shapes: list[tuple[int, int, int | None]] | None = None, repeats: int = 1
) -> str:
    """Run the grid; returns the Markdown section (also written to RESULTS.md). With ``repeats``
    > 1 each shape runs dpeft (and the plain loop of its clients per round) that many times,
    alternating, and the ratio is of the medians: one run of a 15-30 s command moves by up to
    10% on a shared VM."""
    shapes = shapes or SHAPES
    settings = [*DEFAULTS, *overrides]
    load_start, t_start = os.getloadavg(), time.time()
    lines = []
    for cpr, procs, cores in shapes:
        common = [*settings, f"clients_per_round={cpr}"]
        sim = [*common, f"simulate.processes={procs}", *([f"simulate.cores={cores}"] if cores else []), *AFTER]
        runs, olds, plains = [], [], []
        for _ in range(repeats):  # each shape its own plain runs, next to its dpeft runs: the machine drifts over a grid
            with tempfile.TemporaryDirectory() as tmp:
                runs.append(_dpeft(sim, os.path.join(tmp, "run")))
                if before:
                    olds.append(_dpeft([*sim, *BEFORE], os.path.join(tmp, "old")))
                plains.append(_plain(common, tmp))
        dp_walls = [r["wall_s"] for r in runs]
        plain_walls = [p["wall_s"] for p in plains]
        shape = f"{cpr} clients, {procs} processes" + (f" on {cores} cores" if cores else "")
        ratio = median(dp_walls) / median(plain_walls)
        peak = max((r.get("cores", {}).get("peak") or 0 for r in runs), default=0) or None
        row = f"| {shape} | {_cell(dp_walls)} | {_cell(plain_walls)} | **{ratio:.3f}** |"
        if before:
            old_walls = [o["wall_s"] for o in olds]
            row += f" {_cell(old_walls)} | {median(old_walls) / median(plain_walls):.3f} |"
        budget = runs[0].get("cores", {}).get("budget", "-")
        row += f" {peak if peak is not None else '-'} / {budget} | {runs[0]['acc']:.4f} / {plains[0]['acc']:.4f} |"
        lines.append(row)
        print(row, flush=True)
        text = _section(lines, overrides, settings, before, load_start, t_start, len(shapes), repeats)
        write_section("worksim", "Simulation: work-conserving rounds", text)  # after each shape: a cut-short grid keeps its rows
    return text


def _section(
    lines: list[str],
    overrides: list[str],
    settings: list[str],
    before: bool,
    load_start: tuple[float, ...],
    t_start: float,
    planned: int,
    repeats: int = 1,
) -> str:
    load_end = os.getloadavg()
    ratios = [float(r.split("**")[1]) for r in lines]
    head = "| shape (per round) | dpeft simulate | plain loop, all cores | ratio |"
    sep = "| --- | --- | --- | --- |"
    if before:
        head += " dpeft, fixed threads + sequential evaluation | its ratio |"
        sep += " --- | --- |"
    head += " peak threads / budget | final accuracy dpeft / plain |"
    sep += " --- | --- |"
    text = "\n".join(
        [
            f"`python benchmarks/overhead.py --grid{' --before' if before else ''}{f' --repeats {repeats}' if repeats > 1 else ''}"
            f"{' ' + ' '.join(overrides) if overrides else ''}`",
            "",
            machine_note()
            + f" 1/5/15-min load average {load_start[0]:.1f}/{load_start[1]:.1f}/{load_start[2]:.1f} at the start, "
            f"{load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f} at the end; the grid took {time.time() - t_start:.0f} s"
            + (f" (cut short: {len(lines)} of {planned} shapes)." if len(lines) < planned else "."),
            "",
            head,
            sep,
            *lines,
            "",
            f"Worst ratio {max(ratios):.3f}, mean {sum(ratios) / len(ratios):.3f}. Settings: `{' '.join(settings)}` "
            "(otherwise the default task: MiniLM + LoRA r=8, Rotten Tomatoes, batch 16, evaluation every round). "
            "Wall time is start to finish of each command (imports, model and data loading included on both sides)"
            + (
                f"; each cell is the median of {repeats} runs (range in brackets), dpeft and the plain loop alternating, "
                "and the ratio is of the medians. "
                if repeats > 1
                else ". "
            )
            + "dpeft runs with `simulate.work_conserving=true eval.overlap=true` (one thread per process to start with, "
            "the core budget = processes x threads, at most the machine's cores); peak threads is the "
            "largest sum of the threads claimed at once in the budget file.",
        ]
    )
    return text
