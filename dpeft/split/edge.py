"""The edge side of DLoRA: embedding lookup, LoRA factors, head, labels, loss, optimizer.

One training step, as the edge sees it (all over one stream):

1. embed the batch's token ids locally; send ``step_start`` with the embedded tokens, the
   attention mask, the pooling positions and the active module set (never ids, text or labels);
2. answer each ``lora_input`` (x of one group of active modules) with their LoRA outputs,
   keeping the small autograd graph of each call;
3. on ``features`` (the head's input), run the head and the loss, backpropagate to the head
   and send ``feature_grad``;
4. answer each ``lora_output_grad`` by backpropagating the group's graph: the factor
   gradients accumulate here, the input gradient goes back (only when the cloud needs it);
5. on ``step_end``, clip and step the optimizer (LoRA factors and head), then Kill-and-Revive.

The model is the same peft model the cloud builds; the edge only ever runs its embedding
table, its LoRA factors and its head (``drop_body`` frees the rest).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dpeft.adapters import adapter_parameters, extract_state, load_state
from dpeft.config import TrainConfig
from dpeft.errors import ProtocolError
from dpeft.split.config import KillReviveConfig
from dpeft.split.kr import KillRevive
from dpeft.split.spec import LoraSite, arch_for, lora_path, lora_sites
from dpeft.split.wire import Channel, activation_schema
from dpeft.state import AdapterState
from dpeft.train.loop import make_optimizer

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger("dpeft.split.edge")


def lora_flops(tokens: int, r: int, d_in: int, d_out: int, backward: bool, input_grad: bool) -> int:
    """Multiply-adds x2 of scaling * B A x over ``tokens`` rows.

    forward 2 N r (d_in + d_out); backward: dB 2 N r d_out, d(Ax) 2 N r d_out, dA 2 N r d_in,
    and dx 2 N r d_in when the input gradient is needed.
    """
    f = 2 * tokens * r * (d_in + d_out)
    if backward:
        f += 2 * tokens * r * (2 * d_out + d_in) + (2 * tokens * r * d_in if input_grad else 0)
    return f


def head_flops(rows: int, d_in: int, d_out: int, backward: bool, weight_grad: bool = True) -> int:
    """Linear head over ``rows`` vectors: forward 2 N d_in d_out; backward 2 N d_in d_out for the
    input gradient, plus as much for the weight gradient when the head is trained."""
    return 2 * rows * d_in * d_out * (1 + (2 if weight_grad else 1) * backward)


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over the non-pad targets (what peft/transformers compute with
    ``labels = input_ids`` masked to -100 at padding)."""
    mask = attention_mask[:, 1:].bool()
    return nn.functional.cross_entropy(logits[:, :-1][mask].float(), input_ids[:, 1:][mask], reduction=reduction)


@dataclass
class StepStats:
    """What one step cost the edge."""

    loss: float = 0.0
    flops: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    wall_s: float = 0.0
    #: CPU seconds of the edge's own computation in the calling thread (embedding, LoRA, head,
    #: optimizer), not counting serialization or waiting for the cloud
    compute_s: float = 0.0
    lora_calls: int = 0
    active_modules: int = 0


class EdgeModel:
    """The edge's trainable state and compute, driven by messages from the cloud."""

    def __init__(
        self, model: PeftModel, train_cfg: TrainConfig, kr_cfg: KillReviveConfig | None = None, device: torch.device | None = None
    ) -> None:
        """``device``: where the edge's embeddings, adapter and head compute (``split.edge_device``;
        None = where the model is). Move before :meth:`drop_body` frees the body."""
        if device is not None:
            model.to(device)
        self.device = next(model.parameters()).device
        self.model = model
        self.arch = arch_for(model)
        self.sites: list[LoraSite] = lora_sites(model)
        self.keys = [s.key for s in self.sites]
        self.train_cfg = train_cfg
        model.eval()  # frozen base and head dropout off in split mode; LoRA dropout runs on the edge
        self.params = adapter_parameters(model)
        self.optimizer = make_optimizer(self.params.values(), train_cfg)
        self.kr = KillRevive(kr_cfg or KillReviveConfig(), len(self.sites), self._factors)
        self._tape: dict[int, tuple[torch.Tensor, list[torch.Tensor], list[int]]] = {}
        self.step_count = 0
        head: Any = self.arch.head_module(model)  # the Linear head, or peft's ModulesToSaveWrapper around it
        lin = head.modules_to_save["default"] if hasattr(head, "modules_to_save") else head
        self.head_in, self.head_out = int(lin.in_features), int(lin.out_features)
        self.causal = self.arch.causal

    def _factors(self, i: int) -> list[torch.Tensor]:
        m = self.sites[i].module
        return [m.lora_A["default"].weight, m.lora_B["default"].weight]

    @torch.no_grad()
    def drop_body(self) -> int:
        """Free every frozen weight the edge never uses (all but embeddings, LoRA and head); returns bytes freed."""
        keep = {id(p) for p in self.params.values()}
        keep |= {id(p) for p in self.model.get_input_embeddings().parameters()}
        keep |= {id(p) for p in self.arch.head_module(self.model).parameters()}  # the LM head (tied or not)
        freed = 0
        for module in self.model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if id(p) in keep or p.device.type == "meta":
                    continue
                freed += p.numel() * p.element_size()
                setattr(module, name, nn.Parameter(torch.empty(p.shape, device="meta", dtype=p.dtype), requires_grad=False))
        return freed

    # -- state ---------------------------------------------------------------
    def state(self) -> AdapterState:
        return extract_state(self.model)

    def load(self, state: AdapterState) -> None:
        load_state(self.model, state)

    # -- one step ------------------------------------------------------------
    def step(
        self,
        channel: Channel,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None,
        train: bool,
        log_prior: torch.Tensor | None = None,
        on_frozen: Callable[[list[int], list[int]], None] | None = None,
    ) -> tuple[StepStats, torch.Tensor]:
        """Run one split step (train or eval) over ``channel``; returns (stats, logits)."""
        t0 = time.perf_counter()
        up0, down0 = channel.bytes_sent, channel.bytes_received
        stats = StepStats()
        compute = 0.0
        batch, width = int(input_ids.shape[0]), int(input_ids.shape[1])
        tokens = batch * width
        dev = self.device
        input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
        labels = labels.to(dev) if labels is not None else None
        log_prior = log_prior.to(dev) if log_prior is not None else None
        c0 = time.thread_time()
        with torch.no_grad():
            embeds = self.arch.embed(self.model, input_ids)
            pool = self.arch.pool_index(self.model, input_ids, attention_mask)
        compute += time.thread_time() - c0
        if train:
            self.optimizer.zero_grad(set_to_none=True)
            for m in self.sites:
                m.module.lora_dropout["default"].train()
        active = sorted(self.kr.active)
        stats.active_modules = len(active)
        self.step_count += 1 if train else 0
        channel.send(
            "step_start",
            OrderedDict(inputs_embeds=embeds, attention_mask=attention_mask.to(torch.int64), pool_index=pool),
            activations=True,
            step=self.step_count,
            train=train,
            active=active,
        )
        logits = None
        loss = None
        try:
            while True:
                msg = channel.recv(("lora_input", "features", "lora_output_grad", "step_end"))
                if msg.kind == "lora_input":
                    members = list(msg.fields["modules"])
                    self._check_members(members)
                    site0 = self.sites[members[0]]
                    x = msg.tensors(activation_schema({"x": (batch, width, site0.in_features)}), activations=True)["x"].to(dev)
                    c0 = time.thread_time()
                    needs = bool(msg.fields["needs_input_grad"]) and train
                    if needs:
                        x.requires_grad_(True)
                    with torch.set_grad_enabled(train):
                        ys = [lora_path(self.sites[j], x) for j in members]
                    if train:
                        self._tape[msg.fields["call"]] = (x, ys, members)
                    for j in members:
                        s = self.sites[j]
                        stats.flops += lora_flops(tokens, s.r, s.in_features, s.out_features, train, needs)
                    compute += time.thread_time() - c0
                    stats.lora_calls += 1
                    channel.send("lora_output", OrderedDict((f"y.{j}", y) for j, y in zip(members, ys, strict=True)), activations=True, call=msg.fields["call"])
                elif msg.kind == "features":
                    h = msg.tensors(activation_schema({"h": self.arch.feature_shape(batch, width, self.head_in)}), activations=True)["h"].to(dev)
                    c0 = time.thread_time()
                    if train:
                        h.requires_grad_(True)
                    with torch.set_grad_enabled(train):
                        logits = self.arch.head(self.model, h)
                        if self.causal:
                            if train:  # the targets are the tokens themselves, shifted (they never leave the edge)
                                loss = causal_lm_loss(logits, input_ids, attention_mask)
                        elif labels is not None:
                            calibrated = logits + log_prior if (train and log_prior is not None) else logits
                            loss = nn.functional.cross_entropy(calibrated, labels)
                    rows = batch * width if self.causal else batch
                    stats.flops += head_flops(rows, self.head_in, self.head_out, train, weight_grad=not self.causal)
                    if train:
                        assert loss is not None
                        loss.backward()
                        compute += time.thread_time() - c0
                        assert h.grad is not None  # the loss depends on the features
                        channel.send("feature_grad", {"g": h.grad}, activations=True, step=self.step_count)
                    else:
                        compute += time.thread_time() - c0
                elif msg.kind == "lora_output_grad":
                    call = msg.fields["call"]
                    if call not in self._tape:
                        raise ProtocolError(f"lora_output_grad for unknown call {call}")
                    x, ys, members = self._tape.pop(call)
                    if list(msg.fields["modules"]) != members:
                        raise ProtocolError("lora_output_grad modules differ from the forward call")
                    shapes = OrderedDict((f"g.{j}", tuple(y.shape)) for j, y in zip(members, ys, strict=True))
                    grads = msg.tensors(activation_schema(shapes), activations=True)
                    c0 = time.thread_time()
                    torch.autograd.backward(ys, [grads[f"g.{j}"].to(dev) for j in members])
                    compute += time.thread_time() - c0
                    if msg.fields["needs_input_grad"]:
                        if x.grad is None:
                            raise ProtocolError("the cloud asked for an input gradient it did not announce in the forward call")
                        channel.send("lora_input_grad", {"gx": x.grad}, activations=True, call=call)
                    else:
                        channel.send("lora_input_grad", call=call)
                else:
                    break
        finally:
            self._tape.clear()
            for m in self.sites:
                m.module.lora_dropout["default"].eval()
        if logits is None:
            raise ProtocolError("the cloud ended the step without sending features")
        if train:
            c0 = time.thread_time()
            if self.train_cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.train_cfg.max_grad_norm)
            self.kr.before_update()
            self.optimizer.step()
            compute += time.thread_time() - c0
            decision = self.kr.after_step(self.step_count)
            if (decision.killed or decision.revived) and on_frozen is not None:
                on_frozen(decision.killed, decision.revived)
        stats.loss = float(loss.detach()) if loss is not None else float("nan")
        if train and not math.isfinite(stats.loss):
            raise FloatingPointError(f"split training diverged (loss {stats.loss})")
        stats.bytes_up = channel.bytes_sent - up0
        stats.bytes_down = channel.bytes_received - down0
        stats.wall_s = time.perf_counter() - t0
        stats.compute_s = compute
        return stats, logits.detach().cpu()

    def _check_members(self, members: list[int]) -> None:
        if not members:
            raise ProtocolError("lora_input without modules")
        active = self.kr.active
        for j in members:
            if not 0 <= j < len(self.sites) or j not in active:
                raise ProtocolError(f"the cloud asked for module {j}, which is not active")
        if len({self.sites[j].in_features for j in members}) != 1:
            raise ProtocolError("modules of one call must share their input size")

    def sync_frozen(self, channel: Channel, killed: list[int], revived: list[int]) -> None:
        """Upload the factors of newly killed modules; tell the cloud about revived ones.

        Killed factors keep ``requires_grad`` (so they stay part of the exported adapter); they
        simply receive no gradient because the edge never computes them while killed.
        """
        for i in killed:
            a, b = self._factors(i)
            channel.send("frozen_factors", OrderedDict(A=a.detach(), B=b.detach()), module=i)
        for i in revived:
            channel.send("frozen_factors", module=i, revive=True)

    def killed(self) -> list[int]:
        return sorted(set(range(len(self.sites))) - self.kr.active)
