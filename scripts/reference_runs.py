"""Reference runs: tiny seeded runs in every execution mode, reduced to comparable numbers.

Each mode runs the real ``dpeft`` command (subprocesses, loopback gRPC, a local Ray, a gloo
group) on a 1-layer random BERT (``tests/edge/edge_testlib.make_tiny_bert``), so a run takes
seconds. A run is reduced to its ``metrics.jsonl`` rows (eval accuracy/loss, train loss,
clients, examples per round) and a fingerprint of the exported adapter
(``<run>/adapter/adapter_model.safetensors``): per tensor its shape, sum, L2 norm and the dot
with a fixed seeded random vector, all in float64.

    python scripts/reference_runs.py --out tests/golden/reference_runs.json   # write the reference
    python scripts/reference_runs.py --modes simulate,split --repeat 2         # determinism check

``tests/test_reference_runs.py`` re-runs each mode and compares with the committed reference.
The command prefix lives in :data:`DPEFT` (one line to change if the entry point moves).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
_CONSOLE = Path(sys.executable).parent / "dpeft"
#: how to invoke dpeft: the module (always the checkout on PYTHONPATH), else the console script
DPEFT: list[str] = [sys.executable, "-m", "dpeft_launch.cli"]
#: the torchrun entry of all-reduce runs (``None``: that mode is left out)
TORCHRUN_MODULE = "dpeft_launch.torchrun_allreduce"

#: the per-round metrics compared (tolerance abs 1e-6)
METRIC_KEYS = ("eval_accuracy", "eval_loss", "train_loss", "clients", "num_examples")
FINGERPRINT_SEED = 20261204
RUN_TIMEOUT_S = 300.0


def tiny_settings(model_dir: Path, run_dir: Path, **extra: Any) -> list[str]:
    """The tiny run every mode shares (the edge tests' settings, 2 rounds)."""
    values: dict[str, Any] = {
        "model.path": str(model_dir),
        "model.max_length": 32,
        "seed": 7,
        "rounds": 2,
        "clients": 4,
        "clients_per_round": 2,
        "train.local_steps": 3,
        "train.batch_size": 8,
        "train.lr": 0.01,
        "data.max_train_examples": 96,
        "data.test_examples": 32,
        "data.partition": "iid",
        "simulate.processes": 2,
        "simulate.coordinator_threads": 1,
        # fixed threads per step: the reference is bit-identical run to run; with work
        # conservation a step's thread count follows the schedule (fp32-rounding agreement only)
        "simulate.work_conserving": False,
        "run_dir": str(run_dir),
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def child_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_tiny_model(out: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests" / "edge"))
    try:
        from edge_testlib import make_tiny_bert
    finally:
        sys.path.pop(0)
    return make_tiny_bert(out)


# ------------------------------------------------------------------ processes


class Proc:
    """A ``dpeft`` subprocess in its own process group, output to a log file."""

    def __init__(self, args: list[str], log: Path, cmd: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.args = [*(DPEFT if cmd is None else cmd), *args]
        with open(log, "wb") as fh:
            self.popen = subprocess.Popen(self.args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env or child_env(), start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RunFailed(f"{' '.join(self.args)} did not finish within {timeout:.0f}s:\n{self.text()[-3000:]}") from None

    def kill(self) -> None:
        """SIGKILL the process group (the process and what it started)."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass


class RunFailed(RuntimeError):
    pass


def wait_until(pred: Callable[[], Any], timeout: float, what: str, procs: list[Proc]) -> Any:
    """Poll ``pred`` until it is true; fail naming ``what`` (with the logs) on timeout or when a process exits early."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        for p in procs:
            if p.popen.poll() not in (None, 0):
                break
        else:
            time.sleep(0.02)
            continue
        break
    logs = "\n".join(f"--- {p.log.name} (rc={p.popen.poll()})\n{p.text()[-3000:]}" for p in procs)
    raise RunFailed(f"gave up waiting for {what}\n{logs}")


def run_to_end(args: list[str], log: Path, cmd: list[str] | None = None) -> None:
    p = Proc(args, log, cmd)
    try:
        rc = p.wait(RUN_TIMEOUT_S)
    finally:
        p.kill()
    if rc != 0:
        raise RunFailed(f"{' '.join(p.args)} exited {rc}:\n{p.text()[-3000:]}")


def coordinator_with_workers(coord_args: list[str], work: Path, workers: int = 2) -> None:
    """`dpeft coordinator` + ``workers`` `dpeft worker` processes on loopback; returns when all exited 0."""
    listen = f"127.0.0.1:{free_port()}"
    procs: list[Proc] = []
    try:
        coord = Proc(["coordinator", "--listen", listen, *coord_args], work / "coordinator.log")
        procs.append(coord)
        wait_until(lambda: "event=listening" in coord.text(), 180, "the coordinator to listen", procs)
        for i in range(workers):
            procs.append(Proc(["worker", "--coordinator", listen, "--worker-id", f"w{i}", "--threads", "1", "--patience", "60"], work / f"w{i}.log"))
        for p in procs:
            if p.wait(RUN_TIMEOUT_S) != 0:
                raise RunFailed(f"{' '.join(p.args)} exited {p.popen.returncode}:\n{p.text()[-3000:]}")
    finally:
        for p in procs:
            p.kill()


# ------------------------------------------------------------------ modes


def _simulate(model: Path, run: Path, work: Path, *extra: str) -> None:
    run_to_end(["simulate", "--fresh", *tiny_settings(model, run), *extra], work / "simulate.log")


def _ray(model: Path, run: Path, work: Path) -> None:
    # a fresh local Ray under a short temp dir (its unix sockets need short paths), shut down by `dpeft ray`
    ray_tmp = Path(tempfile.mkdtemp(prefix="dpr", dir="/tmp"))
    env = dict(child_env(), RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    p = Proc(["ray", "--fresh", *tiny_settings(model, run), "ray.actors=2", "ray.num_cpus=1", "ray.local_num_cpus=2"], work / "ray.log", env=env)
    try:
        rc = p.wait(RUN_TIMEOUT_S)
    finally:
        p.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if rc != 0:
        raise RunFailed(f"dpeft ray exited {rc}:\n{p.text()[-3000:]}")


def _torchrun(model: Path, run: Path, work: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", TORCHRUN_MODULE]
    run_to_end(["--backend", "gloo", "--threads", "1", *tiny_settings(model, run)], work / "torchrun.log", cmd=cmd)


def _split(model: Path, run: Path, work: Path) -> None:
    split = ["split.edges=2", "split.layers=1", "split.eval_examples=16"]
    run_to_end(["split", "simulate", "--fresh", *tiny_settings(model, run), *split], work / "split.log")


#: mode name -> runner(model_dir, run_dir, work_dir); each leaves ``run_dir/metrics.jsonl`` and ``run_dir/adapter``
MODES: dict[str, Callable[[Path, Path, Path], None]] = {
    "simulate": lambda m, r, w: _simulate(m, r, w),
    # deadline: over-select 2 of 4 clients x 1.5 = 3, close at all 3 (the deadline is never reached)
    "simulate_deadline": lambda m, r, w: _simulate(m, r, w, "sync.name=deadline", "sync.over_selection=1.5", "sync.quorum=3", "sync.deadline_s=600"),
    # async (FedBuff) with one task in flight: every update is computed from the newest global
    "simulate_async": lambda m, r, w: _simulate(m, r, w, "sync.name=async", "sync.concurrency=1", "sync.buffer_size=2"),
    # both workers join before round 1: one worker alone could finish the tiny run before the other connects
    "coordinator_workers": lambda m, r, w: coordinator_with_workers(tiny_settings(m, r, **{"sync.min_workers": 2}), w),
    "ray": _ray,
    "simulate_allreduce": lambda m, r, w: _simulate(m, r, w, "aggregation=allreduce"),
    "torchrun_allreduce": _torchrun,
    "split": _split,
}


# ------------------------------------------------------------------ reduction


def fingerprint(adapter_file: Path) -> dict[str, dict[str, Any]]:
    """Per tensor: shape, sum, L2 norm, dot with a seeded standard-normal vector (float64)."""
    from safetensors.numpy import load_file

    out: dict[str, dict[str, Any]] = {}
    for name, arr in sorted(load_file(str(adapter_file)).items()):
        x = np.asarray(arr, dtype=np.float64).ravel()
        probe = np.random.default_rng([FINGERPRINT_SEED, zlib.crc32(name.encode())]).standard_normal(x.size)
        out[name] = {"shape": list(arr.shape), "sum": float(x.sum()), "l2": float(np.sqrt(np.dot(x, x))), "dot": float(np.dot(x, probe))}
    return out


def reduce_run(run: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "rounds": [{"round": r["round"], **{k: r.get(k) for k in METRIC_KEYS}} for r in rows],
        "adapter": fingerprint(run / "adapter" / "adapter_model.safetensors"),
    }


def run_mode(mode: str, model: Path, work: Path) -> dict[str, Any]:
    """Run ``mode`` in a fresh ``work/mode`` directory; its reduced record."""
    mode_dir = work / mode
    shutil.rmtree(mode_dir, ignore_errors=True)
    mode_dir.mkdir(parents=True)
    t0 = time.monotonic()
    MODES[mode](model, mode_dir / "run", mode_dir)
    record = reduce_run(mode_dir / "run")
    record["wall_s"] = round(time.monotonic() - t0, 1)
    return record


# ------------------------------------------------------------------ comparison


def _close(a: float | None, b: float | None, rtol: float, atol: float) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return abs(a - b) <= atol + rtol * abs(b)


def compare(mode: str, want: dict[str, Any], got: dict[str, Any], metric_atol: float = 1e-6, rtol: float = 1e-5, atol: float = 1e-6) -> list[str]:
    """Every difference between two records of ``mode``, one line each (empty: equal)."""
    diffs: list[str] = []
    want_rounds = [r["round"] for r in want["rounds"]]
    got_rounds = [r["round"] for r in got["rounds"]]
    if want_rounds != got_rounds:
        diffs.append(f"{mode}: metrics rounds {got_rounds}, reference {want_rounds}")
    for w, g in zip(want["rounds"], got["rounds"], strict=False):
        for key in METRIC_KEYS:
            if not _close(g.get(key), w.get(key), 0.0, metric_atol):
                diffs.append(f"{mode}: round {w['round']} {key} = {g.get(key)!r}, reference {w.get(key)!r}")
    if sorted(want["adapter"]) != sorted(got["adapter"]):
        diffs.append(f"{mode}: adapter tensors {sorted(set(got['adapter']) ^ set(want['adapter']))} added/missing")
    for name, w in want["adapter"].items():
        g = got["adapter"].get(name)
        if g is None:
            continue
        if g["shape"] != w["shape"]:
            diffs.append(f"{mode}: tensor {name} shape {g['shape']}, reference {w['shape']}")
            continue
        for stat in ("sum", "l2", "dot"):
            if not _close(g[stat], w[stat], rtol, atol):
                diffs.append(f"{mode}: tensor {name} {stat} = {g[stat]!r}, reference {w[stat]!r}")
    return diffs


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="write the reference JSON here")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    p.add_argument("--repeat", type=int, default=1, help="run each mode this many times and report differences between runs")
    p.add_argument("--work", type=Path, default=None, help="keep run directories here (default: a temp dir)")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown modes {unknown}")
    work = args.work or Path(tempfile.mkdtemp(prefix="dpeft-ref-"))
    model = make_tiny_model(work / "tiny-bert")
    records: dict[str, Any] = {}
    status = 0
    for mode in modes:
        first = run_mode(mode, model, work)
        records[mode] = first
        print(f"{mode}: {first['wall_s']} s", file=sys.stderr, flush=True)
        for i in range(1, args.repeat):
            again = run_mode(mode, model, work)
            diffs = compare(mode, first, again, metric_atol=0.0, rtol=0.0, atol=0.0)
            print(f"{mode}: repeat {i}: {'identical' if not diffs else f'{len(diffs)} differences'} ({again['wall_s']} s)", file=sys.stderr)
            for d in diffs:
                print("   ", d, file=sys.stderr)
            status = status or (1 if compare(mode, first, again) else 0)
    if args.out:
        for rec in records.values():
            rec.pop("wall_s", None)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"commit": git_commit(), "modes": records}, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
