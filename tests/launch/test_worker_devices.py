"""How `dpeft simulate` places its worker processes on devices and how it starts them."""

from __future__ import annotations

import pytest

from dpeft.errors import ConfigError
from dpeft.validate import load_config
from dpeft_launch.worker_devices import choose_start_method, trains_on_cuda, worker_device_specs


def _gpu(visible: bool):
    asked: list[int] = []

    def cuda_visible() -> bool:
        asked.append(1)
        return visible

    cuda_visible.asked = asked  # type: ignore[attr-defined]
    return cuda_visible


def test_specs_cycle_simulate_devices_else_train_device() -> None:
    cfg = load_config(None, ["simulate.devices=[cuda:0,cuda:0,cuda:1]"])
    assert worker_device_specs(cfg, 4) == [
        ("cuda:0", "simulate.devices[0]"),
        ("cuda:0", "simulate.devices[1]"),
        ("cuda:1", "simulate.devices[2]"),
        ("cuda:0", "simulate.devices[0]"),
    ]
    assert worker_device_specs(load_config(None, ["train.device=cpu"]), 2) == [("cpu", "train.device")] * 2


@pytest.mark.parametrize(
    "start, specs, gpu, want",
    [
        ("auto", [("cpu", "train.device")], True, "fork"),  # CPU training forks even on a GPU machine
        ("auto", [("auto", "train.device")], False, "fork"),
        ("auto", [("auto", "train.device")], True, "spawn"),  # auto finds the GPU: never fork
        ("auto", [("cuda", "train.device")], False, "spawn"),
        ("auto", [("cpu", "simulate.devices[0]"), ("cuda:1", "simulate.devices[1]")], False, "spawn"),
        ("spawn", [("cpu", "train.device")], False, "spawn"),
        ("fork", [("auto", "train.device")], False, "fork"),
    ],
)
def test_start_method(start, specs, gpu, want) -> None:
    assert choose_start_method(start, specs, platform="linux", cuda_visible=_gpu(gpu)) == want


def test_cpu_only_configs_never_ask_cuda_and_fork_with_cuda_is_refused() -> None:
    probe = _gpu(True)
    assert choose_start_method("auto", [("cpu", "train.device")], platform="linux", cuda_visible=probe) == "fork"
    assert probe.asked == []  # nothing touched CUDA in the coordinator
    assert trains_on_cuda([("cuda:0", "simulate.devices[0]")], probe) == "simulate.devices[0]"
    with pytest.raises(ConfigError, match=r"simulate\.start.*train\.device"):
        choose_start_method("fork", [("auto", "train.device")], platform="linux", cuda_visible=_gpu(True))
    assert choose_start_method("auto", [("cpu", "train.device")], platform="darwin", cuda_visible=probe) == "spawn"
