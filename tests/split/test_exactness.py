"""One split training step == one monolithic peft step (loss, factor gradients, updated factors).

Tolerance 1e-5. Gradients differ from the monolithic ones only by summation order (~1e-9).

Cloud and edge run in this process but talk over a real loopback gRPC stream. The base runs
in eval mode on both sides (split mode trains without base dropout). LoRA B factors are
perturbed away from their zero init so every factor gets a non-trivial gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch
from split_testlib import loopback, reference_step

from dpeft.adapters import adapter_parameters, build_model
from dpeft.config import AdapterConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
from dpeft.data import load_dataset, tokenize
from dpeft.split.config import SplitConfig
from dpeft.split.spec import slice_layers

TOL = 1e-5


def _perturb(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in adapter_parameters(model).items():
            if "lora_B" in k:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def _split_step(model, run, batch):
    """Run one split step; return (loss, grads before clipping, updated params, stats)."""
    captured = {}
    with loopback(model, run, SplitConfig(federated=False)) as (edge, channel, welcome, _):
        welcome.tensors({})
        real = torch.nn.utils.clip_grad_norm_

        def clip(params, max_norm):
            captured.update({k: p.grad.detach().clone() for k, p in edge.params.items() if p.grad is not None})
            return real(params, max_norm)

        torch.nn.utils.clip_grad_norm_ = clip
        try:
            stats, logits = edge.step(channel, batch["input_ids"], batch["attention_mask"], batch.get("labels"), train=True)
        finally:
            torch.nn.utils.clip_grad_norm_ = real
        updated = {k: p.detach().clone() for k, p in edge.params.items()}
        groups = welcome.fields["groups"]
    return stats, logits, captured, updated, groups


def _check(model, batch, optimizer, nonzero=(".lora_A.", ".lora_B.")):
    run = RunConfig(train=TrainConfig(loss="cross_entropy", optimizer=optimizer))
    ref = copy.deepcopy(model)
    ref.eval()
    loss_r, logits_r, grads_r, upd_r = reference_step(ref, adapter_parameters(ref), batch, run.train)
    stats, logits, grads, upd, groups = _split_step(model, run, batch)
    assert abs(stats.loss - loss_r) <= TOL
    assert float((logits - logits_r).abs().max()) <= TOL
    assert set(grads) == set(grads_r) and len(grads) > 2
    lora_keys = [k for k in grads if any(n in k for n in nonzero)]
    assert lora_keys and all(float(grads[k].abs().max()) > 0 for k in lora_keys)
    for k in grads_r:
        assert float((grads[k] - grads_r[k]).abs().max()) <= TOL, k
    for k in upd_r:
        assert float((upd[k] - upd_r[k]).abs().max()) <= TOL, k
    return stats, groups


@pytest.fixture(scope="module")
def minilm_batch():
    bundle = build_model(ModelConfig(), AdapterConfig(), 2, 0)
    train, _ = load_dataset(DataConfig(max_train_examples=32, test_examples=8), 0)
    data = tokenize(bundle.tokenizer, train.texts, train.labels, 32)
    return bundle.model, data.batch(list(range(6)))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_minilm_split_step_matches_monolithic(minilm_batch, optimizer):
    model, batch = minilm_batch
    model = copy.deepcopy(model)
    if optimizer == "sgd":
        # every factor non-trivial; SGD's update is linear in the gradient
        _perturb(model)
        stats, groups = _check(model, batch, optimizer)
    else:
        # AdamW's first update is lr * g / (|g| + eps): at the real init (B = 0, so dA = 0 exactly
        # on both sides) it is well conditioned; elsewhere 1e-9 gradient noise near g = 0 is
        # amplified by lr / eps, which no split implementation can avoid
        stats, groups = _check(model, batch, optimizer, nonzero=(".lora_B.",))
    # query/value of each of the 6 layers share their input: one call per layer
    assert groups == [[2 * i, 2 * i + 1] for i in range(6)]
    assert stats.lora_calls == 6


def test_smollm2_two_layer_slice_split_step_matches_monolithic():
    bundle = build_model(ModelConfig(name="smollm2", max_length=24), AdapterConfig(target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]), 2, 0)
    slice_layers(bundle.model, 2)
    model = bundle.model
    _perturb(model)
    texts = ["a fine, moving film", "dull and far too long", "I laughed", "no"]
    data = tokenize(bundle.tokenizer, texts, [1, 0, 1, 0], 24)
    batch = data.batch(list(range(4)))
    assert int(batch["attention_mask"].sum(1).min()) < batch["attention_mask"].shape[1]  # padding is exercised
    stats, groups = _check(model, batch, "sgd")
    # q/v share their input; o_proj and down_proj each get their own call
    assert groups == [[0, 1], [2], [3], [4, 5], [6], [7]]
    assert stats.lora_calls == 6


def test_causal_lm_llama_split_step_matches_monolithic():
    """Next-token task on a 2-layer Llama (random weights, tied LM head like SmolLM2): the LM head,
    the shifted targets and the loss run on the edge; loss, logits, factor gradients and the
    updated factors equal peft's own causal-LM loss step, with right padding."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpeft.split.edge import EdgeModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], task_type="CAUSAL_LM"))
    model.eval()
    _perturb(model)
    ids = torch.randint(1, 320, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    batch = {"input_ids": ids, "attention_mask": mask}
    run = RunConfig(model=ModelConfig(task="causal_lm"), train=TrainConfig(optimizer="sgd", lr=0.5))

    ref = copy.deepcopy(model)
    params = adapter_parameters(ref)
    assert all(".lora_" in k for k in params)  # the LM head is frozen: only the factors train
    from dpeft.train.loop import make_optimizer

    opt = make_optimizer(params.values(), run.train)
    out = ref(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    grads_r = {k: p.grad.detach().clone() for k, p in params.items()}
    torch.nn.utils.clip_grad_norm_(list(params.values()), run.train.max_grad_norm)
    opt.step()

    stats, logits, grads, upd, groups = _split_step(model, run, batch)
    assert abs(stats.loss - float(out.loss.detach())) <= TOL
    assert logits.shape == (3, 9, 320) and float((logits - out.logits.detach()).abs().max()) <= TOL
    assert set(grads) == set(grads_r) and all(float(g.abs().max()) > 0 for g in grads.values())
    for k, p in params.items():
        assert float((grads[k] - grads_r[k]).abs().max()) <= TOL, k
        assert float((upd[k] - p.detach()).abs().max()) <= TOL, k
    assert groups == [[0, 1], [2], [3], [4, 5], [6], [7]]
    # the edge keeps the tied embedding/LM head and frees the frozen body
    edge = EdgeModel(copy.deepcopy(model), run.train)
    assert edge.causal and edge.drop_body() > 0
    assert edge.arch.head_module(edge.model).weight.device.type == "cpu"


def test_causal_lm_on_bert_is_a_config_error_naming_model_task():
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertLMHeadModel

    from dpeft.errors import ConfigError
    from dpeft.split.spec import arch_for

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, is_decoder=True)
    model = get_peft_model(BertLMHeadModel(cfg), LoraConfig(r=2, target_modules=["query", "value"]))
    with pytest.raises(ConfigError, match="model.task"):
        arch_for(model)
