"""Rows tokenized when first used give exactly the tensors of tokenizing the whole set at once:
classification (MiniLM), instruction and plain-text causal LM data (SmolLM2's tokenizer)."""

from __future__ import annotations

import pytest
import torch

from dpeft.adapters.model import load_tokenizer
from dpeft.config import ModelConfig
from dpeft.data import load_run_data, tokenize_dataset
from dpeft.data.lazy import LazyTokens
from dpeft.validate import load_config

CASES = {
    "classification": ["data.max_train_examples=200"],
    "instruction": ["model.name=smollm2", "model.task=causal_lm", "model.max_length=64", "data.format=instruction", "data.max_train_examples=120"],
    "text": ["model.name=smollm2", "model.task=causal_lm", "model.max_length=48", "data.format=text", "data.max_train_examples=120"],
}


@pytest.fixture(scope="module", params=sorted(CASES))
def both(request):
    cfg = load_config(None, ["clients=3", "clients_per_round=3", "data.test_examples=10", "data.partition=iid", *CASES[request.param]])
    tok = load_tokenizer(cfg.model)
    train = load_run_data(cfg, tokenizer=tok).train
    eager = tokenize_dataset(tok, train, cfg)
    assert not isinstance(eager, LazyTokens)
    return eager, lambda: tokenize_dataset(tok, train, cfg, lazy=True)  # a fresh lazy set per test (cheap)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.long, k
        assert torch.equal(a[k], b[k]), k


def test_batches_match_and_only_used_rows_are_tokenized(both) -> None:
    eager, make = both
    lazy = make()
    assert isinstance(lazy, LazyTokens)
    n = len(eager)
    assert len(lazy) == n and lazy.tokenized == 0
    g = torch.Generator().manual_seed(0)
    seen: set[int] = set()
    for size in (1, 7, 16, 16):
        idx = torch.randperm(n, generator=g)[:size]
        _same(lazy.batch(idx), eager.batch(idx))
        seen |= set(idx.tolist())
        assert lazy.tokenized == len(seen)  # nothing beyond the rows asked for; nothing twice
    _same(lazy.batch(list(idx)), eager.batch(list(idx)))  # a list of ints, rows already there
    held = [3, 1, 4, 1]
    rows, want = lazy.rows(held), eager.rows(held)
    for name in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(getattr(rows, name), getattr(want, name)), name


def test_whole_set_access_tokenizes_the_rest(both) -> None:
    eager, make = both
    lazy = make()
    lazy.ensure([0, 2])
    assert torch.equal(lazy.attention_mask, eager.attention_mask)
    assert lazy.tokenized == len(eager)
    assert torch.equal(lazy.input_ids, eager.input_ids)
    assert lazy.labels is not None and eager.labels is not None
    assert torch.equal(lazy.labels, eager.labels)


def test_class_labels_need_no_tokenizing() -> None:
    cfg = load_config(None, ["clients=2", "clients_per_round=2", "data.max_train_examples=50", "data.test_examples=10"])
    tok = load_tokenizer(ModelConfig())
    train = load_run_data(cfg, tokenizer=tok).train
    lazy = tokenize_dataset(tok, train, cfg, lazy=True)
    assert lazy.labels.tolist() == train.labels and lazy.tokenized == 0  # label priors read them before any batch
