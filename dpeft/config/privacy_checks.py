"""Checks of the ``privacy.*`` keys: their values, and the combinations differential privacy supports.

Central DP (user level) needs a synchronous round of a fixed, seeded sample of clients
aggregated by a coordinator as a unit-weighted sum (so the accountant's sampling and
sensitivity hold): refused are the robust rules (their output is no noisy sum), flexlora and
flora (re-factored or stacked factors), the deadline and async policies (their rounds mix
clients of other samples), all-reduce rounds (no coordinator adds the noise), and federated
evaluation (clients' accuracies released without noise). Local DP-SGD (record level) trains
LoRA adapters in fp32 with one batch per step and no data-dependent loss term outside the
clipped gradients. Split mode checks ``privacy.mode`` itself (:mod:`dpeft.split.config`).
"""

from __future__ import annotations

from dpeft.config.schema import RunConfig
from dpeft.errors import ConfigError

MODES = ("none", "central", "local")
CLIPPINGS = ("client", "server")
ACCOUNTANTS = ("rdp", "pld")
#: strategies whose server step is a function of the (noisy) mean of the clients' deltas
CENTRAL_STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadagrad", "fedadam", "fedyogi", "ffa_lora", "fedsa_lora")


def _one_of(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, f"must be one of {', '.join(allowed)}; got {value!r}")


def _positive(key: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ConfigError(key, f"must be > 0, got {value!r}")


def check_privacy(cfg: RunConfig) -> None:
    """``privacy.*`` values, and their combinations with the strategy, sync policy, aggregation, training."""
    p = cfg.privacy
    _one_of("privacy.mode", p.mode, MODES)
    _one_of("privacy.clipping", p.clipping, CLIPPINGS)
    _one_of("privacy.accountant", p.accountant, ACCOUNTANTS)
    _positive("privacy.clip_norm", p.clip_norm)
    _positive("privacy.noise_multiplier", p.noise_multiplier)
    _positive("privacy.target_epsilon", p.target_epsilon)
    _positive("privacy.clip_lr", p.clip_lr)
    if not 0 < p.delta < 1:
        raise ConfigError("privacy.delta", f"must lie in (0, 1) (about 1 / privacy-protected units), got {p.delta!r}")
    if not 0 < p.target_quantile < 1:
        raise ConfigError("privacy.target_quantile", f"must lie in (0, 1), got {p.target_quantile!r}")
    if p.mode == "none":
        for key, value in (("target_epsilon", p.target_epsilon), ("noise_multiplier", p.noise_multiplier)):
            if value is not None:
                raise ConfigError(
                    f"privacy.{key}", "applies to differential privacy: set privacy.mode=central or local (or leave it null)"
                )
        if p.adaptive_clipping:
            raise ConfigError("privacy.adaptive_clipping", "applies to privacy.mode=central")
        return
    if cfg.aggregation != "coordinator":
        raise ConfigError(
            "privacy.mode",
            f"differential privacy needs aggregation=coordinator (the coordinator adds the noise and keeps the accountant); got aggregation={cfg.aggregation}",
        )
    if cfg.eval.federated:
        raise ConfigError(
            "eval.federated",
            "clients' own evaluation metrics would be released without noise under differential privacy; set eval.federated=false",
        )
    if p.mode == "central":
        _check_central(cfg)
    else:
        _check_local(cfg)


def _check_central(cfg: RunConfig) -> None:
    p = cfg.privacy
    if p.noise_multiplier is None and p.target_epsilon is None:
        raise ConfigError(
            "privacy.noise_multiplier", "central DP needs privacy.noise_multiplier or privacy.target_epsilon (to derive it from)"
        )
    if cfg.strategy.name not in CENTRAL_STRATEGIES:
        raise ConfigError(
            "strategy.name",
            f"{cfg.strategy.name} is not supported with privacy.mode=central (its aggregate is not a noisy mean of clipped updates); "
            f"use one of {', '.join(CENTRAL_STRATEGIES)}",
        )
    if cfg.sync.name != "sync":
        raise ConfigError(
            "sync.name",
            f"privacy.mode=central is accounted for synchronous rounds of a fixed sample of clients; {cfg.sync.name} rounds mix clients of other samples: use sync.name=sync",
        )


def _check_local(cfg: RunConfig) -> None:
    p, t = cfg.privacy, cfg.train
    if p.noise_multiplier is None:
        raise ConfigError(
            "privacy.noise_multiplier",
            "privacy.mode=local needs a noise multiplier (each client's epsilon is reported per round)",
        )
    if p.target_epsilon is not None:
        raise ConfigError(
            "privacy.target_epsilon", "applies to privacy.mode=central only; with local DP-SGD set privacy.noise_multiplier"
        )
    if p.adaptive_clipping:
        raise ConfigError("privacy.adaptive_clipping", "applies to privacy.mode=central only")
    refusals = [
        (cfg.adapter.method != "lora", "adapter.method", "local DP-SGD supports adapter.method=lora"),
        (t.lockstep, "train.lockstep", "local DP-SGD trains each client alone: set train.lockstep=false"),
        (
            t.grad_accum_steps != 1,
            "train.grad_accum_steps",
            "local DP-SGD takes one Poisson-sampled batch per step: set train.grad_accum_steps=1",
        ),
        (
            t.precision != "fp32",
            "train.precision",
            "local DP-SGD computes per-example gradients in fp32: set train.precision=fp32",
        ),
        (t.gradient_checkpointing, "train.gradient_checkpointing", "not supported with local DP-SGD's per-example gradients"),
        (
            t.loss == "prior_calibrated",
            "train.loss",
            "prior_calibrated adds each client's label counts to its logits without noise; use train.loss=cross_entropy with privacy.mode=local",
        ),
        (cfg.strategy.name == "fedprox", "strategy.name", "fedprox's proximal term is not part of local DP-SGD; use fedavg"),
        (cfg.strategy.name == "hetlora", "strategy.name", "hetlora's rank penalty and pruning are not part of local DP-SGD; use flexlora or fedavg"),
        (cfg.model.quantization != "none", "model.quantization", "local DP-SGD is not supported on a quantized base"),
    ]
    for bad, key, problem in refusals:
        if bad:
            raise ConfigError(key, problem)
