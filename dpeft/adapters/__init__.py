"""PEFT adapters through Hugging Face peft: build base+adapter, extract/load state, export."""

from dpeft.adapters.model import ModelBundle, build_model, resolve_model_source
from dpeft.adapters.selection import adapter_parameters, export_peft_dir, extract_state, load_state

__all__ = [
    "ModelBundle",
    "adapter_parameters",
    "build_model",
    "export_peft_dir",
    "extract_state",
    "load_state",
    "resolve_model_source",
]
