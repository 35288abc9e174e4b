"""The causal-LM loss and evaluation read the batch's token labels: prompt tokens carry no loss.

A tiny randomly initialised Llama (transformers' own class, built from a config) stands in for
SmolLM2 so the check is exact and fast.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpeft.data.tokenize import IGNORE, TokenizedData
from dpeft.train.loop import _loss, evaluate


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2
    )
    return LlamaForCausalLM(cfg).eval()


def _data() -> TokenizedData:
    ids = torch.tensor([[5, 6, 7, 8, 9, 2, 0, 0], [11, 12, 13, 14, 2, 0, 0, 0]])
    mask = (torch.arange(8) < torch.tensor([[6], [5]])).long()
    labels = torch.full_like(ids, IGNORE)
    labels[0, 3:6] = ids[0, 3:6]  # prompt 5 6 7, response 8 9 + EOS
    labels[1, 3:5] = ids[1, 3:5]  # prompt 11 12 13, response 14 + EOS
    return TokenizedData(ids, mask, labels)


def _manual(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, n = 0.0, 0
    for row in range(batch["input_ids"].shape[0]):
        for t in range(1, batch["input_ids"].shape[1]):
            target = int(batch["labels"][row, t])
            if target != IGNORE:
                total += float(nn.functional.cross_entropy(logits[row, t - 1 : t], torch.tensor([target])))
                n += 1
    return total, n


@torch.no_grad()
def test_loss_is_the_response_tokens_only(tiny_llama) -> None:
    data = _data()
    batch = data.batch([0, 1])
    total, n = _manual(tiny_llama, batch)
    assert n == 5  # 3 + 2 response tokens (EOS included), nothing of the prompts or padding
    assert float(_loss(tiny_llama, batch, "causal_lm", None)) == pytest.approx(total / n, rel=1e-5)
    # plain text (no token labels): every real token after the first is a target
    plain = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    every = dict(plain, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE))
    t_all, n_all = _manual(tiny_llama, every)
    assert n_all == 5 + 4
    assert float(_loss(tiny_llama, plain, "causal_lm", None)) == pytest.approx(t_all / n_all, rel=1e-5)


def test_evaluate_scores_the_response_tokens(tiny_llama) -> None:
    data = _data()
    total, n = _manual(tiny_llama, data.batch([0, 1]))
    got = evaluate(tiny_llama, data, "causal_lm", batch_size=1)
    assert got["eval_loss"] == pytest.approx(total / n, rel=1e-5)
    assert 0.0 <= got["eval_accuracy"] <= 1.0
