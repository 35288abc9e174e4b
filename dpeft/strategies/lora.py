"""LoRA factor math shared by the LoRA-aware strategies.

Adapter states name LoRA factors structurally: ``<module>.lora_A.weight`` with shape
``(r, in)`` and ``<module>.lora_B.weight`` with shape ``(out, r)`` (embeddings:
``<module>.lora_embedding_A`` / ``lora_embedding_B``). :func:`lora_pairs` pairs them on those
exact path components, never on substrings. Everything else (classifier head, a
``lora_B.bias``, DoRA magnitudes, ...) is a plain tensor.

The module's weight update is ``scale * B @ A`` with ``scale = alpha / r``. The scale is a
constant per module, so it is left out: averaging, stacking and SVD all commute with it.
(Changing a module's rank changes peft's ``alpha / r``; a strategy that changes ranks
stores factors of ``B @ A`` and the model that loads them applies its own scale.)

Conv LoRA factors (``A`` of shape ``(r, in, k, k)``, ``B`` of shape ``(out, r, 1, 1)``) are
handled as the matrices ``A.reshape(r, -1)`` and ``B.reshape(out, r)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from dpeft.errors import ConfigError

A_TO_B = {"lora_A": "lora_B", "lora_embedding_A": "lora_embedding_B"}
B_COMPONENTS = frozenset(A_TO_B.values())

INIT_ROW_NORM = 1.0 / math.sqrt(3.0)
"""Row norm of a freshly initialised peft ``lora_A`` (kaiming-uniform, bound 1/sqrt(in))."""


def lora_pairs(names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Module prefix -> (A name, B name) for every ``lora_A``/``lora_B`` pair in ``names``.

    A ``B`` factor without its ``A`` (e.g. ``lora_B.bias``) is not a pair; an ``A`` factor
    without its ``B`` is an error.
    """
    names = list(names)
    present = set(names)
    pairs: dict[str, tuple[str, str]] = {}
    for name in names:
        parts = name.split(".")
        hits = [i for i, p in enumerate(parts) if p in A_TO_B]
        if not hits:
            continue
        if len(hits) > 1:
            raise ValueError(f"{name}: more than one LoRA A component")
        i = hits[0]
        b_name = ".".join(parts[:i] + [A_TO_B[parts[i]]] + parts[i + 1 :])
        if b_name not in present:
            raise ValueError(f"{name}: LoRA A factor without its B factor {b_name}")
        module = ".".join(parts[:i])
        if module in pairs:
            raise ValueError(f"module {module!r} has more than one LoRA pair")
        pairs[module] = (name, b_name)
    return pairs


def has_component(name: str, components: Iterable[str]) -> bool:
    """Whether one of ``components`` is a whole dot-separated part of ``name``."""
    wanted = set(components)
    return any(part in wanted for part in name.split("."))


def factor_components(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """The A and B path components (``lora_A``, ``lora_embedding_B``, ...) the pairs in ``names`` use."""
    a_parts: set[str] = set()
    for a_name, _ in lora_pairs(names).values():
        a_parts.update(p for p in a_name.split(".") if p in A_TO_B)
    return sorted(a_parts), sorted(A_TO_B[p] for p in a_parts)


def factor_matrices(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A as ``(r, in)`` and B as ``(out, r)`` float64 matrices, checking the shapes agree."""
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError(f"LoRA factors must be at least 2-D, got A {tuple(a.shape)}, B {tuple(b.shape)}")
    r = a.shape[0]
    if b.shape[1] != r or any(s != 1 for s in b.shape[2:]):
        raise ValueError(f"LoRA factor shapes do not match: A {tuple(a.shape)}, B {tuple(b.shape)}")
    return a.detach().reshape(r, -1).to(torch.float64), b.detach().reshape(b.shape[0], r).to(torch.float64)


def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``B @ A`` as an ``(out, in)`` float64 matrix (without the alpha/r scale)."""
    a2, b2 = factor_matrices(a, b)
    return b2 @ a2


def factorize(p: torch.Tensor, rank: int, keep: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Rank-``rank`` factors ``(B, A)`` of ``p`` by SVD, and the (discarded, total) squared singular values.

    With ``p = U S V^T``: ``B = U_k sqrt(S_k)``, ``A = sqrt(S_k) V_k^T`` for the ``keep``
    (default ``rank``) largest singular values, the best rank-``keep`` approximation
    (Eckart-Young). Components whose singular value is numerically zero, and kept slots
    beyond ``keep``, get ``A`` = the singular vector at peft's init row norm and ``B`` ~ 0:
    splitting them as sqrt(0) would zero both factors, and a LoRA direction with ``A = B =
    0`` has zero gradient on both and never trains again. Slots beyond ``min(out, in)`` get
    ``B = 0`` and, up to ``in`` rows, ``A`` rows orthogonal to the rest at init scale; only
    rows beyond ``in`` are zero. Returns float64 ``B`` ``(out, rank)`` and ``A`` ``(rank, in)``.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    keep = rank if keep is None else keep
    if not 0 <= keep <= rank:
        raise ValueError(f"keep must be in [0, {rank}], got {keep}")
    p = p.to(torch.float64)
    out_dim, in_dim = p.shape
    u, s, vh = torch.linalg.svd(p, full_matrices=False)
    k = min(rank, s.numel())
    kept = min(keep, k)
    total = float(s.pow(2).sum())
    discarded = float(s[kept:].pow(2).sum())
    sv = s[:k].clone()
    sv[kept:] = 0.0
    tol = (float(s[0]) if s.numel() else 0.0) * max(out_dim, in_dim) * torch.finfo(torch.float64).eps
    live = sv > tol
    a_scale = torch.where(live, sv.sqrt(), torch.full_like(sv, INIT_ROW_NORM))
    b_scale = sv / a_scale
    b_mat = torch.zeros(out_dim, rank, dtype=torch.float64)
    a_mat = torch.zeros(rank, in_dim, dtype=torch.float64)
    b_mat[:, :k] = u[:, :k] * b_scale
    a_mat[:k] = a_scale.unsqueeze(1) * vh[:k]
    n_a = min(rank, in_dim)
    if n_a > k:  # out < rank: fill further A rows from the orthogonal complement of V, B stays 0
        vh_full = torch.linalg.svd(p, full_matrices=True).Vh
        a_mat[k:n_a] = INIT_ROW_NORM * vh_full[k:n_a]
    return b_mat, a_mat, discarded, total


def shaped_like(
    a_mat: torch.Tensor, b_mat: torch.Tensor, a_like: torch.Tensor, b_like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrices from :func:`factorize` reshaped/cast to the layout of ``a_like``/``b_like`` (rank may differ)."""
    rank = a_mat.shape[0]
    a = a_mat.reshape((rank,) + tuple(a_like.shape[1:])).to(a_like.dtype)
    b = b_mat.reshape((b_like.shape[0], rank) + tuple(b_like.shape[2:])).to(b_like.dtype)
    return a, b


def relative_error(discarded: float, total: float) -> float:
    """Relative Frobenius error sqrt(discarded / total) of a truncation (0 for a zero matrix)."""
    return math.sqrt(discarded / total) if total > 0 else 0.0


LORA_METHODS = ("lora", "dora")
"""``adapter.method`` values whose adapters are LoRA factor pairs."""


def require_lora_method(strategy: str, run_cfg: object) -> None:
    """Config error unless the run's adapter method trains LoRA factor pairs."""
    method = run_cfg.adapter.method  # type: ignore[attr-defined]
    if method not in LORA_METHODS:
        raise ConfigError("strategy.name", f"{strategy} aggregates LoRA factor pairs; adapter.method={method!r} has none (use lora or dora)")


def refuse_secure_aggregation(strategy: str, run_cfg: object, needs: str) -> None:
    """Config error when ``privacy.secure_aggregation`` is on: ``strategy`` needs ``needs`` of
    each client, which a secure sum does not reveal."""
    if run_cfg.privacy.secure_aggregation:  # type: ignore[attr-defined]
        raise ConfigError(
            "privacy.secure_aggregation",
            f"{strategy} needs {needs}, which a secure sum does not reveal; use fedavg, ffa_lora or another weighted-mean strategy",
        )
