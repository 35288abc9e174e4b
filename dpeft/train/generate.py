"""Generation scoring of a causal LM: greedy answers to held-out prompts, scored against reference answers.

A language model is judged by what it says. :func:`generate_answers` generates greedily for a
list of prompts, batch by batch with left padding (the new tokens of every row start at the
same column, so a batch gives the same answers as one prompt at a time), and decodes only the
new tokens. :func:`score_answers` compares each answer with its reference after
:func:`normalise`: ``exact`` (the normalised answer equals the normalised reference) or
``contains`` (the normalised reference appears anywhere in the answer).
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

MATCH_MODES = ("exact", "contains")
_TRAILING = string.punctuation + string.whitespace


def normalise(text: str, first_line: bool = True) -> str:
    """Lowercase, runs of whitespace as one space, trailing punctuation removed; only the first
    non-empty line unless ``first_line`` is false.

    >>> normalise("  Fresh.\\nBecause the acting...")
    'fresh'
    """
    text = text.strip()
    if first_line:
        text = text.splitlines()[0] if text else ""
    return " ".join(text.lower().split()).rstrip(_TRAILING)


def is_correct(answer: str, reference: str, match: str = "exact") -> bool:
    """Whether ``answer`` matches ``reference`` under ``match`` (exact | contains); an empty reference never matches."""
    ref = normalise(reference)
    if not ref:
        return False
    if match == "exact":
        return normalise(answer) == ref
    if match == "contains":
        return ref in normalise(answer, first_line=False)
    raise ValueError(f"unknown match mode {match!r}; expected one of {MATCH_MODES}")


def perplexity(loss: float) -> float:
    """exp(mean token loss); inf when it overflows a float."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


@torch.no_grad()
def generate_answers(
    model: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int, max_length: int | None = None
) -> list[str]:
    """Greedy answers (new tokens only, special tokens dropped) to ``prompts``, ``batch_size`` at a time.

    Prompts are left-padded (and, past ``max_length`` tokens, cut from the left, so the end of a
    prompt, where a chat template puts the assistant turn, is kept). End-of-sequence and padding
    ids come from the model's generation config, the tokenizer's padding token standing in when
    it has none. The tokenizer's padding and truncation sides are restored afterwards.
    """
    model.eval()
    device = next(model.parameters()).device
    gen_cfg = getattr(model, "generation_config", None)
    eos = _token_ids(getattr(gen_cfg, "eos_token_id", None)) or _token_ids(getattr(tokenizer, "eos_token_id", None))
    pad = getattr(gen_cfg, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), max(batch_size, 1)):
            chunk = prompts[start : start + max(batch_size, 1)]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=max_length is not None, max_length=max_length)
            input_ids = enc["input_ids"].to(device)
            out = cast(Any, model).generate(  # transformers' GenerationMixin (through peft)
                input_ids=input_ids,
                attention_mask=enc["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=eos or None,
                pad_token_id=pad,
            )
            answers.extend(tokenizer.batch_decode(out[:, input_ids.shape[1] :].cpu(), skip_special_tokens=True))
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
    return answers


@dataclass
class GenerationScore:
    """Scored generations: ``metrics`` (gen_accuracy, gen_examples) and the first few examples to read."""

    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)


def score_answers(prompts: list[str], references: list[str], answers: list[str], match: str, samples: int = 0) -> GenerationScore:
    """``gen_accuracy`` (fraction of answers matching their reference) and ``gen_examples``, with the
    first ``samples`` examples as ``{prompt, reference, answer, correct}``."""
    correct = [is_correct(a, r, match) for a, r in zip(answers, references, strict=True)]
    n = len(correct)
    metrics = {"gen_accuracy": sum(correct) / n if n else 0.0, "gen_examples": n}
    rows = [
        {"prompt": p, "reference": r, "answer": a, "correct": c}
        for p, r, a, c in list(zip(prompts, references, answers, correct, strict=True))[:samples]
    ]
    return GenerationScore(metrics, rows)
