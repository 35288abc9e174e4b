"""bitsandbytes' torch.compile calls at import are deferred to the first call (start-up cost)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dpeft.adapters._deferred_compile import _deferred, deferred_torch_compile


class Recorder:
    """Stands in for torch.compile: records what it was asked to compile."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[object, dict]] = []
        self.fail = fail

    def __call__(self, model, **kwargs):
        self.calls.append((model, kwargs))
        if self.fail:
            raise RuntimeError("no compiler here")
        return lambda *a, **k: ("compiled", model(*a, **k))


def test_compiles_at_first_call_with_the_same_arguments():
    real = Recorder()
    wrapped = _deferred(real)(lambda x: x + 1, dynamic=False)
    assert real.calls == []  # nothing compiled (nor imported) when wrapping
    assert wrapped(1) == ("compiled", 2)
    assert wrapped(2) == ("compiled", 3)
    assert len(real.calls) == 1 and real.calls[0][1] == {"dynamic": False}


def test_real_torch_compile_behind_the_stand_in():
    """The stand-in hands its arguments to the real torch.compile (eager backend: no C compiler needed)."""
    wrapped = _deferred(torch.compile)(lambda x: torch.sin(x) * 2 + 1, backend="eager", dynamic=False)
    x = torch.linspace(-1, 1, 7)
    assert torch.allclose(wrapped(x), torch.sin(x) * 2 + 1)


def test_decorator_with_arguments():
    real = Recorder()

    @_deferred(real)(dynamic=False)
    def double(x):
        return 2 * x

    assert double.__name__ == "double" and real.calls == []
    assert double(4) == ("compiled", 8)


def test_failure_surfaces_at_first_call_then_plain_function():
    real = Recorder(fail=True)
    wrapped = _deferred(real)(lambda x: x * 3)
    with pytest.raises(RuntimeError, match="no compiler"):
        wrapped(2)
    assert wrapped(2) == 6 and len(real.calls) == 1  # not retried


def test_modules_compile_at_once():
    real = Recorder()
    layer = torch.nn.Linear(2, 2)
    _deferred(real)(layer)
    assert real.calls and real.calls[0][0] is layer


def test_torch_compile_is_restored_even_on_error():
    before = torch.compile
    with pytest.raises(ValueError), deferred_torch_compile():
        assert torch.compile is not before
        raise ValueError
    assert torch.compile is before


def test_importing_dpeft_adapters_does_not_load_the_compiler():
    code = (
        "import sys, dpeft.adapters, bitsandbytes; "
        "print('torch._inductor.compile_fx' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
