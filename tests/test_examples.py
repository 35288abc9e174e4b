"""Every example config under examples/ loads and validates (an unknown key, a wrong type or an
impossible value in a shipped example fails here, not on a user's machine), and every runnable
example runs on a tiny slice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from dpeft.validate import load_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FILES = sorted(EXAMPLES.rglob("*.yaml"))


def test_there_are_examples() -> None:
    names = {p.relative_to(EXAMPLES).as_posix() for p in FILES}
    assert {"llm/smollm2-cpu.yaml", "llm/smollm2-gpu.yaml", "llm/ray-qlora.yaml", "llm/llama-7b-qlora.yaml"} <= names


@pytest.mark.parametrize("path", FILES, ids=[p.relative_to(EXAMPLES).as_posix() for p in FILES])
def test_example_config_loads(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if path.parent.name == "ray":  # its README runs it with PYTHONPATH=../custom_dataset (the plug-in loader)
        monkeypatch.syspath_prepend(str(EXAMPLES / "custom_dataset"))
    cfg = load_config(path)
    if "llm" in path.parts:
        assert cfg.model.task == "causal_lm"
        assert cfg.data.format in ("instruction", "chat")


# ---------------------------------------------------------------- runnable examples, on a tiny slice

#: a one-round MiniLM run that only checks the plumbing
TINY = ["rounds=1", "clients=2", "clients_per_round=2", "model.max_length=16", "train.local_steps=1", "train.batch_size=4"]
_BIN = Path(sys.executable).parent / "dpeft"
DPEFT = [str(_BIN)] if _BIN.exists() else [sys.executable, "-m", "dpeft_launch.cli"]


def run_example(args: list[str], where: Path, tmp_path: Path, timeout: float = 300, **env: str) -> str:
    """Run ``args`` in example directory ``where``; its stderr (the test fails on a nonzero exit)."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **env)
    p = subprocess.Popen(
        args, cwd=where, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 0, f"{' '.join(args)} exited {p.returncode}:\n{out}\n{err}"
    return out + err


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.integration
def test_custom_strategy_example(tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = run_example(
        [
            sys.executable,
            "run.py",
            *TINY,
            "data.max_train_examples=40",
            "data.test_examples=8",
            "simulate.processes=1",
            f"run_dir={run}",
        ],
        EXAMPLES / "custom_strategy",
        tmp_path,
    )
    assert "server step per round: [1.0]" in out
    assert rows_of(run)[-1]["server_step_lr"] == 1.0


@pytest.mark.integration
def test_custom_dataset_example(tmp_path: Path) -> None:
    """The `dpeft` command in the example's directory finds the plug-in there (the console
    script's sys.path lacks the current directory)."""
    run = tmp_path / "run"
    run_example(
        [*DPEFT, "simulate", "--config", "config.yaml", *TINY, "data.options.examples=40", "data.test_examples=8",
         "data.partition=iid", "simulate.processes=1", f"run_dir={run}"],
        EXAMPLES / "custom_dataset",
        tmp_path,
    )  # fmt: skip
    assert rows_of(run)[-1]["round"] == 1 and (run / "adapter" / "adapter_config.json").is_file()


@pytest.mark.integration
def test_llm_example(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_example(
        [*DPEFT, "simulate", "--config", "smollm2-cpu.yaml", "model.layers=2", "rounds=1", "clients=2", "clients_per_round=2",
         "model.max_length=48", "data.partition=iid", "data.max_train_examples=16", "data.test_examples=4", "train.local_steps=1",
         "train.batch_size=2", "eval.generate_examples=2", "eval.max_new_tokens=2", "simulate.processes=1", f"run_dir={run}"],
        EXAMPLES / "llm",
        tmp_path,
    )  # fmt: skip
    assert "gen_accuracy" in rows_of(run)[-1]


@pytest.mark.integration
def test_edge_tls_example(tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = run_example(
        [sys.executable, "run.py", *TINY, "data.max_train_examples=40", "data.test_examples=8", f"run_dir={run}"],
        EXAMPLES / "edge_tls",
        tmp_path,
        CERTS_DIR=str(tmp_path / "certs"),
    )
    assert "TLS, 1 worker tokens" in out and "coordinator exited 0, worker exited 0" in out
    assert rows_of(run)[-1]["round"] == 1


@pytest.mark.integration
def test_ray_example(tmp_path: Path) -> None:
    """A local Ray (its own temp dir, shut down by `dpeft ray`), one actor that imports the
    custom_dataset plug-in to load its data."""
    pytest.importorskip("ray")
    run = tmp_path / "run"
    ray_tmp = tempfile.mkdtemp(prefix="dpr-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    try:
        run_example(
            [*DPEFT, "ray", "--config", "config.yaml", *TINY, "data.options.examples=40", "data.test_examples=8", "ray.actors=1",
             "ray.local_num_cpus=1", f"run_dir={run}"],
            EXAMPLES / "ray",
            tmp_path,
            timeout=400,
            RAY_AUTH_MODE="disabled",
            RAY_TMPDIR=ray_tmp,
            PYTHONPATH=str(EXAMPLES / "custom_dataset"),
        )  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert rows_of(run)[-1]["round"] == 1
