"""Tokenize once per process into fixed tensors; batches are trimmed to their longest row.

Classification: ``labels`` are the class indices (N,). Causal LMs: ``labels`` are token-level
targets (N, max_length), unshifted (the Hugging Face convention: the model shifts them), -100
where no loss is taken: padding always, and the prompt of instruction/chat examples, so a
model's own loss is the response's (and, in a multi-turn chat, the earlier assistant turns').
A response is followed by the EOS token, so the model learns to stop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("dpeft.data")

IGNORE = -100


@dataclass
class TokenizedData:
    """input_ids / attention_mask of shape (N, max_length); labels (N,) (classes), (N, max_length) (tokens) or None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batch(self, indices: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``indices``, columns cut to the longest sequence among them."""
        return batch_of(self.input_ids, self.attention_mask, self.labels, torch.as_tensor(indices, dtype=torch.long))

    def rows(self, indices: list[int] | torch.Tensor) -> TokenizedData:
        """The rows ``indices`` (every per-example tensor)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return TokenizedData(self.input_ids[idx], self.attention_mask[idx], None if self.labels is None else self.labels[idx])


def batch_of(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows ``idx`` of the (N, max_length) tensors as int64, columns cut to the longest sequence
    among them (``labels``: (N,) classes or (N, max_length) token targets)."""
    mask = attention_mask[idx]
    width = max(int(mask.sum(dim=1).max()), 1)
    out = {"input_ids": input_ids[idx, :width].long(), "attention_mask": mask[:, :width].long()}
    if labels is not None:
        rows = labels[idx]
        out["labels"] = (rows[:, :width] if rows.dim() == 2 else rows).long()
    return out


def tokenize(tokenizer: object, texts: list[str], labels: list[int] | None, max_length: int) -> TokenizedData:
    """Right-padded token tensors for all texts (fast tokenizer, one call)."""
    enc = tokenizer(  # type: ignore[operator]
        texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    lab = torch.tensor(labels, dtype=torch.long) if labels is not None else None
    return TokenizedData(enc["input_ids"], enc["attention_mask"], lab)


def tokenize_text_lm(tokenizer: object, texts: list[str], max_length: int) -> TokenizedData:
    """Plain text for a causal LM: the loss is on every real token (labels = input_ids, -100 at padding)."""
    data = tokenize(tokenizer, texts, None, max_length)
    data.labels = data.input_ids.masked_fill(data.attention_mask == 0, IGNORE)
    return data


def fit_pair(prefix: list[int], prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """(prompt part, response part, response cut?) within ``max_length`` tokens together with ``prefix``.

    The response is kept whole while it fits: the prompt loses tokens from its left. When the
    response alone leaves the prompt less than half the window, the prompt keeps its last
    half-window (all of it if shorter) and the response is cut from the right.
    """
    room = max_length - len(prefix)
    if len(prompt) + len(response) <= room:
        return prompt, response, False
    keep_prompt = min(len(prompt), max(room - len(response), room // 2))
    prompt = prompt[len(prompt) - keep_prompt :]
    cut = len(response) > room - keep_prompt
    return prompt, response[: room - keep_prompt], cut


def _prompt_labels(
    tokenizer: Any, prompts: list[str], spans: list[list[tuple[int, int]]]
) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt token ids, and their labels: the token itself where it lies inside one of ``spans``
    (character ranges) or its first visible character does (a leading space belongs to the
    token), else -100."""
    enc = tokenizer(prompts, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for text, ids, offsets, ranges in zip(prompts, enc["input_ids"], enc["offset_mapping"], spans, strict=True):
        row = []
        for t, (s, e) in zip(ids, offsets, strict=True):
            piece = text[s:e]
            first = s + len(piece) - len(piece.lstrip())
            inside = any((a <= s and e <= b) or (piece.strip() and a <= first < b) for a, b in ranges)
            row.append(t if e > s and inside else IGNORE)
        labels.append(row)
    return enc["input_ids"], labels


def special_prefix_ids(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before any text (e.g. Llama's BOS; none for SmolLM2)."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def tokenize_pairs(
    tokenizer: Any,
    prompts: list[str],
    responses: list[str],
    max_length: int,
    special_prefix: bool = True,
    prompt_targets: list[list[tuple[int, int]]] | None = None,
) -> TokenizedData:
    """Prompt + response + EOS per example, right-padded; labels are the response and EOS tokens only.

    ``special_prefix``: start with the tokens the tokenizer adds to any text (e.g. a BOS token);
    False for chat-template prompts, which carry their own. ``prompt_targets``: per example,
    character ranges of the prompt trained too (earlier assistant turns of a chat).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token to end responses with")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    prefix = special_prefix_ids(tokenizer) if special_prefix else []
    if prompt_targets is not None:
        p_ids, p_labels = _prompt_labels(tokenizer, prompts, prompt_targets)
    else:
        p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        p_labels = [[IGNORE] * len(p) for p in p_ids]
    r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    n = len(prompts)
    rows: list[list[int]] = []
    targets: list[list[int]] = []
    lengths: list[int] = []
    cut_prompts = cut_responses = 0
    for p, p_lab, r in zip(p_ids, p_labels, r_ids, strict=True):
        p_fit, r_fit, cut = fit_pair(prefix, list(p), [*r, eos], max_length)
        cut_prompts += len(p_fit) < len(p)
        cut_responses += cut
        row = prefix + p_fit + r_fit
        pad_n = max_length - len(row)
        rows.append(row + [pad] * pad_n)
        kept = p_lab[len(p) - len(p_fit) :]  # the prompt's labels, cut like the prompt
        targets.append([IGNORE] * len(prefix) + kept + r_fit + [IGNORE] * pad_n)
        lengths.append(len(row))
    input_ids = torch.tensor(rows, dtype=torch.long).reshape(n, max_length)
    labels = torch.tensor(targets, dtype=torch.long).reshape(n, max_length)
    mask = (torch.arange(max_length) < torch.tensor(lengths, dtype=torch.long).reshape(n, 1)).long()
    if cut_prompts or cut_responses:
        log.debug(
            "truncation to %d tokens: %d of %d prompts cut from the left, %d responses cut (longer than the window allows)",
            max_length,
            cut_prompts,
            n,
            cut_responses,
        )
    return TokenizedData(input_ids, mask, labels)
