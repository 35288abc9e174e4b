"""One cloud, many edges: concurrent split steps stacked into one pass of the frozen base.

When several edges send ``step_start`` within ``split.batch_window_ms`` of each other (at most
``split.max_batch_edges`` of them; a partial batch also waits for the batches still running,
whose edges then join it), their embedded batches are stacked along the batch
dimension, right-padded to the longest sequence with attention-mask zeros, and the base runs
once for all of them. Rows never mix in the base: attention only reaches unmasked keys of the
same row, and every other layer works per token.

At each LoRA site the rows are split again: every edge receives exactly its own rows, cut to
its own sequence length (the request goes out to all edges of the batch before any answer is
read, so the edges compute concurrently), and the answers are stacked back, zero on the
padding the cloud added. Features and, in backward, output gradients travel the same way,
so each edge sees the very messages, shapes and values of a step it runs alone (to fp32
rounding: only the order of summation inside the base's matrix products changes).

Evaluation steps batch with other evaluation steps, training steps with training steps.
An edge that fails or disconnects in the middle of a batch is dropped from it: its step
fails, its rows get a zero LoRA term from then on (they cannot reach other rows) and the
other edges' steps complete. A step whose batch holds only itself runs the single-edge path
of :class:`~dpeft.split.cloud.CloudSession`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dpeft.split.cloud import CloudModel, StepInput, session_scope
from dpeft.split.wire import activation_schema

if TYPE_CHECKING:
    from dpeft.split.cloud import CloudSession
    from dpeft.split.spec import LoraSite

log = logging.getLogger("dpeft.split.batcher")


@dataclass(eq=False)
class StepRequest:
    """One edge's step waiting for (or running in) a batch."""

    session: CloudSession
    inp: StepInput
    done: bool = False
    error: BaseException | None = None
    batch_edges: int = 0


class StepBatcher:
    """Collects concurrent steps and runs them as batches (one collector thread at a time).

    The session threads themselves do the work: the first thread that finds its request
    queued and nobody collecting becomes the collector, waits up to the window for more
    requests of the same kind, takes its batch out of the queue and runs it; meanwhile the
    next arrival may already collect the following batch.
    """

    def __init__(self, cloud: CloudModel, window_ms: float, max_edges: int) -> None:
        self.cloud = cloud
        self.window_s = max(window_ms, 0.0) / 1000.0
        self.max_edges = max(int(max_edges), 1)
        self._cv = threading.Condition()
        self._queue: list[StepRequest] = []
        self._collecting = False
        self._running = 0
        self._sessions = 0
        #: edges per batch run, in order (a 1 is a step that ran alone)
        self.batch_sizes: list[int] = []

    def join(self) -> None:
        """A session started: a window closes early once every session's step is queued."""
        with self._cv:
            self._sessions += 1

    def leave(self) -> None:
        with self._cv:
            self._sessions -= 1
            self._cv.notify_all()

    def run(self, session: CloudSession, inp: StepInput) -> int:
        """Run ``session``'s step in a batch; returns the batch's edge count, raises the step's error."""
        req = StepRequest(session, inp)
        batch: list[StepRequest] | None = None
        with self._cv:
            self._queue.append(req)
            self._cv.notify_all()
            while not req.done:
                if not self._collecting and req in self._queue:
                    batch = self._collect(req)
                    break
                self._cv.wait()
        if batch is not None:
            with self._cv:
                self._running += 1
            try:
                if len(batch) == 1:
                    session.run_alone(inp)
                else:
                    BatchStep(self.cloud, batch).run()
            except BaseException as exc:  # the cloud's own failure fails every step of the batch
                for r in batch:
                    r.error = r.error or exc
            finally:
                with self._cv:
                    self._running -= 1
                    for r in batch:
                        r.done, r.batch_edges = True, len(batch)
                    self.batch_sizes.append(len(batch))
                    self._cv.notify_all()
        if req.error is not None:
            raise req.error
        return req.batch_edges

    def _collect(self, own: StepRequest) -> list[StepRequest]:
        """(Lock held.) Take ``own`` and up to max_edges - 1 queued steps of its kind.

        A full batch (max_edges, or every connected edge) goes at once; a partial one waits
        out the window and, beyond it, for the batches still running: the edges of those
        come back together and join this one, so the edges fall into step with each other.
        """
        self._collecting = True
        try:
            deadline = time.monotonic() + self.window_s
            while True:
                same = [r for r in self._queue if r.inp.train == own.inp.train]
                if len(same) >= min(self.max_edges, max(self._sessions, 1)):
                    break
                left = deadline - time.monotonic()
                if left <= 0 and self._running == 0:
                    break
                self._cv.wait(left if left > 0 else None)
            same = [r for r in self._queue if r.inp.train == own.inp.train and r is not own]
            batch = [own, *same[: self.max_edges - 1]]
            for r in batch:
                self._queue.remove(r)
            return batch
        finally:
            self._collecting = False
            self._cv.notify_all()


class _Edge:
    """One edge's rows in a batch."""

    def __init__(self, req: StepRequest, row0: int) -> None:
        self.req = req
        self.session = req.session
        self.batch, self.width = int(req.inp.embeds.shape[0]), int(req.inp.embeds.shape[1])
        self.rows = slice(row0, row0 + self.batch)
        self.alive = True


class _BatchedRemoteLora(torch.autograd.Function):
    """The LoRA outputs of one site call to every edge of the batch; backward asks them all."""

    @staticmethod
    def forward(ctx, x, token, info, ys):
        ctx.info = info
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads):
        step, calls, x_shape = ctx.info
        return step.remote_backward(calls, grads, ctx.needs_input_grad[0], x_shape), None, None, None


class BatchStep:
    """One stacked step of several edges (the object the LoRA sites call while it runs)."""

    def __init__(self, cloud: CloudModel, reqs: list[StepRequest]) -> None:
        self.cloud = cloud
        self.edges: list[_Edge] = []
        row = 0
        for r in reqs:
            self.edges.append(_Edge(r, row))
            row += self.edges[-1].batch
        self.width = max(e.width for e in self.edges)
        self.train = reqs[0].inp.train
        self._x: torch.Tensor | None = None
        self._slices: list[torch.Tensor] = []
        self._cache: dict[tuple[int, int], torch.Tensor] = {}
        self._token: torch.Tensor | None = None

    def _fail(self, e: _Edge, exc: BaseException) -> None:
        if e.alive:
            e.alive = False
            e.req.error = exc
            log.info("edge %s dropped from a batched step: %s", e.session.name, exc)

    def _pad(self, t: torch.Tensor, width: int, value: float = 0.0) -> torch.Tensor:
        """Right-pad dimension 1 of ``t`` to the batch's width."""
        extra = self.width - width
        if extra == 0:
            return t
        pad = [0, 0] * (t.dim() - 2) + [0, extra]
        return nn.functional.pad(t, pad, value=value)

    def run(self) -> None:
        dev = self.cloud.device
        embeds = torch.cat([self._pad(e.req.inp.embeds, e.width) for e in self.edges]).to(dev)
        mask = torch.cat([self._pad(e.req.inp.mask, e.width) for e in self.edges]).to(dev)
        pool = torch.cat([e.req.inp.pool for e in self.edges]).to(dev)
        try:
            with session_scope(self), torch.set_grad_enabled(self.train):
                self._token = torch.zeros((), requires_grad=True) if self.train else None
                h = self.cloud.arch.backbone(self.cloud.model, embeds, mask, pool)
            causal = self.cloud.arch.causal
            mine = {id(e): (h[e.rows, : e.width] if causal else h[e.rows]) for e in self.edges}
            for e in self._alive():
                try:
                    e.session.channel.send("features", {"h": mine[id(e)]}, activations=True, step=e.req.inp.step)
                except Exception as exc:  # noqa: BLE001 - this edge's step fails, the others go on
                    self._fail(e, exc)
            if not self.train:
                return
            g = torch.zeros_like(h)
            for e in self._alive():
                try:
                    msg = e.session.channel.recv("feature_grad")
                    ge = msg.tensors(activation_schema({"g": tuple(mine[id(e)].shape)}), activations=True)["g"].to(
                        device=h.device, dtype=h.dtype
                    )
                    if causal:
                        g[e.rows, : e.width] = ge
                    else:
                        g[e.rows] = ge
                except Exception as exc:  # noqa: BLE001
                    self._fail(e, exc)
            if h.requires_grad and any(e.alive for e in self.edges):
                with session_scope(self):
                    h.backward(g)
        finally:
            self._x, self._slices, self._cache, self._token = None, [], {}, None

    def _alive(self) -> list[_Edge]:
        return [e for e in self.edges if e.alive]

    # -- the LoRA sites ---------------------------------------------------------
    def lora_term(self, site: LoraSite, x: torch.Tensor) -> torch.Tensor | None:
        """The LoRA term of ``site`` for every row: each edge's own, stacked (zero where none)."""
        i = site.index
        if x is not self._x:
            self._x, self._cache = x, {}
            self._slices = [x[e.rows, : e.width] for e in self.edges]
        terms: list[torch.Tensor | None] = [None] * len(self.edges)
        calls: list[list[Any]] = []  # [edge index, members, call number]
        for k, e in enumerate(self.edges):
            s = e.session
            if not e.alive or (i not in s.active and i not in s.frozen):
                continue
            if i in s.frozen:
                terms[k] = s.frozen_term(site, self._slices[k])
            elif (k, i) in self._cache:
                terms[k] = self._cache.pop((k, i))
            else:
                calls.append([k, s.members(i), 0])
        for c in calls:  # every request goes out before any answer is read
            e = self.edges[c[0]]
            try:
                c[2] = e.session.send_lora_input(c[1], self._slices[c[0]])
            except Exception as exc:  # noqa: BLE001
                self._fail(e, exc)
        answered: list[tuple[int, int, list[int], tuple[int, ...]]] = []
        flat: list[torch.Tensor] = []
        for k, members, call in calls:
            e = self.edges[k]
            if not e.alive:
                continue
            try:
                ys = e.session.recv_lora_output(call, members, self._slices[k])
            except Exception as exc:  # noqa: BLE001
                self._fail(e, exc)
                continue
            answered.append((k, call, members, tuple(self._slices[k].shape)))
            flat.extend(ys)
        outs: Any = flat
        if flat and torch.is_grad_enabled() and self._token is not None:
            outs = _BatchedRemoteLora.apply(x, self._token, (self, answered, tuple(x.shape)), flat)
        pos = 0
        for k, _call, members, _shape in answered:
            got = outs[pos : pos + len(members)]
            pos += len(members)
            terms[k] = got[0]
            for j, y in zip(members[1:], got[1:], strict=True):
                self._cache[(k, j)] = y
        if all(t is None for t in terms):
            return None
        pieces = []
        for e, t in zip(self.edges, terms, strict=True):
            pieces.append(x.new_zeros(e.batch, self.width, site.out_features) if t is None else self._pad(t, e.width))
        return torch.cat(pieces)

    def remote_backward(
        self,
        calls: list[tuple[int, int, list[int], tuple[int, ...]]],
        grads: tuple[torch.Tensor, ...],
        needs_x: bool,
        x_shape: tuple[int, ...],
    ) -> torch.Tensor | None:
        """Each edge its rows' output gradients (all sent first); their input gradients stacked."""
        gx = torch.zeros(x_shape, device=self.cloud.device) if needs_x else None
        sent = []
        pos = 0
        for k, call, members, shape in calls:
            mine = grads[pos : pos + len(members)]
            pos += len(members)
            e = self.edges[k]
            if not e.alive:
                continue
            try:
                e.session.send_output_grad(call, members, mine, needs_x)
                sent.append((k, call, shape))
            except Exception as exc:  # noqa: BLE001
                self._fail(e, exc)
        for k, call, shape in sent:
            e = self.edges[k]
            if not e.alive:
                continue
            try:
                gxe = e.session.recv_input_grad(call, needs_x, shape)
            except Exception as exc:  # noqa: BLE001
                self._fail(e, exc)
                continue
            if gx is not None and gxe is not None:
                gx[e.rows, : e.width] = gxe.to(gx.dtype)
        return gx


__all__ = ["BatchStep", "StepBatcher", "StepRequest"]
