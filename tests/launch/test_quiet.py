"""Third-party chatter is off by default and back with --debug/-v/DPEFT_VERBOSE (checked in real child processes)."""

from __future__ import annotations

import os
import subprocess
import sys

from dpeft_launch.quiet import quiet_defaults

NOISE = (
    "import warnings\n"
    "from tqdm.auto import tqdm\n"
    "list(tqdm(range(3), desc='Converting and de-quantizing GGUF tensors...'))\n"
    "warnings.warn('`is_gradient_checkpointing` is deprecated and will be removed in v6. Use x', FutureWarning)\n"
    "warnings.warn('a warning of our own', FutureWarning)\n"
)


def _child_stderr(env: dict[str, str]) -> str:
    return subprocess.run([sys.executable, "-c", NOISE], env=env, capture_output=True, text=True, timeout=60).stderr


def test_quiet_defaults_silence_the_libraries_in_child_processes() -> None:
    base = {k: v for k, v in os.environ.items() if k not in ("GRPC_VERBOSITY", "TQDM_DISABLE", "PYTHONWARNINGS", "DPEFT_VERBOSE")}
    loud = _child_stderr(base)
    assert "de-quantizing" in loud and "is_gradient_checkpointing" in loud
    env = dict(base)
    assert quiet_defaults([], env)
    assert env["GRPC_VERBOSITY"] == "ERROR"
    quiet = _child_stderr(env)
    assert "de-quantizing" not in quiet and "is_gradient_checkpointing" not in quiet
    assert "a warning of our own" in quiet  # only the named warning is filtered


def test_the_user_and_verbose_flags_win() -> None:
    env = {"GRPC_VERBOSITY": "DEBUG", "PYTHONWARNINGS": "error::DeprecationWarning"}
    assert quiet_defaults(["worker"], env)
    assert env["GRPC_VERBOSITY"] == "DEBUG" and env["PYTHONWARNINGS"].startswith("error::DeprecationWarning,ignore:")
    for argv, extra in ((["--debug", "worker"], {}), (["-v", "simulate"], {}), (["simulate"], {"DPEFT_VERBOSE": "1"})):
        env = dict(extra)
        assert not quiet_defaults(argv, env)
        assert "GRPC_VERBOSITY" not in env and "TQDM_DISABLE" not in env
