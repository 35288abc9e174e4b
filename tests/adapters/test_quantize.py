"""A 4/8-bit frozen base (model.quantization) through bitsandbytes' CPU path: MiniLM and SmolLM2 (2 layers).

Tiny on purpose (8-16 examples, 16-24 tokens, 1-3 steps); bitsandbytes really quantizes here,
nothing is mocked.
"""

from __future__ import annotations

import math

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from dpeft.adapters import adapter_parameters, build_model, extract_state
from dpeft.adapters.quantize import parameter_bytes, quantized_layers
from dpeft.data import load_dataset, tokenize
from dpeft.errors import ConfigError
from dpeft.train import evaluate, local_train
from dpeft.validate import load_config

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = [
    "train.local_steps=3",
    "train.batch_size=8",
    "train.lr=0.01",
    "model.max_length=24",
    "data.max_train_examples=16",
    "data.test_examples=8",
]


def _minilm(quantization: str, *more: str):
    cfg = load_config(None, [*STEPS, f"model.quantization={quantization}", "model.dropout=0", *more])
    bundle = build_model(cfg.model, cfg.adapter, 2, cfg.seed)
    train, _ = load_dataset(cfg.data, cfg.seed)
    data = tokenize(bundle.tokenizer, train.texts, train.labels, cfg.model.max_length)
    return cfg, bundle, data


def _train_same_batch(cfg, bundle, data) -> list[float]:
    """Three steps on the same 8 examples (each step sees them all): the loss must fall."""
    params = list(adapter_parameters(bundle.model).values())
    opt = torch.optim.AdamW(params, lr=cfg.train.lr)
    model = bundle.model
    model.train()
    batch = {k: v[:8] for k, v in (("input_ids", data.input_ids), ("attention_mask", data.attention_mask))}
    losses = []
    for _ in range(3):
        out = model(**batch, labels=torch.as_tensor(data.labels[:8]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    model.eval()
    return losses


@pytest.fixture(scope="module")
def nf4_minilm():
    return _minilm("nf4")


def test_nf4_minilm_trains_with_fp32_head_and_adapter(nf4_minilm) -> None:
    cfg, bundle, data = nf4_minilm
    model = bundle.model
    layers = quantized_layers(model)
    # 6 layers x (q, k, v, attn out, intermediate, out) + the pooler
    assert len(layers) == 37 and all(isinstance(model.get_submodule(n), bnb.nn.Linear4bit) for n in layers)
    # the classifier head is not quantized: a plain fp32 Linear, original and trained copy alike
    head = model.base_model.model.classifier
    for inner in (head.original_module, head.modules_to_save["default"]):
        assert type(inner) is nn.Linear and inner.weight.dtype == torch.float32
    params = adapter_parameters(model)
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params.values())
    assert not any(isinstance(p, bnb.nn.Params4bit) for p in params.values())

    # evaluation first: on a CPU with AVX512-BF16, bitsandbytes would repack the weights in eval
    # mode and a training step after it would fail (dpeft keeps the layout)
    before = evaluate(model, data, "seq_cls", 8)
    assert math.isfinite(before["eval_loss"])
    losses = _train_same_batch(cfg, bundle, data)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses


def test_nf4_parameter_bytes_well_below_fp32(nf4_minilm) -> None:
    _, bundle, _ = nf4_minilm
    cfg = load_config(None, ["model.layers=2"])
    fp32 = build_model(cfg.model, cfg.adapter, 2, 0)
    cfgq = load_config(None, ["model.layers=2", "model.quantization=nf4"])
    nf4 = build_model(cfgq.model, cfgq.adapter, 2, 0)
    # MiniLM's embedding table (12M of its 22M weights) stays fp32; the Linear layers shrink ~7x
    linear_fp32 = sum(
        m.weight.numel() * 4 for _, m in fp32.model.named_modules() if type(m) is nn.Linear and "classifier" not in _
    )
    linear_nf4 = sum(m.weight.numel() * m.weight.element_size() for m in nf4.model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert linear_nf4 * 6 < linear_fp32, (linear_nf4, linear_fp32)
    assert parameter_bytes(nf4.model) < 0.8 * parameter_bytes(fp32.model)
    assert parameter_bytes(bundle.model) < 0.7 * 90_000_000  # the full nf4 MiniLM against ~90 MB in fp32


def test_int8_minilm_trains_on_cpu() -> None:
    cfg, bundle, data = _minilm("int8", "model.layers=2")
    layers = quantized_layers(bundle.model)
    assert layers and all(isinstance(bundle.model.get_submodule(n), bnb.nn.Linear8bitLt) for n in layers)
    losses = _train_same_batch(cfg, bundle, data)
    assert losses[-1] < losses[0], losses


def test_nf4_smollm2_causal_lm_step() -> None:
    cfg = load_config(
        None,
        ["model.name=smollm2", "model.task=causal_lm", "model.layers=2", "model.max_length=16", "model.quantization=nf4"]
        + ["data.max_train_examples=4", "data.test_examples=4", "train.local_steps=1", "train.batch_size=4", "train.lr=0.005"],
    )
    bundle = build_model(cfg.model, cfg.adapter, None, cfg.seed)
    model = bundle.model
    assert len(quantized_layers(model)) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert type(model.base_model.model.lm_head) is nn.Linear  # the output head is skipped
    train, _ = load_dataset(cfg.data, cfg.seed, need_labels=False)
    data = tokenize(bundle.tokenizer, train.texts, None, cfg.model.max_length)
    before = extract_state(model)
    params = list(adapter_parameters(model).values())
    result = local_train(model, params, data, list(range(len(data))), cfg.train, "causal_lm", seed=1)
    assert result.steps == 1 and math.isfinite(result.train_loss)
    moved = extract_state(model)
    b = next(n for n in moved.tensors if n.endswith("lora_B.weight"))
    assert float(before[b].abs().sum()) == 0 and float(moved[b].abs().sum()) > 0


@pytest.mark.parametrize(
    ("overrides", "key", "says"),
    [
        (["model.quantization=nf5"], "model.quantization", "nf4, fp4, int8"),
        (
            ["model.quantization=nf4", "model.quantization_options.compute_dtyp=bf16"],
            "model.quantization_options.compute_dtyp",
            "unknown option",
        ),
        (
            ["model.quantization=nf4", "model.quantization_options.compute_dtype=fp8"],
            "model.quantization_options.compute_dtype",
            "bf16, fp16, fp32",
        ),
        (
            ["model.quantization=nf4", "model.quantization_options.double_quant=maybe"],
            "model.quantization_options.double_quant",
            "true or false",
        ),
        (
            ["model.quantization=int8", "model.quantization_options.int8_threshold=-1"],
            "model.quantization_options.int8_threshold",
            ">= 0",
        ),
        (["model.quantization_options.double_qant=false"], "model.quantization_options.double_qant", "unknown option"),
        (["model.quantization=nf4", "adapter.method=loha"], "adapter.method", "dense matrices"),
        (["model.quantization=nf4", "train.lockstep=true", "model.dropout=0"], "train.lockstep", "bitsandbytes"),
    ],
)
def test_quantization_config_errors(overrides: list[str], key: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert err.value.key == key and says in str(err.value), str(err.value)


def test_split_mode_refuses_a_quantized_base() -> None:
    from dpeft.split.config import load_split_config

    with pytest.raises(ConfigError) as err:
        load_split_config(None, ["model.quantization=nf4"])
    assert err.value.key == "model.quantization" and "split mode" in str(err.value)


def _dequantized_copy(fp32_model: nn.Module, quantized: nn.Module) -> None:
    """Overwrite the fp32 base's Linear weights with what the quantized base computes with."""
    with torch.no_grad():
        for name in quantized_layers(quantized):
            layer = quantized.get_submodule(name)
            weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            plain = name.removeprefix("base_model.model.").removesuffix(".base_layer")
            fp32_model.get_submodule(plain).weight.copy_(weight.float())


def test_adapter_from_nf4_base_loads_on_fp32_base(nf4_minilm, tmp_path) -> None:
    """The export of a run on a 4-bit base is an ordinary peft adapter for the fp32 base.

    peft loads it with every tensor equal to the trained one, and: (1) on an fp32 base holding the
    de-quantized weights the logits equal the 4-bit model's to 1e-4 (the adapter transfers exactly;
    compute_dtype=fp32 here, so only summation order differs); (2) on the original fp32 base they
    differ by the base's quantization error only: relative error below 0.25.
    """
    import json

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from dpeft.adapters import export_peft_dir
    from dpeft.adapters.model import load_source

    cfg = load_config(None, ["model.layers=2", "model.quantization=nf4", "model.quantization_options.compute_dtype=fp32"])
    bundle = build_model(cfg.model, cfg.adapter, 2, 0)
    with torch.no_grad():  # a trained-looking adapter: every factor away from its init
        for p in adapter_parameters(bundle.model).values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    out = export_peft_dir(bundle.model, extract_state(bundle.model), tmp_path / "adapter")
    written = json.loads((out / "adapter_config.json").read_text())
    assert not any("quant" in k and written[k] for k in written), {k: v for k, v in written.items() if "quant" in k}

    path, _ = load_source(cfg.model)
    x = torch.as_tensor(nf4_minilm[2].input_ids[:4])
    bundle.model.eval()
    with torch.no_grad():
        got_q = bundle.model(input_ids=x).logits
    results = {}
    for dequantized in (True, False):
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, num_hidden_layers=2)
        if dequantized:
            _dequantized_copy(base, bundle.model)
        model = PeftModel.from_pretrained(base, str(out)).eval()
        loaded = {k: p.detach() for k, p in adapter_parameters(model, trainable_only=False).items()}
        trained = extract_state(bundle.model).tensors
        assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)
        with torch.no_grad():
            results[dequantized] = model(input_ids=x).logits
    assert torch.allclose(results[True], got_q, atol=1e-4), (results[True] - got_q).abs().max()
    # nf4 keeps about 4 bits per weight (a relative weight error near 0.1): through 2 layers the
    # logits of the bare bases differ by ~5% and with this adapter by ~13% (measured); 0.25 bounds that
    rel = float((results[False] - got_q).norm() / results[False].norm())
    assert rel < 0.25, rel
