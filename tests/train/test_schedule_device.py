"""Learning-rate schedules (pure functions of round and step) and device choice errors."""

from __future__ import annotations

import math

import pytest
import torch

from dpeft.config import TrainConfig
from dpeft.errors import ConfigError
from dpeft.train.device import resolve_device
from dpeft.train.schedule import LrSchedule


def _sched(kind: str, warmup: int = 0, scope: str = "run", steps: int = 4, rounds: int = 3) -> LrSchedule:
    cfg = TrainConfig(lr=1.0, local_steps=steps, lr_schedule=kind, warmup_steps=warmup, lr_schedule_scope=scope)
    return LrSchedule.from_config(cfg, rounds)


def test_constant_is_the_configured_lr_and_touches_nothing() -> None:
    s = _sched("constant")
    assert s.is_constant and all(s.lr(r, t) == 1.0 for r in (1, 2, 3) for t in range(4))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    s.apply(opt, 2, 1)
    assert opt.param_groups[0]["lr"] == 0.5  # constant without warmup leaves the optimizer alone


def test_run_scope_decays_across_rounds() -> None:
    lin = _sched("linear")  # span 12 steps
    assert [lin.lr(1, 0), lin.lr(2, 0), lin.lr(3, 3)] == pytest.approx([1.0, 8 / 12, 1 / 12])
    cos = _sched("cosine")
    assert cos.lr(1, 0) == pytest.approx(1.0)
    assert cos.lr(2, 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 6 / 12)))
    values = [cos.lr(r, t) for r in (1, 2, 3) for t in range(4)]
    assert values == sorted(values, reverse=True) and values[-1] > 0


def test_warmup_then_decay_and_round_scope_restarts() -> None:
    s = _sched("linear", warmup=2)
    assert [s.lr(1, 0), s.lr(1, 1), s.lr(1, 2)] == pytest.approx([0.5, 1.0, 1.0])
    assert s.lr(1, 3) == pytest.approx(1 - 1 / 10)
    r = _sched("cosine", warmup=1, scope="round")
    assert [r.lr(1, t) for t in range(4)] == [r.lr(7, t) for t in range(4)]  # every round the same
    assert r.lr(1, 0) == pytest.approx(1.0) and r.lr(1, 3) < r.lr(1, 2) < r.lr(1, 1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s.apply(opt, 1, 0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_a_gpu_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"train\.device.*no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="--device"):
        resolve_device("cuda:1", key="--device")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.device=gpu"], "train.device"),
        (["train.precision=fp8"], "train.precision"),
        (["train.batch_size=4", "train.grad_accum_steps=8"], "train.grad_accum_steps"),
        (["train.lr_schedule=step"], "train.lr_schedule"),
        (["train.lr_schedule_scope=epoch"], "train.lr_schedule_scope"),
        (["train.warmup_steps=-1"], "train.warmup_steps"),
        (["simulate.devices=[cpu,cuda:x]"], "simulate.devices[1]"),
        (["simulate.start=fork", "simulate.devices=[cpu,cuda:0]"], "simulate.start"),
        (["split.cloud_device=tpu"], "split.cloud_device"),
    ],
)
def test_bad_training_hardware_keys_are_config_errors(overrides: list[str], key: str) -> None:
    from dpeft.validate import load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert err.value.key == key


def test_defaults_are_the_plain_fp32_loop() -> None:
    cfg = TrainConfig()
    assert (cfg.precision, cfg.grad_accum_steps, cfg.gradient_checkpointing, cfg.lr_schedule, cfg.warmup_steps) == (
        "fp32",
        1,
        False,
        "constant",
        0,
    )
