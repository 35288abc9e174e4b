"""Train one DLoRA configuration to a plateau of held-out accuracy, recording the edge's cumulative cost.

Used by ``benchmarks/dlora.py``. Cloud and edge run in this process over a real loopback gRPC
stream. After every ``eval_every`` steps the edge's adapter (killed modules' frozen factors
included) is loaded into a copy of the model and evaluated on the held-out set; training stops
when ``patience`` evaluations in a row did not beat the best accuracy so far, or at ``cap`` steps.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Point:
    """One evaluation: step, accuracy and the edge's cost so far."""

    step: int
    acc: float
    flops: float
    bytes: float
    active: float  # mean active modules per step so far


@dataclass
class Curve:
    """A run to its plateau."""

    points: list[Point] = field(default_factory=list)
    modules: int = 0
    stop_step: int = 0
    wall_s: float = 0.0
    compute_s: float = 0.0  # mean edge CPU s/step
    history: list = field(default_factory=list)  # KR decisions (step, killed, revived)

    @property
    def best(self) -> Point:
        """The first evaluation with the highest accuracy (the plateau)."""
        return max(self.points, key=lambda p: (p.acc, -p.step))

    @property
    def last(self) -> Point:
        return self.points[-1]

    def first_reaching(self, acc: float) -> Point | None:
        """The first evaluation at or above ``acc`` (None: never)."""
        return next((p for p in self.points if p.acc >= acc - 1e-9), None)


def evaluate(model, data, batch_size: int = 64) -> float:
    from dpeft.train.loop import evaluate as run_eval

    return float(run_eval(model, data, "seq_cls", batch_size)["eval_accuracy"])


def train_to_plateau(
    model, data, test_data, schedule: list[list[int]], run, split, eval_every: int, patience: int, label: str = ""
) -> Curve:
    """Run DLoRA steps over ``schedule`` (its length is the cap) until the held-out accuracy plateaus."""
    from dpeft.adapters import load_state
    from dpeft.split.local import loopback

    curve = Curve()
    ev_model = copy.deepcopy(model)
    ev_model.eval()
    t0 = time.time()
    flops = nbytes = active = 0.0
    cpu: list[float] = []
    best, since = -1.0, 0
    with loopback(model, run, split) as (edge, channel, welcome, _service):
        welcome.tensors({})
        curve.modules = len(edge.sites)

        def on_frozen(killed, revived):
            edge.sync_frozen(channel, killed, revived)

        for t, idx in enumerate(schedule, 1):
            b = data.batch(idx)
            st, _ = edge.step(channel, b["input_ids"], b["attention_mask"], b["labels"], True, on_frozen=on_frozen)
            flops += st.flops
            nbytes += st.bytes_up + st.bytes_down  # frozen-factor uploads of this step included
            active += st.active_modules
            cpu.append(st.compute_s)
            if t % eval_every and t != len(schedule):
                continue
            with torch.no_grad():
                load_state(ev_model, edge.state())
            acc = evaluate(ev_model, test_data)
            curve.points.append(Point(t, acc, flops, nbytes, active / t))
            curve.stop_step = t
            if label:
                print(
                    f"    {label}: step {t} acc {acc:.4f} active {active / t:.2f} FLOPs {flops:.4g} bytes {nbytes:.4g} ({time.time() - t0:.0f} s)",
                    flush=True,
                )
            if acc > best + 1e-9:
                best, since = acc, 0
            else:
                since += 1
                if since >= patience:
                    break
        curve.history = [(s, d.killed, d.revived) for s, d in edge.kr.history]
    curve.wall_s = time.time() - t0
    curve.compute_s = sum(cpu[1:]) / max(len(cpu) - 1, 1)
    return curve
