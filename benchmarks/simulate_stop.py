"""How long `dpeft simulate` takes to stop: SIGTERM at several moments of a run, timed until no
process of the run is left.

Each trial starts a fresh run of the tiny default task with long local training (so a signal
finds workers mid-task), waits for a moment (a line on stderr plus a delay), sends SIGTERM to
the `dpeft simulate` process, and polls the run's process tree (the command and every
descendant seen while it ran) until none is alive. Prints one line per trial and the maximum.

    python benchmarks/simulate_stop.py                # five moments, one run each
    python benchmarks/simulate_stop.py --repeat 2     # each moment twice
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import psutil

#: (name, stderr line to wait for, seconds after it) of each SIGTERM
MOMENTS = [
    ("workers starting", r"listening on", 0.5),
    ("round 1 just started", r"^round 1/", 0.0),
    ("mid-task (+1.5 s)", r"^round 1/", 1.5),
    ("mid-task (+3 s)", r"^round 1/", 3.0),
    ("round 2 mid-task", r"^round 2/", 1.0),
]

ARGS = [
    "rounds=20", "clients=4", "clients_per_round=4", "train.local_steps=60", "train.batch_size=8",
    "data.max_train_examples=200", "data.test_examples=32", "data.partition=iid", "model.max_length=32",
    "simulate.processes=2",
]  # fmt: skip


def _alive(procs: dict[int, psutil.Process]) -> list[int]:
    out = []
    for pid, p in procs.items():
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def trial(pattern: str, delay: float, extra: list[str]) -> tuple[float, int | None]:
    """Seconds from SIGTERM until no process of the run is alive, and the exit code."""
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, "-m", "dpeft_launch.cli", "simulate", "--fresh", *ARGS, *extra, f"run_dir={run_dir}"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        seen: dict[int, psutil.Process] = {proc.pid: psutil.Process(proc.pid)}
        done = threading.Event()
        hit = threading.Event()

        def watch_tree() -> None:
            while not done.is_set():
                try:
                    for c in seen[proc.pid].children(recursive=True):
                        seen.setdefault(c.pid, c)
                except psutil.NoSuchProcess:
                    pass
                time.sleep(0.05)

        def read_err() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                if re.search(pattern, line):
                    hit.set()

        threading.Thread(target=watch_tree, daemon=True).start()
        threading.Thread(target=read_err, daemon=True).start()
        if not hit.wait(300):
            proc.kill()
            raise RuntimeError(f"never saw {pattern!r}")
        time.sleep(delay)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        while _alive(seen) and time.monotonic() - t0 < 60:
            time.sleep(0.02)
        took = time.monotonic() - t0
        done.set()
        rc = proc.wait(timeout=5)
        for pid in _alive(seen):
            os.kill(pid, signal.SIGKILL)
        return took, rc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="more key=value for the run (e.g. simulate.start=spawn)")
    args = p.parse_args()
    worst = 0.0
    for _ in range(args.repeat):
        for name, pattern, delay in MOMENTS:
            took, rc = trial(pattern, delay, args.overrides)
            worst = max(worst, took)
            print(f"{name:24s} {took:5.1f} s to no process (exit {rc})", flush=True)
    print(f"worst {worst:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
