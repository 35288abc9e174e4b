"""GPU smoke checks of dpeft's training paths, for a machine with one (or more) CUDA GPUs.

    python benchmarks/gpu_check.py [--out DIR] [--only NAME,NAME] [--budget 540] [--timeout 150]

Each check is one tiny real run (SmolLM2, its first 2 layers, 32-token sequences, 1 round of 2
steps) in a subprocess with a time limit: two ``dpeft simulate`` worker processes sharing one
GPU, bf16 training, a 4-bit (nf4) base, lockstep clients (on MiniLM: lockstep trains
classifiers), generation scoring, an all-reduce of two ranks over NCCL
(``aggregation=allreduce``), two Ray actors on half a GPU each (``ray.num_gpus=0.5``) and the
split cloud on the GPU. Each is reported PASS, FAIL or SKIP with
the reason and its time. A run passes when it exits 0, writes its metrics, and (when nvidia-smi
can tell) the GPU's memory rose above its idle level while it ran. Without a CUDA GPU every
check is SKIP at once; a check whose config keys this dpeft does not have is SKIP with the
config error. ``--budget`` seconds in all: checks that would start after it are SKIP.

Writes ``gpu_check.md`` (a markdown section) and ``gpu_check_logs/<check>.log`` (each run's
output) under ``--out`` (default: ``$OUT`` when set, else ``runs/gpu_check``) and prints the section.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

#: the task every check shares: small enough to run in seconds on a GPU
TINY = [
    "model.name=smollm2",
    "model.task=causal_lm",
    "model.layers=2",
    "model.max_length=32",
    "rounds=1",
    "clients=4",
    "clients_per_round=2",
    "train.local_steps=2",
    "train.batch_size=4",
    "train.lr=1e-4",
    "data.max_train_examples=400",
    "data.test_examples=16",
    "eval.generate=false",
]
#: lockstep's task: the default MiniLM classifier, base dropout off (lockstep needs it)
SMALL_CLS = [
    "model.name=minilm",
    "model.max_length=32",
    "model.dropout=0",
    "rounds=1",
    "clients=4",
    "clients_per_round=2",
    "train.local_steps=2",
    "train.batch_size=8",
    "data.max_train_examples=400",
    "data.test_examples=32",
]
CUDA = ["train.device=cuda", "eval.device=cuda"]


@dataclass
class Check:
    """One run: a dpeft command line (after ``python -m dpeft_launch.cli``) and the file it must write."""

    name: str
    what: str
    args: list[str]
    overrides: list[str]
    expect: str = "metrics.jsonl"  # relative to run_dir
    timeout_s: float | None = None
    env: dict[str, str] = field(default_factory=dict)


CHECKS = [
    Check(
        "simulate-2proc",
        "dpeft simulate, 2 worker processes sharing one GPU, fp32",
        ["simulate", "--fresh"],
        [*TINY, *CUDA, "simulate.processes=2"],
    ),
    Check("bf16", "bf16 training (train.precision=bf16)", ["simulate", "--fresh"], [*TINY, *CUDA, "train.precision=bf16"]),
    Check(
        "nf4",
        "4-bit nf4 base (bitsandbytes) with bf16 compute",
        ["simulate", "--fresh"],
        [*TINY, *CUDA, "model.quantization=nf4", "train.precision=bf16"],
    ),
    Check(
        "lockstep",
        "MiniLM classifier, two clients trained in lockstep on the GPU (lockstep trains seq_cls models)",
        ["simulate", "--fresh"],
        [*SMALL_CLS, *CUDA, "simulate.processes=1", "train.lockstep=true"],
    ),
    Check(
        "generate",
        "instruction data, generations scored on the GPU (gen_accuracy)",
        ["simulate", "--fresh"],
        [*TINY, *CUDA, "data.format=instruction", "eval.generate=true", "eval.generate_examples=8", "eval.max_new_tokens=4"],
        expect="generations.jsonl",
    ),
    Check(
        "allreduce-nccl",
        "aggregation=allreduce, 2 ranks on NCCL",
        ["simulate", "--fresh"],
        [*TINY, *CUDA, "aggregation=allreduce", "simulate.processes=2"],
    ),
    Check(
        "split-cloud",
        "DLoRA split: the cloud's base on the GPU, 2 CPU edges",
        ["split", "simulate", "--fresh"],
        [*TINY, "split.cloud_device=cuda", "split.edges=2", "split.layers=2", "split.eval_examples=16"],
    ),
    Check(
        "ray-half-gpu",
        "dpeft ray: 2 actors with ray.num_gpus=0.5 on a local Ray",
        ["ray", "--fresh"],
        [*TINY, *CUDA, "ray.actors=2", "ray.num_gpus=0.5", "ray.num_cpus=1"],
        timeout_s=240,
        env={"RAY_AUTH_MODE": "disabled"},
    ),
]


def cuda_problem() -> str | None:
    """Why CUDA cannot be used here, or None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible (torch.cuda.is_available() is False)"
    return None


def config_problem(overrides: list[str]) -> str | None:
    """The config error of these overrides (one line), or None when they load."""
    from dpeft.errors import DpeftError
    from dpeft.validate import load_config

    try:
        load_config(None, overrides)
    except DpeftError as exc:
        return str(exc).split(" (known:")[0].removeprefix("config error: ")
    return None


class GpuMemory:
    """Peak of the GPUs' used memory (nvidia-smi) while a check runs; ``None`` without nvidia-smi."""

    def __init__(self) -> None:
        self.idle = used_mib()
        self.peak = self.idle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            now = used_mib()
            if now is not None and self.peak is not None:
                self.peak = max(self.peak, now)

    def __enter__(self) -> GpuMemory:
        if self.idle is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def used_mib() -> int | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10
        )
        return sum(int(x) for x in out.stdout.split()) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "no output")[:240].replace("|", "/")


def run_check(check: Check, work: Path, logs: Path, timeout_s: float) -> tuple[str, float, str]:
    """(PASS/FAIL/SKIP, seconds, detail) of one check."""
    problem = config_problem(check.overrides)
    if problem:
        return "SKIP", 0.0, f"config: {problem}"
    run_dir = work / check.name
    cmd = [sys.executable, "-m", "dpeft_launch.cli", *check.args, f"run_dir={run_dir}", *check.overrides]
    env = dict(os.environ, **check.env)
    t0 = time.time()
    with GpuMemory() as mem:
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=check.timeout_s or timeout_s, env=env, stdin=subprocess.DEVNULL
            )
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, out, err = None, str(exc.stdout or ""), str(exc.stderr or "")
    took = time.time() - t0
    (logs / f"{check.name}.log").write_text(f"$ {' '.join(cmd)}\n\n--- stdout\n{out}\n--- stderr\n{err}")
    if rc is None:
        return "FAIL", took, f"timed out after {check.timeout_s or timeout_s:.0f} s: {last_line(err or out)}"
    if rc != 0:
        return "FAIL", took, f"exit {rc}: {last_line(err or out)}"
    if not (run_dir / check.expect).is_file():
        return "FAIL", took, f"exit 0 but no {check.expect} in the run directory"
    if mem.idle is not None and mem.peak is not None:
        if mem.peak - mem.idle < 64:
            return "FAIL", took, f"exit 0, but GPU memory never rose above idle ({mem.idle} MiB): it ran on the CPU"
        return "PASS", took, f"GPU memory peak {mem.peak - mem.idle:,} MiB above idle"
    return "PASS", took, "exit 0 (nvidia-smi unavailable: GPU use not confirmed)"


def gpu_note() -> str:
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi: not found."
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "nvidia-smi: failed."
    return "GPUs: " + "; ".join(ln.strip() for ln in out.stdout.splitlines() if ln.strip()) + "."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", default=os.environ.get("OUT") or "runs/gpu_check", help="directory for gpu_check.md and the logs"
    )
    parser.add_argument(
        "--only", default="", help="comma-separated check names (default: all): " + ", ".join(c.name for c in CHECKS)
    )
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for all checks; later ones are skipped")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per check (ray: its own, longer)")
    args = parser.parse_args(argv)
    wanted = [c for c in CHECKS if not args.only or c.name in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {c.name for c in CHECKS}
    if unknown:
        parser.error(f"unknown check(s): {', '.join(sorted(unknown))}")
    out = Path(args.out)
    logs = out / "gpu_check_logs"
    logs.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    no_cuda = cuda_problem()
    rows: list[tuple[Check, str, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="dpeft-gpu-check-") as tmp:
        for check in wanted:
            if no_cuda:
                rows.append((check, "SKIP", 0.0, no_cuda))
                continue
            left = args.budget - (time.time() - t_start)
            if left < 30:
                rows.append((check, "SKIP", 0.0, f"time budget ({args.budget:.0f} s) spent"))
                continue
            timeout = min(check.timeout_s or args.timeout, left)
            status, took, detail = run_check(Check(**{**check.__dict__, "timeout_s": timeout}), Path(tmp), logs, timeout)
            rows.append((check, status, took, detail))
            print(f"{status} {check.name} ({took:.0f} s): {detail}", file=sys.stderr, flush=True)
    counts = {s: sum(1 for r in rows if r[1] == s) for s in ("PASS", "FAIL", "SKIP")}
    lines = [
        "## GPU checks",
        "",
        "`python benchmarks/gpu_check.py" + (f" --only {args.only}" if args.only else "") + "`",
        "",
        f"{gpu_note()} Total {time.time() - t_start:.0f} s: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP.",
        "",
        "| check | what | result | s | detail |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {c.name} | {c.what} | {s} | {t:.0f} | {d} |" for c, s, t, d in rows),
        "",
        "Each run: `dpeft <command> run_dir=... "
        + " ".join(TINY)
        + "` (lockstep: MiniLM, `"
        + " ".join(SMALL_CLS)
        + "`) plus the check's own keys; its output is in "
        "`gpu_check_logs/<check>.log`.",
    ]
    text = "\n".join(lines)
    (out / "gpu_check.md").write_text(text + "\n")
    print(text)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
