"""The cloud side of DLoRA: the frozen base, calling out to the edge at every active LoRA site.

Every LoRA layer of the cloud's peft model gets a new ``forward`` (the module tree is left
intact, so the cloud can still export an adapter): ``base(x)`` is computed here and the LoRA
term comes from the edge that owns the current session. Sites whose inputs are the very same
tensor (query/value of one layer, found by a probe pass at start-up) form a *group*: x is
sent once for the whole group and the edge answers with one output per module, so a layer
with the default q/v targets costs one round trip forward and one backward.

A custom autograd function stands for the group's LoRA outputs: its backward sends the
output gradients to the edge and returns the edge's input gradient. A per-step zero-sized
"token" leaf that requires grad makes the outputs part of the graph although the base is
frozen; the first layer's input needs no gradient, so the edge is not asked for it.

Killed modules (Kill-and-Revive) are absent from the step's active set. When the edge has
uploaded their frozen factors, the cloud applies ``scaling * B A x`` itself (no edge compute,
no per-step traffic, the same function); otherwise the LoRA term is skipped.

With ``split.max_batch_edges`` > 1 the concurrent steps of several edges run as one stacked
forward/backward instead (:mod:`dpeft.split.batcher`); a step alone takes the path here.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dpeft.errors import ProtocolError
from dpeft.split.spec import Arch, LoraSite, arch_for, lora_sites
from dpeft.split.wire import Channel, activation_schema

if TYPE_CHECKING:
    from peft import PeftModel

    from dpeft.split.batcher import StepBatcher

log = logging.getLogger("dpeft.split.cloud")

_local = threading.local()
MAX_TOKENS_PER_STEP = 1 << 20


@contextmanager
def session_scope(session: Any):
    """Route this thread's LoRA sites to ``session`` (anything with ``lora_term(site, x)``)."""
    prev = getattr(_local, "session", None)
    _local.session = session
    try:
        yield
    finally:
        _local.session = prev


@dataclass
class StepInput:
    """A validated ``step_start``: the edge's embedded batch and what kind of step it is."""

    embeds: torch.Tensor
    mask: torch.Tensor
    pool: torch.Tensor
    train: bool
    step: int


class _RemoteLora(torch.autograd.Function):
    """The LoRA outputs of one group call; backward asks the edge for the input gradient."""

    @staticmethod
    def forward(ctx, x, token, info, ys):
        ctx.info = info
        ctx.x_shape = tuple(x.shape)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads):
        session, call, modules = ctx.info
        gx = session.remote_backward(call, modules, grads, ctx.needs_input_grad[0], ctx.x_shape)
        return gx, None, None, None


class CloudModel:
    """A peft model whose LoRA layers compute ``base(x)`` locally and the LoRA term remotely."""

    def __init__(self, model: PeftModel, model_id: str = "", device: torch.device | None = None) -> None:
        """``device``: where the frozen base computes (``split.cloud_device``; None = where the model is)."""
        if device is not None:
            model.to(device)
        self.device = next(model.parameters()).device
        self.model = model
        self.model_id = model_id
        self.arch: Arch = arch_for(model)
        self.sites: list[LoraSite] = lora_sites(model)
        self.keys = [s.key for s in self.sites]
        self.hidden_size = self.arch.hidden_size(model)
        model.eval()  # the base is frozen by peft; the cloud's own adapter copy is never used in a step
        for site in self.sites:
            site.module.forward = self._make_forward(site)  # instance attribute shadows the class method
        self.groups = self._probe_groups()
        self.group_of = {i: g for g in self.groups for i in g}

    def _make_forward(self, site: LoraSite) -> Callable[..., torch.Tensor]:
        base_layer = site.module.base_layer

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            result = base_layer(x, *args, **kwargs)
            probe = getattr(_local, "probe", None)
            if probe is not None:
                probe.append((site.index, x))
                return result
            session = getattr(_local, "session", None)
            if session is None:
                return result
            lora = session.lora_term(site, x)
            return result if lora is None else result + lora

        return forward

    @torch.no_grad()
    def _probe_groups(self) -> list[list[int]]:
        """Group consecutive sites whose input is the identical tensor (one dummy forward)."""
        calls: list[tuple[int, torch.Tensor]] = []
        _local.probe = calls
        try:
            dev = self.device
            e = torch.zeros(1, 4, self.hidden_size, device=dev)
            self.arch.backbone(self.model, e, torch.ones(1, 4, dtype=torch.long, device=dev), torch.tensor([3], device=dev))
        finally:
            _local.probe = None
        groups: list[list[int]] = []
        prev_x = None
        seen: set[int] = set()
        for index, x in calls:
            if index in seen:
                raise ProtocolError(f"LoRA site {self.keys[index]} is called twice per forward; split mode cannot route it")
            seen.add(index)
            if groups and x is prev_x:
                groups[-1].append(index)
            else:
                groups.append([index])
            prev_x = x
        for s in self.sites:
            if s.index not in seen:
                groups.append([s.index])
        return groups


class CloudSession:
    """One edge's session: runs its steps on the shared frozen base."""

    def __init__(self, cloud: CloudModel, channel: Channel, name: str = "") -> None:
        self.cloud = cloud
        self.channel = channel
        self.name = name
        self.active: set[int] = set(range(len(cloud.sites)))
        self.frozen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._calls = itertools.count(1)
        self._cache: dict[int, torch.Tensor] = {}
        self._cache_x: torch.Tensor | None = None
        self._token: torch.Tensor | None = None
        self.steps = 0

    # -- per-site -------------------------------------------------------------
    def lora_term(self, site: LoraSite, x: torch.Tensor) -> torch.Tensor | None:
        i = site.index
        if i in self.frozen:
            return self.frozen_term(site, x)
        if i not in self.active:
            return None
        if self._cache_x is x and i in self._cache:
            return self._cache.pop(i)
        members = self.members(i)
        ys = self._remote_forward(members, x)
        outs = ys
        if torch.is_grad_enabled() and self._token is not None:
            call = self._last_call
            outs = list(_RemoteLora.apply(x, self._token, (self, call, members), ys))
        self._cache = {j: y for j, y in zip(members[1:], outs[1:], strict=True)}
        self._cache_x = x
        return outs[0]

    def frozen_term(self, site: LoraSite, x: torch.Tensor) -> torch.Tensor:
        """``scaling * B A x`` of a killed module from its uploaded frozen factors."""
        a, b = self.frozen[site.index]
        return nn.functional.linear(nn.functional.linear(x, a.to(x.device)), b.to(x.device)) * site.scaling

    def members(self, i: int) -> list[int]:
        """The sites of ``i``'s group from ``i`` on that the edge computes in this step."""
        group = self.cloud.group_of[i]
        return [j for j in group[group.index(i) :] if j in self.active and j not in self.frozen]

    def _remote_forward(self, members: list[int], x: torch.Tensor) -> list[torch.Tensor]:
        call = self.send_lora_input(members, x)
        self._last_call = call
        return self.recv_lora_output(call, members, x)

    def send_lora_input(self, members: list[int], x: torch.Tensor) -> int:
        """Ask the edge for the LoRA outputs of ``members`` on ``x``; returns the call number."""
        call = next(self._calls)
        needs = bool(x.requires_grad and torch.is_grad_enabled())
        self.channel.send("lora_input", {"x": x}, activations=True, call=call, modules=members, needs_input_grad=needs)
        return call

    def recv_lora_output(self, call: int, members: list[int], x: torch.Tensor) -> list[torch.Tensor]:
        msg = self.channel.recv("lora_output")
        if msg.fields["call"] != call:
            raise ProtocolError(f"lora_output for call {msg.fields['call']}, expected {call}")
        lead = tuple(x.shape[:-1])
        shapes = OrderedDict((f"y.{j}", lead + (self.cloud.sites[j].out_features,)) for j in members)
        got = msg.tensors(activation_schema(shapes), activations=True)
        return [got[f"y.{j}"].to(device=x.device, dtype=x.dtype) for j in members]

    def remote_backward(self, call: int, members: list[int], grads: tuple[torch.Tensor, ...], needs_x: bool, x_shape: tuple[int, ...]) -> torch.Tensor | None:
        self.send_output_grad(call, members, grads, needs_x)
        return self.recv_input_grad(call, needs_x, x_shape)

    def send_output_grad(self, call: int, members: list[int], grads: tuple[torch.Tensor, ...], needs_x: bool) -> None:
        tensors = OrderedDict((f"g.{j}", g.contiguous()) for j, g in zip(members, grads, strict=True))
        self.channel.send("lora_output_grad", tensors, activations=True, call=call, modules=members, needs_input_grad=needs_x)

    def recv_input_grad(self, call: int, needs_x: bool, x_shape: tuple[int, ...]) -> torch.Tensor | None:
        msg = self.channel.recv("lora_input_grad")
        if msg.fields["call"] != call:
            raise ProtocolError(f"lora_input_grad for call {msg.fields['call']}, expected {call}")
        if not needs_x:
            msg.tensors({})
            return None
        return msg.tensors(activation_schema({"gx": x_shape}), activations=True)["gx"].to(self.cloud.device)

    # -- messages -------------------------------------------------------------
    def parse_step(self, msg) -> StepInput:
        """Validate a ``step_start`` and make its module set this session's active set."""
        f = msg.fields
        h_size = self.cloud.hidden_size
        header = msg.tensors(None, activations=True)
        if set(header) != {"inputs_embeds", "attention_mask", "pool_index"}:
            raise ProtocolError(f"step_start carries {sorted(header)}; expected inputs_embeds, attention_mask, pool_index")
        e, mask, pool = header["inputs_embeds"], header["attention_mask"], header["pool_index"]
        if e.dim() != 3 or e.shape[2] != h_size or not e.dtype.is_floating_point:
            raise ProtocolError(f"inputs_embeds must be (B, T, {h_size}) float, got {tuple(e.shape)} {e.dtype}")
        b, t = e.shape[:2]
        if b * t > MAX_TOKENS_PER_STEP or b < 1 or t < 1:
            raise ProtocolError(f"step of {b}x{t} tokens is out of bounds")
        if tuple(mask.shape) != (b, t) or mask.dtype != torch.int64:
            raise ProtocolError(f"attention_mask must be int64 ({b}, {t})")
        if tuple(pool.shape) != (b,) or pool.dtype != torch.int64 or bool((pool < 0).any() or (pool >= t).any()):
            raise ProtocolError("pool_index must be int64 (B,) within [0, T)")
        active = set(f["active"])
        if any(i < 0 or i >= len(self.cloud.sites) for i in active):
            raise ProtocolError("active module index out of range")
        self.active = active
        return StepInput(e, mask, pool, bool(f["train"]), int(f["step"]))

    def handle_step(self, msg, batcher: StepBatcher | None = None) -> None:
        """Run one step: alone, or through ``batcher`` together with other edges' steps."""
        inp = self.parse_step(msg)
        if batcher is None:
            self.run_alone(inp)
        else:
            batcher.run(self, inp)
        self.steps += 1
        self.channel.send("step_end", step=inp.step)

    def run_alone(self, inp: StepInput) -> None:
        """This edge's step on the base by itself (features out, feature gradient in, backward)."""
        dev = self.cloud.device
        self._cache, self._cache_x = {}, None
        try:
            with session_scope(self), torch.set_grad_enabled(inp.train):
                self._token = torch.zeros((), requires_grad=True) if inp.train else None
                h = self.cloud.arch.backbone(self.cloud.model, inp.embeds.to(dev), inp.mask.to(dev), inp.pool.to(dev))
            self.channel.send("features", {"h": h}, activations=True, step=inp.step)
            if inp.train:
                g = self.channel.recv("feature_grad").tensors(activation_schema({"g": tuple(h.shape)}), activations=True)["g"]
                if h.requires_grad:
                    with session_scope(self):
                        h.backward(g.to(device=h.device, dtype=h.dtype))
        finally:
            self._cache, self._cache_x, self._token = {}, None, None

    def handle_frozen(self, msg) -> None:
        i = int(msg.fields["module"])
        if not 0 <= i < len(self.cloud.sites):
            raise ProtocolError(f"frozen_factors for unknown module {i}")
        if msg.fields["revive"]:
            msg.tensors({})
            self.frozen.pop(i, None)
            return
        s = self.cloud.sites[i]
        got = msg.tensors(OrderedDict([("A", ((s.r, s.in_features), torch.float32)), ("B", ((s.out_features, s.r), torch.float32))]))
        self.frozen[i] = (got["A"].to(self.cloud.device, copy=True), got["B"].to(self.cloud.device, copy=True))
