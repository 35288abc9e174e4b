"""The Python API: the ``dpeft`` facade, ``dpeft.simulate`` from a script (a typed result, a
plug-in selected in code), and Ctrl-C (SIGINT) stopping it with nothing left running."""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).resolve().parent / "plugins_fixture"
SERVICES = re.compile(r"^dpeft_(launch|coordinator|workers)(\.|$)")


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(FIXTURE), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def test_import_is_cheap_and_names_resolve() -> None:
    code = (
        "import sys, dpeft\n"
        "assert 'torch' not in sys.modules and not any(m.startswith('dpeft_') for m in sys.modules), sorted(sys.modules)\n"
        "assert sorted(dpeft.__all__) == sorted(dpeft._EXPORTS)\n"
        "missing = [n for n in dpeft.__all__ if getattr(dpeft, n, None) is None]\n"
        "assert not missing, missing\n"
        "print(dpeft.simulate.__module__, dpeft.RunResult.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["dpeft_launch.api", "dpeft_launch.api"]


def test_only_the_facade_names_a_service() -> None:
    """No module of the library refers to a service by name (docstrings aside): the facade in
    dpeft/__init__.py is the one deliberate exception to the layering contract."""
    naming = set()
    for path in (ROOT / "dpeft").rglob("*.py"):
        if "_proto" in path.parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docstrings
                and SERVICES.match(node.value)
            ):
                naming.add(path.relative_to(ROOT).as_posix())
    assert naming == {"dpeft/__init__.py"}


RUN_SCRIPT = """\
import dpeft, demo_plugin

cfg = dpeft.RunConfig(
    rounds=1, clients=2, clients_per_round=2, run_dir={run_dir!r},
    model=dpeft.ModelConfig(max_length=16),
    data=dpeft.DataConfig(dataset="demo_toy", options={{"size": 48}}, test_examples=8, partition="iid"),
    train=dpeft.TrainConfig(local_steps=1, batch_size=4),
    strategy=dpeft.StrategyConfig(name="demo_capped"),
    simulate=dpeft.SimulateConfig(processes=1, start="fork"),
)
result = dpeft.simulate(cfg, ["strategy.options.max_step_norm=2.5"], plugins=["demo_plugin"], fresh=True)
assert isinstance(result, dpeft.RunResult)
print("ROUNDS", [r["round"] for r in result.rows])
print("ACC", result.metric("eval_accuracy"))
print("ADAPTER", type(result.adapter).__name__, len(result.adapter))
print("EXPORT", result.export_path, (result.export_path / "adapter_config.json").is_file())
print("DIR", result.run_dir, result.resumed_from, result.elapsed_s > 0, result.config.plugins, result.config.strategy.options)
"""


@pytest.mark.integration
def test_simulate_from_python(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT.format(run_dir=str(run_dir)))
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = dict(line.split(" ", 1) for line in p.stdout.splitlines() if line.split(" ", 1)[0].isupper())
    assert out["ROUNDS"] == "[0, 1]"
    assert len(eval(out["ACC"])) == 2  # noqa: S307 - our own printed list
    kind, n = out["ADAPTER"].split()
    assert kind == "AdapterState" and int(n) > 0
    assert out["EXPORT"] == f"{run_dir / 'adapter'} True"
    assert out["DIR"] == f"{run_dir} None True ['demo_plugin'] {{'max_step_norm': 2.5}}"
    assert "round 1/1" in p.stderr  # the command line's progress lines


INTERRUPT_SCRIPT = """\
import dpeft, sys

try:
    dpeft.simulate(None, ["rounds=50", "clients=2", "clients_per_round=2", "model.max_length=16", "train.local_steps=2",
                          "train.batch_size=4", "data.max_train_examples=64", "data.test_examples=16", "data.partition=iid",
                          "simulate.processes=2", "run_dir={run_dir}"], fresh=True)
except KeyboardInterrupt:
    print("STOPPED", flush=True)
    sys.exit(0)
print("FINISHED")
"""


@pytest.mark.integration
def test_ctrl_c_stops_simulate_and_leaves_nothing_running(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(INTERRUPT_SCRIPT.format(run_dir=tmp_path / "run"))
    p = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path
    )
    me = psutil.Process(p.pid)
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 240
        assert p.stderr is not None
        for line in p.stderr:  # progress lines, as on the command line
            for child in me.children(recursive=True):
                seen.setdefault(child.pid, child)
            if line.startswith("round 1/50"):
                break
            assert time.monotonic() < deadline, "no round 1 in time"
        assert len(seen) >= 2, "the two worker processes were not seen"
        os.kill(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=60)
        time.sleep(0.5)  # reaped children may take a moment to vanish from /proc
        left = _alive(list(seen.values()))
    finally:
        p.kill()
        p.wait()
        for child in _alive(list(seen.values())):  # a failed test leaves nothing behind either
            child.kill()
    assert p.returncode == 0 and "STOPPED" in out, (out, err)
    assert "Traceback" not in err, err
    assert left == [], f"worker processes outlived the interrupted run: {left}"


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.NoSuchProcess:
            pass
    return out
