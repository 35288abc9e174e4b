"""A classification adapter's export carries its class names: labels.json, read the way a user would."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForSequenceClassification

from dpeft.adapters import export_peft_dir, extract_state, resolve_model_source
from dpeft.config import ModelConfig


def test_labels_json_names_the_classes_and_loads_with_the_adapter(minilm_model, tmp_path: Path) -> None:
    model = minilm_model.model
    before = (dict(model.config.id2label), dict(model.config.label2id))
    try:
        out = export_peft_dir(model, extract_state(model), tmp_path / "adapter", label_names=["rotten", "fresh"])
        labels = json.loads((out / "labels.json").read_text())
        assert labels == {"id2label": {"0": "rotten", "1": "fresh"}, "label2id": {"rotten": 0, "fresh": 1}}
        assert PeftConfig.from_pretrained(str(out)).peft_type == "LORA"  # the adapter directory is still standard

        path, _gguf, _id = resolve_model_source(ModelConfig())
        id2label = {int(i): n for i, n in labels["id2label"].items()}
        base = AutoModelForSequenceClassification.from_pretrained(path, id2label=id2label, label2id=labels["label2id"])
        loaded = PeftModel.from_pretrained(base, str(out)).eval()
        batch = minilm_model.tokenizer(["a fine film"], return_tensors="pt")
        with torch.no_grad():
            predicted = loaded(**batch).logits.argmax(-1).item()
        assert loaded.config.id2label[predicted] in ("rotten", "fresh")
        assert model.config.id2label == {0: "rotten", 1: "fresh"}  # a merged model saved from here keeps them
    finally:
        model.config.id2label, model.config.label2id = before
    assert not (export_peft_dir(model, extract_state(model), tmp_path / "plain") / "labels.json").exists()
