"""Tokenize once per process into fixed tensors; batches are trimmed to their longest row."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenizedData:
    """input_ids / attention_mask of shape (N, max_length), labels (N,) or None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batch(self, indices: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``indices``, columns cut to the longest sequence among them."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        mask = self.attention_mask[idx]
        width = max(int(mask.sum(dim=1).max()), 1)
        out = {"input_ids": self.input_ids[idx, :width], "attention_mask": mask[:, :width]}
        if self.labels is not None:
            out["labels"] = self.labels[idx]
        return out


def tokenize(tokenizer: object, texts: list[str], labels: list[int] | None, max_length: int) -> TokenizedData:
    """Right-padded token tensors for all texts (fast tokenizer, one call)."""
    enc = tokenizer(  # type: ignore[operator]
        texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    lab = torch.tensor(labels, dtype=torch.long) if labels is not None else None
    return TokenizedData(enc["input_ids"], enc["attention_mask"], lab)
