"""Any local causal LM: ``model.path`` with a Llama, Qwen2 or Mistral directory trains with a 4-bit
base, bf16 autocast, gradient checkpointing and instruction data, and exports an adapter that
peft loads on the unquantized base.

The models are tiny random ones of each architecture (2 layers, hidden size 32, SmolLM2's
tokenizer), written to a temporary directory: the code path is the one a 7B checkpoint takes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from integration_testlib import assert_no_traceback, read_metrics
from tiny_archs import save_tiny_causal_lm

from dpeft.adapters import adapter_parameters, build_model, export_peft_dir, extract_state
from dpeft.adapters.quantize import is_quantized
from dpeft.data import load_run_data, tokenize_dataset
from dpeft.train.loop import local_train
from dpeft.train.precision import prepare_for_training
from dpeft.validate import load_config

pytestmark = pytest.mark.integration


def _instruction_file(path: Path, n: int = 24) -> Path:
    rows = [{"prompt": f"Is {i} even or odd?", "response": "even" if i % 2 == 0 else "odd"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _overrides(model_dir: Path, data: Path) -> list[str]:
    return [
        f"model.path={model_dir}",
        "model.task=causal_lm",
        "model.max_length=32",
        "model.quantization=nf4",
        "train.precision=bf16",
        "train.gradient_checkpointing=true",
        "data.dataset=file",
        f"data.path={data}",
        "data.format=instruction",
        "data.test_examples=4",
        "clients=2",
        "clients_per_round=2",
        "train.local_steps=3",
        "train.batch_size=4",
        "train.lr=0.01",
    ]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_local_architecture_trains_on_a_4bit_base_and_exports(tmp_path: Path, arch: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_causal_lm(arch, tmp_path / arch)
    cfg = load_config(None, _overrides(model_dir, _instruction_file(tmp_path / "train.jsonl")))
    data = load_run_data(cfg)
    assert data.train.responses is not None
    bundle = build_model(cfg.model, cfg.adapter, None, cfg.seed)
    assert is_quantized(bundle.model)
    prepare_for_training(bundle.model, torch.device("cpu"), cfg.train)
    before = extract_state(bundle.model)
    params = list(adapter_parameters(bundle.model).values())
    assert params and all(p.dtype == torch.float32 for p in params)
    tokens = tokenize_dataset(bundle.tokenizer, data.train, cfg)
    result = local_train(bundle.model, params, tokens, data.partitions[0], cfg.train, "causal_lm", seed=1, round_num=1)
    assert math.isfinite(result.train_loss) and result.steps == 3
    after = extract_state(bundle.model)
    assert any(not torch.equal(before[k], after[k]) for k in after.tensors)
    out = export_peft_dir(bundle.model, after, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(model_dir)  # the unquantized base
    loaded = PeftModel.from_pretrained(base, str(out))
    loaded_state = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert len(loaded_state) == len(after.tensors)
    for value in loaded_state.values():
        assert torch.isfinite(value).all()


def test_simulate_on_a_local_mistral_directory(tmp_path: Path, procs) -> None:
    model_dir = save_tiny_causal_lm("mistral", tmp_path / "mistral")
    run = tmp_path / "run"
    args = [
        *_overrides(model_dir, _instruction_file(tmp_path / "train.jsonl")),
        "rounds=1",
        "train.eval_batch_size=4",
        "eval.max_new_tokens=3",
        "simulate.processes=1",
        f"run_dir={run}",
    ]
    rc, p = procs.run("simulate", *args, timeout=240, cwd=tmp_path)
    assert rc == 0, f"exit {rc}:\n{p.stderr}"
    assert_no_traceback(p.stderr)
    rows = read_metrics(run)
    assert [r["round"] for r in rows] == [0, 1]
    for row in rows:
        assert math.isfinite(row["eval_perplexity"]) and row["gen_examples"] == 4
        assert 0.0 <= row["gen_accuracy"] <= 1.0
    generations = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    assert {g["round"] for g in generations} == {0, 1}
    assert all(g["reference"] in ("even", "odd") for g in generations)
    assert (run / "adapter" / "adapter_config.json").is_file()
