"""A whole run config, validated: the core checks of :mod:`dpeft.config` composed with the checks
each family owns, and the loaders commands call.

:mod:`dpeft.config` knows no strategy, sync policy, codec or adapter method; this module sits
above it and the families' registries and runs, when a config is loaded:

- each family's own validation: the strategy (``strategy.name`` registered, ``strategy.options``
  parsed by its options dataclass, ``Strategy.validate_run``), the sync policy
  (:func:`~dpeft.sync.base.validate_run_sync`), the codecs (``codec.*``) and ``adapter.method``;
- what a quantized base (``model.quantization``) cannot do: adapter methods that read the base
  weights as dense matrices, and lockstep multi-LoRA;
- the combinations across families, refused here before anything starts: a strategy that needs
  more updates per aggregation than the sync policy delivers, and all-reduce rounds
  (``aggregation=allreduce``) with a codec or an aggregation that a
  sum of float64 buffers across ranks cannot carry.

:func:`load_config` and :func:`config_from_dict` return a RunConfig that passed all of it;
errors are :class:`~dpeft.errors.ConfigError` naming the keys (exit code 2).
:func:`reference_markdown` is the config reference, families' options included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpeft.codec.updates import CodecSpec, registered_codecs
from dpeft.codec.updates.session import PLAIN
from dpeft.config import RunConfig, build_config, read_config_tree, reference_rows
from dpeft.config.checks import one_of
from dpeft.config.parse import yaml_inline
from dpeft.config.privacy_checks import check_privacy
from dpeft.config.quantization import QuantizationOptions
from dpeft.errors import ConfigError
from dpeft.plugins import load_plugins, plugin_names
from dpeft.privacy.secagg.checks import check_secure_aggregation
from dpeft.strategies import make_strategy, registered_strategies
from dpeft.strategies.base import Strategy, option_key
from dpeft.sync import updates_per_step, validate_run_sync


def validate_strategy(cfg: RunConfig) -> Strategy:
    """``strategy.*``: a registered name, options of its options dataclass, its own run checks."""
    strategy = make_strategy(cfg.strategy)  # bad options name strategy.options.<key>
    strategy.validate_run(cfg)
    return strategy


def validate_codecs(cfg: RunConfig) -> None:
    """``codec.up`` / ``codec.down`` specs and ``codec.options``."""
    CodecSpec.from_config({"up": cfg.codec.up, "down": cfg.codec.down, "options": cfg.codec.options})


def validate_adapter_method(cfg: RunConfig) -> None:
    """``adapter.method``: a peft method dpeft can build (checked last: importing peft takes seconds,
    and a config with another mistake should fail fast)."""
    from dpeft.adapters.methods import known_methods

    one_of("adapter.method", cfg.adapter.method, known_methods())
    from dpeft.adapters.native import is_native, native_options

    if is_native(cfg.adapter.method):
        native_options(cfg.adapter)  # typed adapter.options (errors name adapter.options.<key>)


def check_enough_updates(cfg: RunConfig, strategy: Strategy) -> None:
    """The sync policy must deliver the updates one aggregation of the strategy needs."""
    need, have = strategy.min_updates(), updates_per_step(cfg)
    if have < need:
        raise ConfigError(
            "clients_per_round",
            f"strategy {strategy.name!r} needs at least {need} updates per aggregation, but sync policy "
            f"{cfg.sync.name!r} aggregates {have} (raise clients_per_round, sync.quorum or sync.buffer_size)",
        )


def allreduce_mode(cfg: RunConfig) -> str | None:
    """The setting that makes this run's workers all-reduce their updates, or None."""
    return "aggregation=allreduce" if cfg.aggregation == "allreduce" else None


def check_allreduce(cfg: RunConfig, strategy: Strategy, mode: str) -> None:
    """All-reduce sums plain float64 buffers of weighted deltas across ranks: no codec, a weighted mean.

    ``mode`` names what selected all-reduce (``aggregation=allreduce``, or the torchrun launcher).
    """
    if cfg.sync.name != "sync":
        raise ConfigError(
            "sync.name", f"{mode} runs synchronous rounds (every rank waits for the collective); sync.name={cfg.sync.name} needs aggregation=coordinator"
        )
    for key, spec in (("codec.up", cfg.codec.up), ("codec.down", cfg.codec.down)):
        if spec.strip().lower() != PLAIN:
            raise ConfigError(
                key, f"{mode} exchanges plain {PLAIN} tensors between ranks and cannot use codec {spec!r}; set {key}={PLAIN} or use the coordinator transports"
            )
    if not strategy.streaming_mean:
        raise ConfigError(
            "strategy.name",
            f"{mode} sums weighted deltas across ranks, which cannot compute strategy {strategy.name!r}; "
            "use a weighted-mean strategy (fedavg, fedprox, fedavgm, fedadam, ...) or the coordinator transports",
        )
    if strategy.opts.accumulator != "float64":
        raise ConfigError(
            option_key("accumulator"),
            f"{mode} sums float64 buffers across ranks; use accumulator: float64 (the default) or the coordinator transports",
        )


#: adapter methods whose layers work on a bitsandbytes base: they add to a quantized layer's
#: output (or touch no base layer) instead of reading its weight as a dense matrix
QUANTIZED_METHODS = ("lora", "dora", "ia3", "adalora", "prompt_tuning", "prefix_tuning", "p_tuning")


def validate_quantized_base(cfg: RunConfig) -> None:
    """What a 4/8-bit base (``model.quantization``) cannot do, refused before anything loads."""
    q = cfg.model.quantization
    if q == "none":
        return
    method = cfg.adapter.method.strip().lower()
    if method in ("loreft", "direft", "houlsby", "pfeiffer"):
        raise ConfigError("model.quantization", f"adapter.method={method} is built on an fp32 base only; set model.quantization=none")
    if method not in QUANTIZED_METHODS:
        raise ConfigError(
            "adapter.method",
            f"{method!r} reads the base layers' weights as dense matrices, which a {q} base stores packed; "
            f"on a quantized base use one of {', '.join(QUANTIZED_METHODS)}, or set model.quantization=none",
        )
    if cfg.train.lockstep:
        raise ConfigError(
            "train.lockstep",
            f"lockstep multi-LoRA routes LoRA layers on plain fp32 Linear layers only, and a {q} base has bitsandbytes ones "
            "(its clients would train one after another anyway); set train.lockstep=false or model.quantization=none",
        )


def validate_run(cfg: RunConfig, allreduce: str | None = None) -> None:
    """Every family's checks and the combinations across them (``cfg`` has passed the core checks).

    ``allreduce`` names a launcher that all-reduces whatever ``aggregation`` says (torchrun).
    """
    strategy = validate_strategy(cfg)
    validate_run_sync(cfg)  # sync.* and simulate.* heterogeneity keys
    validate_codecs(cfg)
    check_enough_updates(cfg, strategy)
    mode = allreduce or allreduce_mode(cfg)
    if mode is not None:
        check_allreduce(cfg, strategy, mode)
    validate_quantized_base(cfg)
    validate_plugin_families(cfg)
    check_secure_aggregation(cfg, strategy, mode)
    check_privacy(cfg)
    validate_adapter_method(cfg)


def validate_plugin_families(cfg: RunConfig) -> None:
    """``train.loss`` (built in or registered) with ``train.loss_options``, and ``data.options``."""
    from dpeft.data.loaders import validate_dataset_options
    from dpeft.train.losses import validate_loss

    validate_loss(cfg)
    validate_dataset_options(cfg.data)


def with_plugins(tree: dict[str, Any], plugins: list[str] | tuple[str, ...] = (), path: str | Path | None = None) -> dict[str, Any]:
    """``tree`` with ``plugins`` added to its ``plugins`` list, after importing every plug-in it names
    (and the ``dpeft.plugins`` entry points): registered names are known before the config is checked.
    Plug-ins are also looked up next to the config file ``path``."""
    names = plugin_names(tree.get("plugins"))
    names += [p for p in plugin_names(list(plugins), "--plugin") if p not in names]
    load_plugins(names, search=[str(Path(path).resolve().parent)] if path else [])
    return {**tree, "plugins": names} if names or "plugins" in tree else tree


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    allreduce: str | None = None,
    plugins: list[str] | tuple[str, ...] = (),
) -> RunConfig:
    """Load a YAML file (optional), apply ``key=value`` overrides, import the plug-ins (the config's
    ``plugins`` and ``plugins``), validate everything, return a RunConfig."""
    cfg = build_config(with_plugins(read_config_tree(path, overrides), plugins, path))
    validate_run(cfg, allreduce)
    return cfg


def config_from_dict(tree: dict[str, Any]) -> RunConfig:
    """Rebuild a validated RunConfig from its dict form (as sent to workers), importing its plug-ins first."""
    cfg = build_config(with_plugins(tree))
    validate_run(cfg)
    return cfg


def check_config(cfg: RunConfig) -> RunConfig:
    """A RunConfig built in code, checked as a loaded one is (its plug-ins imported first); returns it."""
    return config_from_dict(dataclasses.asdict(cfg))


# ---------------------------------------------------------------- reference


def _who(names: list[str], everyone: list[str], noun: str) -> str:
    return f"all {noun}" if sorted(names) == sorted(everyone) else ", ".join(names)


def _family_rows(prefix: str, owners: dict[str, type], noun: str) -> list[str]:
    """One row per distinct (option, default, help) over the owners' options dataclasses."""
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for owner, options_cls in owners.items():
        for f in dataclasses.fields(options_cls):
            grouped.setdefault((f.name, yaml_inline(f.default), f.metadata.get("help", "")), []).append(owner)
    rows = []
    for (name, default, text), names in sorted(grouped.items()):
        rows.append(f"| `{prefix}.{name}` | `{default}` | {_who(names, list(owners), noun)}: {text} |")
    return rows


FamilyRows = Callable[[], list[str]]


def _native_rows() -> list[str]:
    """``adapter.options`` of the methods dpeft implements itself (peft methods take their peft config's fields)."""
    from dpeft.adapters.bottleneck import BottleneckOptions
    from dpeft.adapters.reft import ReftOptions

    return _family_rows("adapter.options", {"loreft/direft": ReftOptions, "houlsby/pfeiffer": BottleneckOptions}, "native methods (loreft, direft, houlsby, pfeiffer)")


def _builtin(obj: Any) -> bool:
    """Whether ``obj`` (a class or function) is defined by dpeft itself, not by a plug-in."""
    return str(getattr(obj, "__module__", "")).startswith("dpeft.")


def reference_markdown(builtin_only: bool = False) -> str:
    """A markdown table of every key with its default and help: the config reference
    (docs/reference/config.md, written with ``builtin_only``: plug-ins a process has loaded are left out)."""
    strategies = {n: r.options for n, r in sorted(registered_strategies().items()) if not builtin_only or _builtin(r.cls)}
    codecs = {n: r.options for n, r in sorted(registered_codecs().items()) if not builtin_only or _builtin(r.factory)}
    families: dict[str, FamilyRows] = {
        "strategy.options": lambda: _family_rows("strategy.options", strategies, "strategies"),
        "codec.options": lambda: _family_rows("codec.options", codecs, "codecs"),
        "model.quantization_options": lambda: reference_rows(QuantizationOptions, "model.quantization_options."),
        "adapter.options": _native_rows,
    }
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for row in reference_rows(RunConfig, ""):
        lines.append(row)
        for key, rows in families.items():
            if row.startswith(f"| `{key}` |"):
                lines.extend(rows())
    return "\n".join(lines)
