"""Keep ``import peft`` from loading torch's compiler stack at start-up.

peft imports bitsandbytes whenever it is installed, and bitsandbytes wraps a few of its
default kernels in ``torch.compile`` while it is imported. ``torch.compile`` compiles nothing
until the first call, but the call itself imports torch._dynamo and inductor: about a second
of every dpeft process's start-up, paid also by the runs that never quantize.

While peft is first imported (:func:`deferred_torch_compile`), ``torch.compile`` is replaced by
a stand-in that wraps a function and calls the real ``torch.compile`` at the wrapped function's
first call, with the same arguments. What the caller sees does not change: compilation still
happens at the first call, and an error from it still surfaces at that call (bitsandbytes
then runs its plain function, as it does when ``torch.compile`` fails up front; the stand-in
does not try to compile it again). Modules, and anything that is not a plain callable, go to
the real ``torch.compile`` at once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def _deferred(real: Callable[..., Any]) -> Callable[..., Any]:
    def compile_later(model: Any = None, **kwargs: Any) -> Any:
        if model is None:  # used as @torch.compile(...) with arguments
            return lambda fn: compile_later(fn, **kwargs)
        if isinstance(model, torch.nn.Module) or not callable(model):
            return real(model, **kwargs)
        compiled: Callable[..., Any] | None = None

        @functools.wraps(model)
        def run(*args: Any, **kw: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                try:
                    compiled = real(model, **kwargs)
                except Exception:
                    compiled = model  # failed once: the plain function from now on
                    raise
            return compiled(*args, **kw)

        return run

    return compile_later


@contextmanager
def deferred_torch_compile() -> Iterator[None]:
    """Within the block, ``torch.compile(fn)`` returns ``fn`` wrapped to compile at its first call."""
    real = torch.compile
    torch.compile = _deferred(real)
    try:
        yield
    finally:
        torch.compile = real
