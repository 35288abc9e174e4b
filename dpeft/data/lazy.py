"""Tokenized data whose rows are tokenized the first time they are used.

A worker holds the whole training set but a round trains only the clients it is given: with
many clients and few per round, most rows are never trained by a given process. Every row is
padded to ``max_length`` on its own (the tokenizers in :mod:`dpeft.data.tokenize` never pad to
the longest row of a call), so tokenizing a client's rows when it first trains gives exactly
the tensors a tokenization of the whole set would: runs are unchanged to the bit.

Rows are stored compactly (token ids and targets as int32, the attention mask as uint8: 5
bytes a token instead of 24) and widened to int64 per batch. Access to the whole-set tensors
(``input_ids``, ``attention_mask``, token-level ``labels``) tokenizes whatever is left first:
code written against :class:`~dpeft.data.tokenize.TokenizedData` keeps working.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from dpeft.data.tokenize import TokenizedData, batch_of


class LazyTokens:
    """``n`` rows of ``max_length`` tokens; ``encode(indices)`` tokenizes those rows (a
    :class:`TokenizedData` with one row per index, in order). ``class_labels``: the (N,) class
    indices of a classification set, known without tokenizing (token-level targets are filled
    per row instead)."""

    def __init__(self, n: int, max_length: int, encode: Callable[[list[int]], TokenizedData], class_labels: torch.Tensor | None) -> None:
        self._n = n
        self._encode = encode
        self._ids = torch.empty((n, max_length), dtype=torch.int32)
        self._mask = torch.empty((n, max_length), dtype=torch.uint8)
        self._targets = None if class_labels is not None else torch.empty((n, max_length), dtype=torch.int32)
        self._class_labels = class_labels
        self._done = torch.zeros(n, dtype=torch.bool)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._n

    @property
    def tokenized(self) -> int:
        """How many rows have been tokenized so far."""
        return int(self._done.sum())

    def ensure(self, indices: Sequence[int] | torch.Tensor) -> None:
        """Tokenize the rows of ``indices`` not tokenized yet (one tokenizer call)."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        with self._lock:
            todo = torch.unique(idx[~self._done[idx]]) if len(idx) else idx
            if len(todo) == 0:
                return
            rows = self._encode(todo.tolist())
            self._ids[todo] = rows.input_ids.to(torch.int32)
            self._mask[todo] = rows.attention_mask.to(torch.uint8)
            if self._targets is not None:
                if rows.labels is None:
                    raise ValueError("token-level targets expected from the encoder")
                self._targets[todo] = rows.labels.to(torch.int32)
            self._done[todo] = True

    def rows(self, indices: Sequence[int] | torch.Tensor) -> TokenizedData:
        """The rows ``indices`` as plain :class:`TokenizedData` (int64, full width)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        self.ensure(idx)
        labels = self._class_labels[idx] if self._class_labels is not None else self._targets[idx].long()  # type: ignore[index]
        return TokenizedData(self._ids[idx].long(), self._mask[idx].long(), labels)

    def batch(self, indices: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``indices``, columns cut to the longest sequence among them (as TokenizedData.batch)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        self.ensure(idx)
        labels = self._class_labels if self._class_labels is not None else self._targets
        return batch_of(self._ids, self._mask, labels, idx)

    # -- the whole set, as TokenizedData has it ------------------------------------------
    def _all(self) -> None:
        if not bool(self._done.all()):
            self.ensure(torch.nonzero(~self._done).reshape(-1))

    @property
    def input_ids(self) -> torch.Tensor:
        self._all()
        return self._ids.long()

    @property
    def attention_mask(self) -> torch.Tensor:
        self._all()
        return self._mask.long()

    @property
    def labels(self) -> torch.Tensor:
        if self._class_labels is not None:
            return self._class_labels
        self._all()
        return self._targets.long()  # type: ignore[union-attr]


#: what trainers take: tokenized data, eager or lazy
Tokens = TokenizedData | LazyTokens
