"""Adapter methods dpeft implements itself (peft has none usable): ReFT and bottleneck adapters.

:class:`NativeAdapterModel` wraps a frozen transformers model and hooks the method's modules
onto it (:mod:`dpeft.adapters.reft`, :mod:`dpeft.adapters.bottleneck`); the base's weights are
never changed. It offers what dpeft's round code uses of a peft model (``active_adapter``,
``get_base_model``, ``generate``, ``save_pretrained``), and :func:`adapter_parameters` names its
tensors structurally: ``reft.<layer>.R`` / ``reft.<layer>.W.weight`` ..., ``bottleneck.<layer>_ffn.up.weight``
..., and the classifier head of a classification model under its module path (``classifier.weight``).

Export: a directory with ``dpeft_adapter.json`` (method, rank, options, layers, head modules)
and ``adapter_model.safetensors``. :func:`load_adapter` applies such a directory, or a peft one,
to a base model in one line::

    model = dpeft.adapters.load_adapter(AutoModelForSequenceClassification.from_pretrained(base), "runs/x/adapter")
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from dpeft.adapters.bottleneck import BottleneckModule, BottleneckOptions
from dpeft.adapters.reft import ReftModule, ReftOptions, project_state
from dpeft.config import AdapterConfig
from dpeft.config.options import parse_options
from dpeft.errors import ConfigError
from dpeft.state import AdapterState

#: method name -> its ``adapter.options`` dataclass
NATIVE_METHODS: dict[str, type] = {
    "loreft": ReftOptions,
    "direft": ReftOptions,
    "houlsby": BottleneckOptions,
    "pfeiffer": BottleneckOptions,
}
#: methods whose aggregated global is projected back onto a constraint set (LoReFT: orthonormal R)
PROJECTED_METHODS = ("loreft",)
CONFIG_FILE = "dpeft_adapter.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_HEADS = ("classifier", "score")
_FORMAT = 1


def is_native(method: str) -> bool:
    """Whether ``adapter.method`` names a method dpeft implements itself."""
    return method.strip().lower() in NATIVE_METHODS


def native_options(adapter: AdapterConfig) -> Any:
    """The typed ``adapter.options`` of a native method (ConfigError naming ``adapter.options.<key>``)."""
    method = adapter.method.strip().lower()
    opts = parse_options(NATIVE_METHODS[method], adapter.options, "adapter.options", f"adapter.method {method!r}")
    if isinstance(opts, ReftOptions):
        from dpeft.adapters.reft import parse_positions

        parse_positions(opts.positions)
    return opts


def transformer_blocks(base: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (the ModuleList as long as ``config.num_hidden_layers``)."""
    want = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    for _, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == want:
            return module
    raise ConfigError("adapter.method", f"cannot find the {want} transformer blocks of {type(base).__name__}")


def head_modules(base: nn.Module, task: str, modules_to_save: list[str] | None) -> list[str]:
    """Module paths trained and exchanged in full: ``adapter.modules_to_save``, else the classifier head (seq_cls)."""
    wanted = modules_to_save if modules_to_save is not None else (list(_HEADS) if task == "seq_cls" else [])
    found = [name for name, _ in base.named_modules() if name and name.split(".")[-1] in wanted]
    # keep the outermost match only (a head's own submodules are inside it)
    return [n for n in found if not any(n.startswith(other + ".") for other in found)]


def spec_from_config(adapter: AdapterConfig, task: str, base: nn.Module, base_model: str = "") -> dict[str, Any]:
    """The JSON description of a native adapter (what the export writes and the loader reads)."""
    method = adapter.method.strip().lower()
    opts = native_options(adapter)
    count = len(transformer_blocks(base))
    layers = list(range(count)) if opts.layers is None else sorted(set(opts.layers))
    if layers and layers[-1] >= count:
        raise ConfigError("adapter.options.layers", f"the model has layers 0..{count - 1}, got {layers[-1]}")
    options = {**dataclasses.asdict(opts), "layers": layers}
    return {
        "format": _FORMAT,
        "method": method,
        "r": adapter.r,
        "dropout": adapter.dropout,
        "options": options,
        "task": task,
        "head": head_modules(base, task, adapter.modules_to_save),
        "hidden_size": int(cast(Any, base).config.hidden_size),
        "base_model": base_model,
    }


class NativeAdapterModel(nn.Module):
    """A frozen base model with a native adapter hooked onto it (see the module docstring)."""

    def __init__(self, base: nn.Module, spec: dict[str, Any], seed: int = 0) -> None:
        super().__init__()
        self.base_model = base
        self.spec = spec
        self.active_adapter = "default"
        method, opts = spec["method"], spec["options"]
        dim, layers = int(spec["hidden_size"]), list(opts["layers"])
        if method in ("loreft", "direft"):
            ropts = ReftOptions(**opts)
            self.prefix = "reft"
            module: nn.Module = ReftModule(method, dim, int(spec["r"]), layers, ropts, seed, float(spec["dropout"]))
        else:
            self.prefix = "bottleneck"
            module = BottleneckModule(method, dim, layers, BottleneckOptions(**opts), seed, float(spec["dropout"]))
        self.add_module(self.prefix, module)
        for p in base.parameters():
            p.requires_grad_(False)
        self.heads = OrderedDict((name, base.get_submodule(name)) for name in spec["head"])
        for head in self.heads.values():
            head.requires_grad_(True)
        self._handles = module.attach(base, transformer_blocks(base))  # type: ignore[operator]

    @property
    def method(self) -> str:
        """The adapter method (``loreft``, ``direft``, ``houlsby``, ``pfeiffer``)."""
        return str(self.spec["method"])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's ``generate`` with the adapter applied."""
        return self.base_model.generate(*args, **kwargs)  # type: ignore[operator]

    def get_base_model(self) -> nn.Module:
        """The transformers model under the adapter (its hooks stay on it)."""
        return self.base_model

    def adapter_parameters(self, trainable_only: bool = True) -> OrderedDict[str, nn.Parameter]:
        """Structural name -> parameter: the adapter's, then the heads' (``<module path>.<param>``)."""
        out: OrderedDict[str, nn.Parameter] = OrderedDict(
            (f"{self.prefix}.{n}", p) for n, p in self.get_submodule(self.prefix).named_parameters()
        )
        for name, head in self.heads.items():
            for pname, p in head.named_parameters():
                out[f"{name}.{pname}"] = p
        if trainable_only:
            out = OrderedDict((k, p) for k, p in out.items() if p.requires_grad)
        return out

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Keep the adapter's constraints after a local optimizer step (LoReFT: R orthonormal)."""
        step = getattr(self.get_submodule(self.prefix), "after_optimizer_step", None)
        if step is not None:
            step()

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``dpeft_adapter.json`` and ``adapter_model.safetensors`` into ``directory``."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: p.detach().to("cpu").contiguous() for k, p in self.adapter_parameters(trainable_only=False).items()}
        save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        (out / CONFIG_FILE).write_text(json.dumps(self.spec, indent=2, sort_keys=True) + "\n")

    def remove(self) -> nn.Module:
        """Take the hooks off and return the bare base model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self.base_model


def build_native(base: nn.Module, adapter: AdapterConfig, task: str, seed: int, base_model: str = "") -> NativeAdapterModel:
    """Hook the configured native adapter onto ``base`` (seeded init)."""
    return NativeAdapterModel(base, spec_from_config(adapter, task, base, base_model), seed)


def load_adapter(base_model: nn.Module, path: str | Path) -> nn.Module:
    """Apply an exported adapter directory to ``base_model``: a dpeft-native one (``dpeft_adapter.json``)
    or a Hugging Face peft one (``adapter_config.json``). Returns the adapted model, in eval mode."""
    from safetensors.torch import load_file

    directory = Path(path)
    if (directory / CONFIG_FILE).is_file():
        spec = json.loads((directory / CONFIG_FILE).read_text())
        model = NativeAdapterModel(base_model, spec)
        tensors = load_file(str(directory / WEIGHTS_FILE))
        params = model.adapter_parameters(trainable_only=False)
        missing, unknown = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or unknown:
            raise ValueError(f"{directory}: adapter tensors do not match the model: missing {missing[:3]}, unknown {unknown[:3]}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name].to(p.dtype))
        return model.eval()
    if (directory / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, str(directory)).eval()
    raise FileNotFoundError(f"{directory}: neither {CONFIG_FILE} nor adapter_config.json (not an exported adapter)")


def post_aggregate(state: AdapterState) -> AdapterState:
    """The next global after the round's server step, put back onto its method's constraints
    (LoReFT: every ``R`` replaced by its polar factor, the closest matrix with orthonormal rows)."""
    method = str(state.meta.get("method", "")).strip().lower()
    if method not in PROJECTED_METHODS:
        return state
    return AdapterState(OrderedDict(project_state(dict(state.tensors))), state.meta)
