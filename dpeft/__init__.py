"""dpeft: distributed and federated parameter-efficient fine-tuning.

``dpeft.load_adapter(base_model, path)`` applies an exported adapter directory (dpeft's own
methods or a peft one) to a base model; it is :func:`dpeft.adapters.load_adapter`, imported on
first use so that ``import dpeft`` stays light.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "load_adapter":
        from dpeft.adapters import load_adapter

        return load_adapter
    raise AttributeError(f"module 'dpeft' has no attribute {name!r}")
