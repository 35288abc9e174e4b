"""Representation fine-tuning (ReFT, Wu et al. 2024): low-rank interventions on hidden states.

An intervention edits the residual stream output ``h`` (size d) of a configured layer at
configured token positions, leaving the base weights untouched:

- **LoReFT** ``phi(h) = h + R^T (W h + b - R h)``, where ``R`` (r x d) has orthonormal rows:
  ``h`` is replaced, inside the r-dimensional subspace spanned by ``R``'s rows, by the learned
  projected source ``W h + b``.
- **DiReFT** ``phi(h) = h + W2^T (W1 h + b)``: no orthogonality and no subtraction (cheaper).

Initialisation. With ``init: identity`` (the default) LoReFT starts with ``W = R`` and ``b = 0``,
so ``phi(h) = h`` exactly and round 0 is the base model; DiReFT starts with ``W2 = 0`` (``W1``
random), also the identity. ``init: random`` draws ``W``/``b`` (and ``W2``) like a fresh
``nn.Linear``, as the reference implementation does: then the model is *not* the base at init.

Orthonormality. ``R`` is a plain parameter, re-orthonormalised after every optimizer step
(:meth:`ReftModule.after_optimizer_step`) and after every aggregation
(:func:`project_state`), both by the polar factor: for ``R = U S V^T`` (thin SVD) the
projection is ``U V^T``, the matrix with orthonormal rows closest to ``R`` in Frobenius norm
(the orthogonal Procrustes solution). A Euclidean gradient step or an average of orthonormal
matrices leaves the Stiefel manifold; projecting back is a retraction, and it moves the
matrix the least, so the averaged subspace is kept as far as orthonormality allows.

Positions: ``all`` (every real token) or ``f<p>+l<s>`` (the first p and last s real tokens of
each row). Positions are counted among the attention mask's real tokens, so left and right
padding give the same tokens; in a decoding step with a KV cache the new token counts as the
last one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dpeft.config.options import option
from dpeft.errors import ConfigError

_POSITIONS = re.compile(r"^(?:f(\d+))?\+?(?:l(\d+))?$")


@dataclass(kw_only=True)
class ReftOptions:
    """``adapter.options`` of loreft and direft (the rank is ``adapter.r``)."""

    layers: list[int] | None = option(None, "layer indices to adapt (0-based); null = every layer", low=0)
    positions: str = option(
        "all", "tokens intervened on: all, or f<p>+l<s> (first p and last s real tokens of each row, e.g. f1+l1)"
    )
    init: str = option(
        "identity",
        "identity (LoReFT W = R, b = 0; DiReFT W2 = 0: the base model at round 0) or random (W, b, W2 drawn like nn.Linear)",
        choices=("identity", "random"),
    )


def parse_positions(spec: str) -> tuple[int, int] | None:
    """None for ``all``, else (first, last) token counts; ConfigError(adapter.options.positions) when malformed."""
    text = spec.strip().lower()
    if text == "all":
        return None
    m = _POSITIONS.match(text)
    if not text or m is None or (m.group(1) is None and m.group(2) is None):
        raise ConfigError("adapter.options.positions", f"must be all or f<p>+l<s> (e.g. f1+l1, l2, f3), got {spec!r}")
    first, last = int(m.group(1) or 0), int(m.group(2) or 0)
    if first + last == 0:
        raise ConfigError("adapter.options.positions", f"selects no token: {spec!r}")
    return first, last


def position_mask(
    attention_mask: torch.Tensor | None, shape: tuple[int, int], device: torch.device, spec: tuple[int, int] | None
) -> torch.Tensor:
    """(batch, length) bool mask of the positions to intervene on, for hidden states of ``shape``.

    ``attention_mask`` covers the whole sequence so far (longer than the hidden states in a
    decoding step with a KV cache: its last columns are theirs)."""
    batch, length = shape
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[0] != batch:
        real = torch.ones(batch, length, dtype=torch.bool, device=device)
    else:
        real = attention_mask.to(device) != 0
    if spec is not None:
        rank = real.long().cumsum(dim=1) - 1  # index of each real token among its row's real tokens
        count = real.long().sum(dim=1, keepdim=True)
        first, last = spec
        real = real & ((rank < first) | (rank >= count - last))
    return real[:, -length:]


def orthonormalize_rows(matrix: torch.Tensor) -> torch.Tensor:
    """The closest matrix with orthonormal rows (polar factor ``U V^T`` of the thin SVD), in the input's dtype."""
    u, _, vh = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
    return (u @ vh).to(matrix.dtype)


def random_orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A seeded random ``rows`` x ``cols`` matrix with orthonormal rows."""
    gauss = torch.randn(cols, rows, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # a unique (Haar) draw
    return q.T.contiguous().float()


def _linear_init(weight: torch.Tensor, bias: torch.Tensor | None, generator: torch.Generator) -> None:
    """nn.Linear's default initialisation, from ``generator``."""
    bound = 1.0 / math.sqrt(weight.shape[1])
    with torch.no_grad():
        weight.uniform_(-bound, bound, generator=generator)
        if bias is not None:
            bias.uniform_(-bound, bound, generator=generator)


class LoReFT(nn.Module):
    """``h + R^T (W h + b - R h)`` with ``R`` of orthonormal rows."""

    def __init__(self, dim: int, rank: int, init: str, generator: torch.Generator, dropout: float = 0.0) -> None:
        super().__init__()
        if rank > dim:
            raise ConfigError(
                "adapter.r", f"loreft needs r <= the hidden size ({dim}) for R to have orthonormal rows, got {rank}"
            )
        self.R = nn.Parameter(random_orthonormal(rank, dim, generator))
        self.W = nn.Linear(dim, rank)
        if init == "identity":
            with torch.no_grad():
                self.W.weight.copy_(self.R)
                self.W.bias.zero_()
        else:
            _linear_init(self.W.weight, self.W.bias, generator)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        r = self.R.to(h.dtype)
        edit = self.W(h.to(self.W.weight.dtype)).to(h.dtype) - h @ r.T
        return h + self.dropout(edit @ r)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Put ``R`` back onto the Stiefel manifold (rows orthonormal)."""
        self.R.copy_(orthonormalize_rows(self.R))


class DiReFT(nn.Module):
    """``h + W2^T (W1 h + b)``."""

    def __init__(self, dim: int, rank: int, init: str, generator: torch.Generator, dropout: float = 0.0) -> None:
        super().__init__()
        self.W1 = nn.Linear(dim, rank)
        _linear_init(self.W1.weight, self.W1.bias, generator)
        self.W2 = nn.Parameter(torch.zeros(rank, dim))
        if init == "random":
            _linear_init(self.W2, None, generator)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        low = self.W1(h.to(self.W1.weight.dtype))
        return h + self.dropout((low @ self.W2).to(h.dtype))


class ReftModule(nn.ModuleDict):
    """The interventions of one model: ``{layer index: LoReFT | DiReFT}`` and the hooks that apply them."""

    def __init__(
        self, method: str, dim: int, rank: int, layers: list[int], opts: ReftOptions, seed: int, dropout: float = 0.0
    ) -> None:
        cls = LoReFT if method == "loreft" else DiReFT
        gen = torch.Generator().manual_seed(seed)
        super().__init__({str(i): cls(dim, rank, opts.init, gen, dropout) for i in layers})
        self.method = method
        self.positions = parse_positions(opts.positions)
        self._mask: torch.Tensor | None = None  # the attention mask of the forward in progress

    def attach(self, base: nn.Module, blocks: nn.ModuleList) -> list[Any]:
        """Register the hooks on ``base`` (captures the attention mask) and on the chosen blocks; returns their handles."""
        handles = [base.register_forward_pre_hook(self._capture, with_kwargs=True)]
        for key, intervention in self.items():
            handles.append(blocks[int(key)].register_forward_hook(self._hook(intervention)))
        return handles

    def _capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # transformers models take (input_ids, attention_mask, ...) when called positionally
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self._mask = mask if isinstance(mask, torch.Tensor) else None

    def _hook(self, intervention: nn.Module) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            where = position_mask(self._mask, (hidden.shape[0], hidden.shape[1]), hidden.device, self.positions)
            edited = intervention(hidden)
            if self.positions is not None or not bool(where.all()):
                edited = torch.where(where.unsqueeze(-1), edited, hidden)
            return (edited, *output[1:]) if isinstance(output, tuple) else edited

        return hook

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Re-orthonormalise every LoReFT ``R`` (a no-op for DiReFT)."""
        for intervention in self.values():
            step = getattr(intervention, "after_optimizer_step", None)
            if step is not None:
                step()


def is_orthonormal_key(name: str) -> bool:
    """Whether state tensor ``name`` is a LoReFT ``R`` (``reft.<layer>.R``)."""
    parts = name.split(".")
    return len(parts) == 3 and parts[0] == "reft" and parts[1].isdigit() and parts[2] == "R"


def project_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every LoReFT ``R`` projected back onto orthonormal rows (after aggregation)."""
    return {k: orthonormalize_rows(v) if is_orthonormal_key(k) else v for k, v in tensors.items()}
