"""Checks of the training-hardware keys: devices, precision, memory savers and the learning-rate schedule.

Only the spelling and the combinations are checked here, when the config is loaded: whether a
GPU is really there is known only by the process that trains (an edge worker may have one
that the coordinator lacks), so :func:`dpeft.train.device.resolve_device` says so there.
"""

from __future__ import annotations

from dpeft.config.schema import RunConfig
from dpeft.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
LR_SCHEDULES = ("constant", "linear", "cosine")
LR_SCOPES = ("run", "round")


def _one_of(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, f"must be one of {', '.join(allowed)}; got {value!r}")


def uses_cuda(spec: str) -> bool:
    """Whether a device spelling names CUDA explicitly (``auto`` may too, on a machine with a GPU)."""
    return spec == "cuda" or spec.startswith("cuda:")


def check_train_hardware(cfg: RunConfig) -> None:
    """``train.device/precision/gradient_checkpointing/grad_accum_steps/lr_schedule*``, ``simulate.devices``, ``split.*_device``."""
    from dpeft.train.device import check_device_spec  # here: dpeft.train imports dpeft.config

    t = cfg.train
    check_device_spec("train.device", t.device)
    _one_of("train.precision", t.precision, PRECISIONS)
    _one_of("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    _one_of("train.lr_schedule_scope", t.lr_schedule_scope, LR_SCOPES)
    if not isinstance(t.gradient_checkpointing, bool):
        raise ConfigError("train.gradient_checkpointing", f"expected true or false, got {t.gradient_checkpointing!r}")
    if t.grad_accum_steps < 1:
        raise ConfigError("train.grad_accum_steps", f"must be >= 1, got {t.grad_accum_steps}")
    if t.grad_accum_steps > t.batch_size:
        raise ConfigError(
            "train.grad_accum_steps", f"{t.grad_accum_steps} micro-batches cannot split train.batch_size={t.batch_size} examples"
        )
    if t.warmup_steps < 0:
        raise ConfigError("train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    for i, spec in enumerate(cfg.simulate.devices):
        check_device_spec(f"simulate.devices[{i}]", str(spec))
    check_device_spec("split.cloud_device", cfg.split.cloud_device)
    check_device_spec("split.edge_device", cfg.split.edge_device)
    cuda = [
        k
        for k, s in [("train.device", t.device)]
        + [(f"simulate.devices[{i}]", str(s)) for i, s in enumerate(cfg.simulate.devices)]
        if uses_cuda(s)
    ]
    if cfg.simulate.start == "fork" and cuda:
        raise ConfigError(
            "simulate.start",
            f"fork cannot train on CUDA ({cuda[0]} names a GPU; a forked child cannot use CUDA): use simulate.start=spawn or auto",
        )
