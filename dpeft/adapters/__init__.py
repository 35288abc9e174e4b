"""PEFT adapters (Hugging Face peft methods and dpeft's own ReFT and bottleneck adapters): build base+adapter, extract/load state, export, load an export."""

import logging as _logging
import os as _os

# before anything imports peft (which imports bitsandbytes): no hub look-ups, and no warning
# that bitsandbytes' optional CPU kernel from the hub is missing (its built-in one is used)
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
for _name in ("bitsandbytes.backends.cpu.ops", "kernels"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

from dpeft.adapters._deferred_compile import deferred_torch_compile as _deferred_torch_compile  # noqa: E402

with _deferred_torch_compile():  # bitsandbytes (imported by peft) compiles at first use, not at start-up
    import peft as _peft  # noqa: E402, F401

from dpeft.adapters.model import ModelBundle, build_model, resolve_model_source  # noqa: E402
from dpeft.adapters.native import NativeAdapterModel, load_adapter  # noqa: E402
from dpeft.adapters.selection import adapter_parameters, export_peft_dir, extract_state, load_state  # noqa: E402

__all__ = [
    "ModelBundle",
    "NativeAdapterModel",
    "adapter_parameters",
    "build_model",
    "export_peft_dir",
    "extract_state",
    "load_adapter",
    "load_state",
    "resolve_model_source",
]
