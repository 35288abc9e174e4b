"""Third-party chatter off by default: what gRPC, transformers and tqdm print is not the run's output.

Set before gRPC or transformers are imported (the `dpeft` entry point calls :func:`quiet_defaults`
first thing), and through the environment so worker processes inherit it:

- ``GRPC_VERBOSITY=ERROR``: no ``I1204 ... ssl_transport_security.cc`` lines from gRPC's core;
- ``TQDM_DISABLE=1``, ``HF_HUB_DISABLE_PROGRESS_BARS=1``: no progress bars from libraries (the GGUF
  de-quantization bar of a quantized model load);
- a warnings filter (also in ``PYTHONWARNINGS``) for transformers' ``is_gradient_checkpointing``
  deprecation, which PEFT triggers on every model build.

A value the user set wins, and ``--debug``, ``-v``/``--verbose`` or ``DPEFT_VERBOSE=1`` leave
everything as the libraries have it.
"""

from __future__ import annotations

import builtins
import os
import sys
import warnings
from collections.abc import MutableMapping, Sequence

#: environment defaults applied unless verbose
ENV_DEFAULTS = {"GRPC_VERBOSITY": "ERROR", "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
#: (message start, category) of warnings that say nothing to a dpeft user
IGNORED_WARNINGS = [("`is_gradient_checkpointing` is deprecated", "FutureWarning")]
VERBOSE_FLAGS = ("--debug", "-v", "--verbose")


def is_verbose(argv: Sequence[str], environ: MutableMapping[str, str]) -> bool:
    """True when the user asked for the libraries' own output."""
    return environ.get("DPEFT_VERBOSE", "") not in ("", "0") or any(a in VERBOSE_FLAGS for a in argv)


def quiet_defaults(argv: Sequence[str] | None = None, environ: MutableMapping[str, str] | None = None) -> bool:
    """Apply the quiet defaults (True) unless verbose (False)."""
    argv = sys.argv[1:] if argv is None else argv
    env = os.environ if environ is None else environ
    if is_verbose(argv, env):
        return False
    for key, value in ENV_DEFAULTS.items():
        env.setdefault(key, value)
    filters = [f for f in env.get("PYTHONWARNINGS", "").split(",") if f]
    for message, category in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=getattr(builtins, category))
        spec = f"ignore:{message}:{category}"
        if spec not in filters:
            filters.append(spec)
    env["PYTHONWARNINGS"] = ",".join(filters)
    return True
