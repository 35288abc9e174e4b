"""Evaluating a language model at the coordinator: perplexity, generation accuracy against reference
answers, sample generations in generations.jsonl (kept right across a resume), the eval device.

One SmolLM2 with its first 2 layers (loaded once), 16-token prompts built from rotten tomatoes
reviews, 3 generated prompts of 3 new tokens: small on purpose.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from enginelib import FakeTransport, Reply, default_update

from dpeft.data import TextDataset
from dpeft.errors import ConfigError
from dpeft.rounds.generations import GENERATIONS_KEY
from dpeft.rounds.global_model import GlobalModel
from dpeft.train.generate import generate_answers, is_correct, normalise
from dpeft.validate import load_config
from dpeft_coordinator.engine import RoundEngine

pytestmark = pytest.mark.usefixtures("single_thread")

LM = [
    "model.name=smollm2",
    "model.task=causal_lm",
    "model.layers=2",
    "model.max_length=24",
    "clients=2",
    "clients_per_round=2",
    "train.eval_batch_size=4",
    "eval.device=cpu",
    "eval.generate_examples=3",
    "eval.max_new_tokens=3",
    "eval.samples=2",
]


def instructions(data: TextDataset, n: int) -> TextDataset:
    """``n`` review prompts whose reference answer is the review's label (fresh or rotten)."""
    texts = [f"Review: {' '.join(t.split()[:6])}\nFresh or rotten? Answer:" for t in data.texts[:n]]
    out = TextDataset(texts, data.labels[:n], data.label_names)
    out.responses = [f" {data.label_names[y]}" for y in data.labels[:n]]  # type: ignore[attr-defined]
    return out


@pytest.fixture(scope="module")
def lm(tmp_path_factory, rotten_tomatoes_small):
    train, test = rotten_tomatoes_small
    cfg = load_config(None, [f"run_dir={tmp_path_factory.mktemp('lm') / 'run'}", *LM])
    return cfg, GlobalModel(cfg, datasets=(instructions(train, 64), instructions(test, 4)))


def test_batched_generation_equals_one_prompt_at_a_time(lm) -> None:
    _, gm = lm
    prompts = [
        "The capital of France is",
        "1, 2, 3, 4,",
        "Once upon a time there was a little dog named",
        "red green blue red green",
    ]
    model, tok = gm.bundle.model, gm.bundle.tokenizer
    side = tok.padding_side
    batched = generate_answers(model, tok, prompts, 4, 4)
    single = [generate_answers(model, tok, [p], 4, 1)[0] for p in prompts]
    assert batched == single
    assert len(set(batched)) > 1  # the prompts lead to different answers: a padding mistake would show
    assert tok.padding_side == side  # the shared tokenizer is left as it was


def test_round0_reports_perplexity_and_generation_accuracy(lm) -> None:
    _, gm = lm
    assert gm.generates and len(gm.prompts) == 3 and gm.references[0] in (" fresh", " rotten")
    state = gm.initial_state()
    out = gm.evaluate(state)
    assert out["eval_perplexity"] == pytest.approx(math.exp(out["eval_loss"]))
    assert out["gen_examples"] == 3
    samples = out[GENERATIONS_KEY]
    assert [s["prompt"] for s in samples] == gm.prompts[:2]
    assert all(s["correct"] == is_correct(s["answer"], s["reference"]) for s in samples)

    # references the model is known to produce (its own greedy answers) score as correct
    answers = generate_answers(gm.bundle.model, gm.bundle.tokenizer, gm.prompts, 3, 1, 24)
    assert [s["answer"] for s in samples] == answers[:2]
    saved = gm.references
    try:
        gm.references = [a if normalise(a) else "zzz" for a in answers[:2]] + ["zzz"]
        expected = sum(1 for a in answers[:2] if normalise(a)) / 3
        assert gm.evaluate(state)["gen_accuracy"] == pytest.approx(expected)
    finally:
        gm.references = saved


def test_generations_jsonl_is_written_and_not_duplicated_on_resume(lm, capsys) -> None:
    cfg, gm = lm
    run_dir = Path(cfg.run_dir)
    small = lambda t, s: Reply(make=lambda task, received: default_update(task, received, 0.001))  # noqa: E731

    def run(rounds: int, resume: bool) -> tuple[RoundEngine, list[dict]]:
        c = load_config(None, [f"run_dir={run_dir}", *LM, f"rounds={rounds}", "train.eval_every=2"])
        engine = RoundEngine(c, gm, run_dir, resume=resume)
        return engine, engine.run(FakeTransport(small, engine, c.clients))

    _, rows = run(3, resume=False)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [r.get("gen_examples") for r in rows] == [3, None, 3, 3]  # evaluated rounds only (eval_every=2, the last)
    assert all(GENERATIONS_KEY not in r for r in rows)
    path = run_dir / "generations.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [g["round"] for g in lines] == [0, 0, 2, 2, 3, 3]
    assert set(lines[0]) == {"round", "prompt", "reference", "answer", "correct"}
    on_disk = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(GENERATIONS_KEY not in r for r in on_disk) and on_disk[0]["gen_accuracy"] == rows[0]["gen_accuracy"]

    # the process died after round 3's checkpoint, before its lines: the resume writes round 3 once
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in on_disk[:3]))
    engine, rows = run(4, resume=True)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    rounds = [json.loads(line)["round"] for line in path.read_text().splitlines()]
    assert rounds == [0, 0, 2, 2, 3, 3, 4, 4]

    # the summary and the plot show the generation accuracy
    capsys.readouterr()
    engine.metrics.print_summary(rows, t_start=0.0)
    err = capsys.readouterr().err
    assert "gen acc" in err and "eval ppl" in err and f"generation accuracy {rows[0]['gen_accuracy']:.4f} (round 0)" in err
    assert (run_dir / "accuracy.png").stat().st_size > 0


def test_eval_device_without_a_gpu_is_a_config_error(tmp_path) -> None:
    if torch.cuda.device_count():
        pytest.skip("a CUDA GPU is visible")
    cfg = load_config(None, [f"run_dir={tmp_path}", "eval.device=cuda"])
    with pytest.raises(ConfigError, match=r"eval\.device"):
        GlobalModel(cfg)


def test_generate_true_without_references_is_a_config_error(tmp_path, rotten_tomatoes_small) -> None:
    train, test = rotten_tomatoes_small
    cfg = load_config(None, [f"run_dir={tmp_path}", "eval.generate=true"])
    with pytest.raises(ConfigError, match=r"eval\.generate.*causal"):
        GlobalModel(cfg, datasets=(train, test))
