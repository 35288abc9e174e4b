"""Integration helpers: run the real `dpeft` command in subprocesses, watch their process trees.

Imported by ``conftest.py`` (which defines the ``procs`` fixture) and by the tests
(``from integration_testlib import ...``, like ``codec_testlib`` next door).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_BIN = Path(sys.executable).parent / "dpeft"
#: how to invoke the installed console script (falls back to the module)
DPEFT: list[str] = [str(_BIN)] if _BIN.exists() else [sys.executable, "-m", "dpeft_launch.cli"]

#: the "tiny" settings every run starts from (MiniLM default model, iid rotten tomatoes)
TINY: dict[str, Any] = {
    "rounds": 2,
    "clients": 4,
    "clients_per_round": 2,
    "train.local_steps": 8,
    "train.batch_size": 8,
    "data.max_train_examples": 400,
    "data.test_examples": 100,
    "data.partition": "iid",
    "train.lr": 0.003,
    "simulate.processes": 2,
}

#: for runs that only check plumbing, not learning: shorter sequences (rotten tomatoes
#: snippets are ~26 tokens median), half the compute of the default 64
SHORT = {"model__max_length": 32}

#: keys every metrics.jsonl row must carry
METRIC_KEYS = (
    "round",
    "clients",
    "num_examples",
    "train_loss",
    "eval_loss",
    "eval_accuracy",
    "bytes_up",
    "bytes_down",
    "wall_s",
    "rejected",
)


def overrides(run_dir: Path | str | None = None, **changes: Any) -> list[str]:
    """``key=value`` arguments: TINY updated with ``changes`` (dots spelled ``__``)."""
    values = dict(TINY)
    for key, value in changes.items():
        values[key.replace("__", ".")] = value
    if run_dir is not None:
        values["run_dir"] = str(run_dir)
    return [f"{k}={v}" for k, v in values.items()]


def child_env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Started:
    """A `dpeft` subprocess whose stderr is read line by line in a thread; descendants are polled."""

    def __init__(self, args: list[str], cwd: Path | None = None, poll_s: float = 0.2) -> None:
        self.args = [*DPEFT, *args]
        self.popen = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
            cwd=cwd,
            start_new_session=True,  # its own process group: a timeout kills exactly this tree
        )
        self.pid = self.popen.pid
        self.started = time.monotonic()
        self.lines: list[str] = []
        self.stdout = ""
        self._line_cond = threading.Condition()
        self._eof = False
        self.descendants: dict[int, psutil.Process] = {}
        self.cmdlines: dict[int, list[str]] = {}
        self.forked_workers: set[int] = set()
        self._stop_watch = threading.Event()
        self._readers = [
            threading.Thread(target=self._read_err, daemon=True),
            threading.Thread(target=self._read_out, daemon=True),
        ]
        for t in self._readers:
            t.start()
        self._watcher = threading.Thread(target=self._watch, args=(poll_s,), daemon=True)
        self._watcher.start()

    # -- output -----------------------------------------------------------------
    def _read_err(self) -> None:
        assert self.popen.stderr is not None
        for raw in self.popen.stderr:
            with self._line_cond:
                self.lines.append(raw.decode("utf-8", "replace"))
                self._line_cond.notify_all()
        with self._line_cond:
            self._eof = True
            self._line_cond.notify_all()

    def _read_out(self) -> None:
        assert self.popen.stdout is not None
        self.stdout = self.popen.stdout.read().decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        with self._line_cond:
            return "".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first stderr line matching ``pattern``; fails the test on timeout or exit."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._line_cond:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                if self._eof:
                    pytest.fail(
                        f"{' '.join(self.args)} exited (rc={self.popen.poll()}) before printing /{pattern}/:\n{''.join(self.lines)}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no /{pattern}/ on stderr within {timeout}s:\n{''.join(self.lines)}")
                self._line_cond.wait(min(left, 0.5))

    # -- process tree -----------------------------------------------------------
    def _watch(self, poll_s: float) -> None:
        try:
            me = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop_watch.is_set():
            try:
                for child in me.children(recursive=True):
                    try:  # forked simulate workers rename themselves (comm) right after the fork
                        if child.name().startswith("dpeft-sim-"):
                            self.forked_workers.add(child.pid)
                    except psutil.Error:
                        pass
                    if child.pid not in self.descendants:
                        self.descendants[child.pid] = child
                    if "worker" not in self.cmdlines.get(child.pid, []):
                        # read again until it is a worker's: a child seen between its fork and its
                        # exec still shows the parent's command line
                        try:
                            self.cmdlines[child.pid] = child.cmdline()
                        except psutil.Error:
                            self.cmdlines.setdefault(child.pid, [])
            except psutil.NoSuchProcess:
                return
            if self.popen.poll() is not None:
                return
            time.sleep(poll_s)

    def children_seen(self) -> list[psutil.Process]:
        return list(self.descendants.values())

    def workers_seen(self) -> list[psutil.Process]:
        """Descendants whose command line was a `dpeft ... worker` (as first seen), or forked workers."""
        return [p for pid, p in self.descendants.items() if "worker" in self.cmdlines.get(pid, []) or pid in self.forked_workers]

    def alive_descendants(self) -> list[psutil.Process]:
        return [p for p in self.descendants.values() if _alive(p)]

    # -- lifecycle --------------------------------------------------------------
    def wait(self, timeout: float) -> int:
        """Exit code; on timeout kill this process group and fail."""
        try:
            rc = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_tree()
            pytest.fail(f"{' '.join(self.args)} did not finish within {timeout}s; stderr:\n{self.stderr}")
        for t in self._readers:
            t.join(timeout=10)
        self._stop_watch.set()
        self._watcher.join(timeout=5)
        return rc

    def kill_tree(self) -> None:
        """SIGKILL this process (and its group, while it lives) and every live descendant seen.

        Only processes this helper started or saw as descendants are touched; psutil checks
        each one's identity (pid + start time), so a recycled pid is never hit.
        """
        if self.popen.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for p in self.alive_descendants():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def elapsed(self) -> float:
        return time.monotonic() - self.started


class Procs:
    """Registry of the processes a test started; checked for leftovers at teardown."""

    def __init__(self) -> None:
        self.started: list[Started] = []

    def start(self, *args: str, cwd: Path | None = None) -> Started:
        s = Started(list(args), cwd=cwd)
        self.started.append(s)
        return s

    def run(self, *args: str, timeout: float = 240, cwd: Path | None = None) -> tuple[int, Started]:
        """Run `dpeft ARGS` to completion (killed and failed after ``timeout``)."""
        s = self.start(*args, cwd=cwd)
        return s.wait(timeout), s

    def leftovers(self, grace_s: float = 0.0) -> list[psutil.Process]:
        deadline = time.monotonic() + grace_s
        while True:
            alive = []
            for s in self.started:
                if s.popen.poll() is None:
                    try:
                        alive.append(psutil.Process(s.pid))
                    except psutil.NoSuchProcess:
                        pass
                alive.extend(s.alive_descendants())
            if not alive or time.monotonic() >= deadline:
                return alive
            time.sleep(0.2)


# ---------------------------------------------------------------------- run-dir readers


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    assert path.is_file(), f"no {path}"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text, f"traceback in output:\n{text}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def minilm_dir() -> str:
    from dpeft.adapters import resolve_model_source
    from dpeft.config import ModelConfig

    return resolve_model_source(ModelConfig())[0]


SAMPLE_TEXTS = [
    "a gorgeous, witty, seductive movie.",
    "the plot is nothing but boilerplate cliches from start to finish.",
    "an absolute joy to watch, with a terrific cast.",
    "it's a dull, lifeless, tedious mess.",
]


def compare_exported_adapter(run_dir: Path, atol: float = 1e-5, check_trained: bool = True) -> dict[str, Any]:
    """Load ``run_dir/adapter`` with plain peft and compare its logits with dpeft's own model
    carrying the latest checkpointed global state. Returns the adapter_config.json dict."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from dpeft.adapters import build_model, load_state
    from dpeft.rounds.checkpoint import latest_checkpoint
    from dpeft.validate import load_config

    adapter_dir = run_dir / "adapter"
    assert (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "adapter_model.safetensors").is_file()
    cfg = load_config(run_dir / "config.yaml")
    found = latest_checkpoint(run_dir / "checkpoints")
    assert found is not None, "no readable checkpoint"
    round_num, state, _strategy, _info = found
    assert round_num == cfg.rounds

    torch.manual_seed(1234)  # a different seed from dpeft's: nothing may depend on init luck
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    plain = PeftModel.from_pretrained(base, str(adapter_dir))
    plain.eval()

    ours = build_model(cfg.model, cfg.adapter, 2, cfg.seed)
    load_state(ours.model, state)
    ours.model.eval()

    batch = ours.tokenizer(SAMPLE_TEXTS, padding=True, truncation=True, max_length=cfg.model.max_length, return_tensors="pt")
    with torch.no_grad():
        want = ours.model(**batch).logits
        got = plain(**batch).logits
    assert got.shape == want.shape == (len(SAMPLE_TEXTS), 2)
    diff = (got - want).abs().max().item()
    assert diff <= atol, f"exported adapter logits differ from the checkpointed global state by {diff}"
    if not check_trained:
        return json.loads((adapter_dir / "adapter_config.json").read_text())
    # and the checkpoint is not just the initial adapter: training changed the logits
    fresh = build_model(cfg.model, cfg.adapter, 2, cfg.seed)
    fresh.model.eval()
    with torch.no_grad():
        init = fresh.model(**batch).logits
    assert (init - want).abs().max().item() > 1e-4, "global adapter after training equals the initial one"
    return json.loads((adapter_dir / "adapter_config.json").read_text())
