"""Split-mode (DLoRA) settings: the ``split:`` section of the run config, and what split mode supports.

A split config file is an ordinary dpeft run config (model, adapter, data, train, strategy,
rounds, clients, seed, run_dir) whose ``split:`` section (:class:`~dpeft.config.SplitConfig`)
holds the cloud/edge settings; ``split.*=value`` overrides go there like any other key. Unknown
keys and bad values raise ConfigError naming the dotted key, as everywhere in dpeft.
"""

from __future__ import annotations

from pathlib import Path

from dpeft.config import KillReviveConfig, RunConfig, SplitConfig
from dpeft.config.checks import WIRE_DTYPES
from dpeft.config.data_checks import resolve_format
from dpeft.errors import ConfigError
from dpeft.validate import load_config

__all__ = ["WIRE_DTYPES", "KillReviveConfig", "SplitConfig", "load_split_config", "validate_run_for_split"]


def validate_run_for_split(run: RunConfig) -> None:
    """What split mode supports of the run config."""
    if run.model.task not in ("seq_cls", "causal_lm"):
        raise ConfigError("model.task", f"split mode supports seq_cls and causal_lm (Llama models), got {run.model.task!r}")
    fmt = resolve_format(run)
    if fmt in ("instruction", "chat"):
        raise ConfigError("data.format", f"split mode trains classification or plain text (next-token loss on every token), not {fmt} data")
    if run.adapter.method != "lora":
        raise ConfigError("adapter.method", f"split mode supports plain lora, got {run.adapter.method!r}")
    if run.adapter.options.get("use_dora"):
        raise ConfigError("adapter.options.use_dora", "split mode supports plain lora")
    if run.model.quantization != "none":
        raise ConfigError(
            "model.quantization",
            "split mode serves an fp32 base: the cloud runs the base layers for the edges and each edge keeps a slice of the base (embeddings, head); "
            f"a {run.model.quantization} base is not supported there, set model.quantization=none",
        )
    if run.adapter.modules_to_save is not None:
        raise ConfigError("adapter.modules_to_save", "split mode trains the LoRA factors and the classifier head only (leave it null)")
    if run.eval.federated:
        raise ConfigError("eval.federated", "split mode has no federated evaluation (the cloud evaluates); set it to false")
    if run.train.loss not in ("cross_entropy", "prior_calibrated"):
        raise ConfigError("train.loss", f"split mode trains with the built-in losses only (cross_entropy, prior_calibrated), not the plug-in {run.train.loss!r}")
    if run.privacy.mode != "none":
        raise ConfigError("privacy.mode", "split mode has no differential privacy (activations and gradients cross the wire unclipped); set privacy.mode=none")


def load_split_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> tuple[RunConfig, SplitConfig]:
    """(run config, its split section) from an optional YAML file and key=value overrides."""
    run = load_config(path, overrides)
    validate_run_for_split(run)
    return run, run.split
