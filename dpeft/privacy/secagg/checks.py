"""Config checks of secure aggregation (``privacy.secure_aggregation`` and ``privacy.secagg_*``).

Secure aggregation gives the coordinator the sum of the round's weighted updates and nothing
about any single one, so everything that needs individual updates, or that changes what is
summed, is refused when the config is loaded (exit 2, naming the key and saying why).
"""

from __future__ import annotations

import math
from typing import Any

from dpeft.config import RunConfig
from dpeft.errors import ConfigError
from dpeft.privacy.secagg.encoding import scale_for

KEY = "privacy.secure_aggregation"
#: the sync policies whose rounds secure aggregation runs
SYNC_POLICIES = ("sync", "deadline")
#: commands that cannot run it (their own round drivers); checked by those launchers
UNSUPPORTED_COMMANDS = {
    "ray": "Ray actors do not run the secure-aggregation task kinds; use `dpeft coordinator` + `dpeft worker` or `dpeft simulate`",
    "split": "split (DLoRA) training exchanges activations, not adapter updates, and has no secure aggregation",
}


def check_secagg_keys(cfg: RunConfig) -> None:
    """Ranges of the ``privacy.secagg_*`` keys (checked whether or not secure aggregation is on)."""
    p = cfg.privacy
    if p.secagg_neighbours is not None and p.secagg_neighbours < 2:
        raise ConfigError("privacy.secagg_neighbours", f"must be at least 2 or null; got {p.secagg_neighbours}")
    if not 0 < p.secagg_threshold <= 1:
        raise ConfigError(
            "privacy.secagg_threshold", f"must be in (0, 1] (a fraction of the neighbours); got {p.secagg_threshold}"
        )
    if not 16 <= p.secagg_bits <= 64:
        raise ConfigError("privacy.secagg_bits", f"must be between 16 and 64; got {p.secagg_bits}")
    if not (math.isfinite(p.secagg_clip_range) and p.secagg_clip_range > 0):
        raise ConfigError("privacy.secagg_clip_range", f"must be a positive number; got {p.secagg_clip_range}")
    if p.secagg_max_weight < 1:
        raise ConfigError("privacy.secagg_max_weight", f"must be at least 1; got {p.secagg_max_weight}")


def round_size(cfg: RunConfig) -> int:
    """The most clients one round's protocol can have (deadline rounds over-select)."""
    if cfg.sync.name == "deadline":
        return math.ceil(cfg.clients_per_round * cfg.sync.over_selection - 1e-9)
    return cfg.clients_per_round


def check_secure_aggregation(cfg: RunConfig, strategy: Any, allreduce: str | None = None) -> None:
    """What secure aggregation cannot be combined with; no-op when it is off. ``allreduce``: what
    made the run all-reduce its updates (``aggregation=allreduce`` or the torchrun launcher)."""
    check_secagg_keys(cfg)
    if not cfg.privacy.secure_aggregation:
        return
    name = strategy.name
    if name in ("flora", "flexlora"):
        raise ConfigError(
            "strategy.name",
            f"{name} aggregates per-client LoRA factors of different ranks (stacked or as products), which a masked sum of equal-length vectors cannot carry; "
            f"use a weighted-mean strategy (fedavg, fedprox, fedavgm, fedadam, ...) or set {KEY}=false",
        )
    if not strategy.streaming_mean:
        raise ConfigError(
            "strategy.name",
            f"{name!r} needs each client's update (a robust rule looks at individual updates), but with {KEY} the coordinator only learns their sum; "
            f"use a weighted-mean strategy (fedavg, fedprox, fedavgm, fedadam, ...) or set {KEY}=false",
        )
    if getattr(strategy, "clip_norm", None) is not None:
        raise ConfigError(
            "strategy.options.clip_norm",
            f"server-side clipping needs each client's update, which {KEY} hides; clip on the clients instead (privacy.mode=central with privacy.clipping=client)",
        )
    if cfg.sync.name not in SYNC_POLICIES:
        raise ConfigError(
            "sync.name",
            f"{KEY} runs its key agreement and unmasking per round; sync.name={cfg.sync.name} is not supported (use sync or deadline)",
        )
    if cfg.sync.name == "deadline" and cfg.sync.late_updates != "drop":
        raise ConfigError(
            "sync.late_updates",
            f"a masked update can only be unmasked within its own round; with {KEY} late updates are dropped (set sync.late_updates=drop)",
        )
    if allreduce is not None or cfg.aggregation == "allreduce":
        raise ConfigError(
            "aggregation",
            f"{allreduce or 'all-reduce'}: all-reduce sums plain updates between workers without a coordinator; {KEY} needs aggregation=coordinator",
        )
    if cfg.codec.up.strip().lower() != "fp32":
        raise ConfigError(
            "codec.up",
            f"with {KEY} a client sends its update as a masked fixed-point vector (privacy.secagg_bits), which replaces the update codec; "
            f"a lossy codec ({cfg.codec.up}) cannot be applied under the masks; set codec.up=fp32",
        )
    if cfg.privacy.mode == "central" and cfg.privacy.clipping != "client":
        raise ConfigError(
            "privacy.clipping",
            f"with {KEY} the coordinator never sees an individual update, so central DP must clip on the clients (privacy.clipping=client)",
        )
    n = round_size(cfg)
    if n < 3:
        raise ConfigError(
            "clients_per_round",
            f"{KEY} needs at least 3 clients per round (with 2, each could subtract its own update from the sum); got {n}",
        )
    p = cfg.privacy
    try:
        scale_for(p.secagg_bits, n, p.secagg_max_weight, p.secagg_clip_range)
    except ValueError as exc:
        raise ConfigError(
            "privacy.secagg_bits", f"{exc}; raise secagg_bits or lower secagg_max_weight / secagg_clip_range"
        ) from None


def refuse_command(cfg: RunConfig, command: str) -> None:
    """A launcher that cannot run secure aggregation refuses a config that asks for it."""
    if cfg.privacy.secure_aggregation and command in UNSUPPORTED_COMMANDS:
        raise ConfigError(KEY, f"`dpeft {command}`: {UNSUPPORTED_COMMANDS[command]}")
