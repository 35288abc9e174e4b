"""Split-mode (DLoRA) options: a ``split:`` section next to the run config.

A split config file is an ordinary dpeft run config (model, adapter, data, train, strategy,
rounds, clients, seed, run_dir) plus an optional ``split:`` mapping; ``split.*=value``
overrides go to this section, every other override to the run config. Unknown keys and bad
values raise ConfigError naming the dotted key, as everywhere in dpeft.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpeft.config import RunConfig, _build, _f, merge_override, parse_override, read_config_file
from dpeft.errors import ConfigError
from dpeft.validate import config_from_dict


@dataclass(kw_only=True)
class KillReviveConfig:
    """Kill-and-Revive: skip the LoRA modules whose factors change least."""

    enabled: bool = _f(False, "turn Kill-and-Revive on (off = every module active: 'no KR')")
    budget: float = _f(0.5, "active budget: fraction of LoRA modules kept active after a kill, k = max(1, round(budget * modules))")
    window: int = _f(10, "steps per scoring window; a module's score is the L2 norm of the change of its (A, B) over its last full active window")
    warmup: int = _f(10, "steps with every module active before the first kill (rounded up to a window boundary)")
    revive_every: int = _f(50, "revive every killed module every this many steps (a multiple of window; 0 = never)")


@dataclass(kw_only=True)
class SplitConfig:
    """Cloud/edge split training."""

    edges: int = _f(2, "edges (clients) of a federated run, each round trains clients_per_round of them; simulate: edge processes, each with its own data shard")
    steps: int = _f(100, "edge training steps when the cloud runs no federation (rounds are taken from the run config otherwise)")
    federated: bool = _f(True, "aggregate the edges' adapters every round with strategy.name (false: each edge trains alone for `steps` steps)")
    wire_dtype: str = _f("fp32", "dtype of activations and gradients on the wire: fp32, fp16 or bf16")
    chunk_bytes: int = _f(4 * 1024 * 1024, "largest payload piece per gRPC message")
    cloud_threads: int = _f(2, "torch threads of the cloud process")
    edge_threads: int = _f(1, "torch threads of each edge process")
    eval_examples: int = _f(200, "held-out examples the first edge evaluates through the cloud after each round (0 = no evaluation)")
    layers: int | None = _f(None, "keep only the first N transformer layers of the base (tests, quick runs); null = all")
    token: str = _f("", "shared bearer token edges must present (empty = none)")
    kr: KillReviveConfig = field(default_factory=KillReviveConfig, metadata={"help": "Kill-and-Revive"})


WIRE_DTYPES = ("fp32", "fp16", "bf16")


def validate_split(cfg: SplitConfig) -> None:
    """Range checks naming the dotted key."""
    for key, value in [
        ("split.edges", cfg.edges),
        ("split.steps", cfg.steps),
        ("split.chunk_bytes", cfg.chunk_bytes),
        ("split.cloud_threads", cfg.cloud_threads),
        ("split.edge_threads", cfg.edge_threads),
        ("split.kr.window", cfg.kr.window),
    ]:
        if value < 1:
            raise ConfigError(key, f"must be >= 1, got {value}")
    if cfg.eval_examples < 0:
        raise ConfigError("split.eval_examples", f"must be >= 0, got {cfg.eval_examples}")
    if cfg.layers is not None and cfg.layers < 1:
        raise ConfigError("split.layers", f"must be >= 1 or null, got {cfg.layers}")
    if cfg.wire_dtype not in WIRE_DTYPES:
        raise ConfigError("split.wire_dtype", f"must be one of {', '.join(WIRE_DTYPES)}; got {cfg.wire_dtype!r}")
    if cfg.chunk_bytes > 64 * 1024 * 1024:
        raise ConfigError("split.chunk_bytes", "must be at most 64 MiB")
    if not 0.0 < cfg.kr.budget <= 1.0:
        raise ConfigError("split.kr.budget", f"must be in (0, 1], got {cfg.kr.budget}")
    if cfg.kr.warmup < 0:
        raise ConfigError("split.kr.warmup", f"must be >= 0, got {cfg.kr.warmup}")
    if cfg.kr.revive_every < 0:
        raise ConfigError("split.kr.revive_every", f"must be >= 0, got {cfg.kr.revive_every}")
    if cfg.kr.revive_every and cfg.kr.revive_every % cfg.kr.window:
        raise ConfigError("split.kr.revive_every", f"must be a multiple of split.kr.window ({cfg.kr.window}), got {cfg.kr.revive_every}")


def validate_run_for_split(run: RunConfig) -> None:
    """What split mode supports of the run config."""
    if run.model.task not in ("seq_cls", "causal_lm"):
        raise ConfigError("model.task", f"split mode supports seq_cls and causal_lm (Llama models), got {run.model.task!r}")
    if run.adapter.method != "lora":
        raise ConfigError("adapter.method", f"split mode supports plain lora, got {run.adapter.method!r}")
    if run.adapter.options.get("use_dora"):
        raise ConfigError("adapter.options.use_dora", "split mode supports plain lora")
    if run.adapter.modules_to_save is not None:
        raise ConfigError("adapter.modules_to_save", "split mode trains the LoRA factors and the classifier head only (leave it null)")


def split_config_from_dict(tree: dict[str, Any]) -> SplitConfig:
    cfg = _build(SplitConfig, tree or {}, "split.")
    validate_split(cfg)
    return cfg


def load_split_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> tuple[RunConfig, SplitConfig]:
    """(run config, split config) from an optional YAML file and key=value overrides."""
    tree = read_config_file(path)
    split_tree = tree.pop("split", None) or {}
    if not isinstance(split_tree, dict):
        raise ConfigError("split", "must be a mapping")
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] == "split":
            if len(keys) == 1:
                raise ConfigError("split", "override a key inside split, e.g. split.edges=3")
            merge_override(split_tree, keys[1:], value, ".".join(keys))
        else:
            merge_override(tree, keys, value, ".".join(keys))
    run = config_from_dict(tree)
    validate_run_for_split(run)
    return run, split_config_from_dict(split_tree)
