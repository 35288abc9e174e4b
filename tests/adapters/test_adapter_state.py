"""Adapter state: structural selection, round trips, other peft methods, and PEFT export."""

from __future__ import annotations

import re
from collections import OrderedDict

import pytest
import torch

from dpeft.adapters import adapter_parameters, build_model, export_peft_dir, extract_state, load_state, resolve_model_source
from dpeft.config import AdapterConfig, ModelConfig
from dpeft.errors import ProtocolError
from dpeft.state import AdapterState, max_abs_diff

pytestmark = pytest.mark.usefixtures("single_thread")

_LORA_KEY = re.compile(r"^bert\.encoder\.layer\.(\d)\.attention\.self\.(query|value)\.lora_(A|B)\.weight$")


def _perturbed(state: AdapterState, seed: int = 123, scale: float = 0.05) -> AdapterState:
    gen = torch.Generator().manual_seed(seed)
    return state.map(lambda t: t + scale * torch.randn(t.shape, generator=gen, dtype=t.dtype))


def _inputs(bundle, texts=("a gripping, beautifully acted film", "dull and far too long", "meh")) -> dict:
    return bundle.tokenizer(list(texts), padding=True, return_tensors="pt")


def test_lora_state_is_exactly_the_adapter(minilm_model) -> None:
    state = extract_state(minilm_model.model)
    names = list(state.tensors)
    lora = [n for n in names if _LORA_KEY.match(n)]
    found = {(_LORA_KEY.match(n).group(1), _LORA_KEY.match(n).group(2), _LORA_KEY.match(n).group(3)) for n in lora}
    expected = {(str(layer), mod, ab) for layer in range(6) for mod in ("query", "value") for ab in ("A", "B")}
    assert found == expected
    assert len(lora) == 24
    assert sorted(set(names) - set(lora)) == ["classifier.bias", "classifier.weight"]
    for n in names:
        assert "default" not in n.split("."), n
        assert not n.startswith("base_model"), n
        assert "base_layer" not in n and "original_module" not in n, n
    # shapes: A is (r, in), B is (out, r); the head is (labels, hidden)
    assert tuple(state["bert.encoder.layer.0.attention.self.query.lora_A.weight"].shape) == (8, 384)
    assert tuple(state["bert.encoder.layer.5.attention.self.value.lora_B.weight"].shape) == (384, 8)
    assert tuple(state["classifier.weight"].shape) == (2, 384)
    # LoRA init: B is zero, A is not
    assert float(state["bert.encoder.layer.0.attention.self.query.lora_B.weight"].abs().sum()) == 0.0
    assert float(state["bert.encoder.layer.0.attention.self.query.lora_A.weight"].abs().sum()) > 0.0
    # the state is small compared with the model, and only trainable parameters appear
    total = sum(p.numel() for p in minilm_model.model.parameters())
    assert state.numel() < 0.02 * total
    trainable = {id(p) for p in minilm_model.model.parameters() if p.requires_grad}
    assert {id(p) for p in adapter_parameters(minilm_model.model).values()} == trainable


def test_extract_is_a_detached_copy(minilm_model) -> None:
    state = extract_state(minilm_model.model)
    params = adapter_parameters(minilm_model.model)
    name = "classifier.bias"
    with torch.no_grad():
        params[name].add_(1.0)
    assert not torch.equal(state[name], params[name].detach())
    for t in state.tensors.values():
        assert not t.requires_grad and t.device.type == "cpu"


def test_load_state_round_trip_changes_outputs(minilm_model) -> None:
    model = minilm_model.model
    original = extract_state(model)
    batch = _inputs(minilm_model)
    with torch.no_grad():
        before = model(**batch).logits.clone()
    new = _perturbed(original)
    load_state(model, new)
    assert max_abs_diff(extract_state(model), new) == 0.0
    with torch.no_grad():
        after = model(**batch).logits
    assert (after - before).abs().max() > 1e-3, "perturbing the adapter must change the logits"
    load_state(model, original)
    with torch.no_grad():
        restored = model(**batch).logits
    torch.testing.assert_close(restored, before, rtol=0, atol=1e-6)


def test_load_state_rejects_unknown_names(minilm_model) -> None:
    state = extract_state(minilm_model.model)
    tensors = OrderedDict(state.tensors)
    tensors["bert.encoder.layer.0.attention.self.key.lora_A.weight"] = torch.zeros(8, 384)
    with pytest.raises(ProtocolError) as info:
        load_state(minilm_model.model, AdapterState(tensors))
    assert "key.lora_A" in str(info.value)


def test_load_state_rejects_missing_names(minilm_model) -> None:
    state = extract_state(minilm_model.model)
    tensors = OrderedDict(state.tensors)
    del tensors["classifier.weight"]
    with pytest.raises(ProtocolError) as info:
        load_state(minilm_model.model, AdapterState(tensors))
    assert "classifier.weight" in str(info.value)


def test_load_state_rejects_wrong_shape(minilm_model) -> None:
    state = extract_state(minilm_model.model)
    tensors = OrderedDict(state.tensors)
    tensors["classifier.bias"] = torch.zeros(3)
    with pytest.raises(ProtocolError):
        load_state(minilm_model.model, AdapterState(tensors))


def test_load_state_rejects_adapter_named_keys(minilm_model) -> None:
    """peft's own state-dict naming (with '.default.') is not dpeft's wire naming."""
    state = extract_state(minilm_model.model)
    renamed = OrderedDict((k.replace("lora_A.weight", "lora_A.default.weight"), v) for k, v in state.items())
    with pytest.raises(ProtocolError):
        load_state(minilm_model.model, AdapterState(renamed))


def test_same_seed_same_initial_adapter(minilm_initial_state) -> None:
    again = build_model(ModelConfig(), AdapterConfig(), 2, 0)
    assert max_abs_diff(extract_state(again.model), minilm_initial_state) == 0.0
    other = build_model(ModelConfig(), AdapterConfig(), 2, 1)
    assert max_abs_diff(extract_state(other.model), minilm_initial_state) > 0.0


@pytest.mark.parametrize(
    "method, expect",
    [
        ("lora", r"\.lora_A\.weight$"),
        ("dora", r"\.lora_magnitude_vector\b"),
        ("ia3", r"\.ia3_l$"),
        ("prompt_tuning", r"^prompt_encoder\."),
    ],
)
def test_methods_have_trainable_state(method: str, expect: str) -> None:
    bundle = build_model(ModelConfig(max_length=16), AdapterConfig(method=method, r=4, num_virtual_tokens=4), 2, 0)
    state = extract_state(bundle.model)
    assert len(state) > 0 and state.numel() > 0
    assert any(re.search(expect, n) for n in state.tensors), list(state.tensors)[:6]
    assert "classifier.weight" in state.tensors
    for n in state.tensors:
        assert "default" not in n.split("."), n
    # every trainable parameter is in the state and the round trip works
    trainable = sum(p.numel() for p in bundle.model.parameters() if p.requires_grad)
    assert state.numel() == trainable
    load_state(bundle.model, _perturbed(state, scale=0.01))
    assert max_abs_diff(extract_state(bundle.model), state) > 0
    # the model still runs
    with torch.no_grad():
        out = bundle.model(**_inputs(bundle)).logits
    assert out.shape == (3, 2) and torch.isfinite(out).all()


def test_export_loads_in_plain_peft(minilm_model, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model = minilm_model.model
    state = _perturbed(extract_state(model), seed=7, scale=0.05)
    out_dir = export_peft_dir(model, state, tmp_path / "adapter")
    assert (out_dir / "adapter_config.json").is_file()
    assert (out_dir / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter.tmp").exists()

    batch = _inputs(minilm_model)
    model.eval()
    with torch.no_grad():
        ours = model(**batch).logits.clone()

    path, _gguf, _id = resolve_model_source(ModelConfig())
    torch.manual_seed(999)  # a different head init: the export must carry the trained head
    fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    loaded = PeftModel.from_pretrained(fresh, str(out_dir))
    loaded.eval()
    with torch.no_grad():
        theirs = loaded(**batch).logits
    assert (ours.abs() > 0).any()
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    # and exporting again over an existing directory replaces it atomically
    state2 = _perturbed(state, seed=8)
    export_peft_dir(model, state2, out_dir)
    fresh2 = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    loaded2 = PeftModel.from_pretrained(fresh2, str(out_dir)).eval()
    with torch.no_grad():
        ours2 = model(**batch).logits
        theirs2 = loaded2(**batch).logits
    torch.testing.assert_close(theirs2, ours2, rtol=0, atol=1e-5)
    assert (theirs2 - theirs).abs().max() > 1e-4
