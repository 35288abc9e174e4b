"""Split checkpoints: the edge's private training state round-trips; the cloud's federation resumes."""

from __future__ import annotations

import json

import pytest
import torch

from dpeft.adapters import extract_state
from dpeft.config import RunConfig, StrategyConfig, TrainConfig
from dpeft.errors import DpeftError, ProtocolError
from dpeft.rounds.checkpoint import save_checkpoint
from dpeft.split.checkpoint import clear_edge_state, restore_edge_state, save_edge_state
from dpeft.split.config import KillReviveConfig, SplitConfig
from dpeft.split.edge import EdgeModel
from dpeft.split.federation import Federation
from dpeft.split.spec import slice_layers

KR = KillReviveConfig(enabled=True, budget=0.5, window=1, warmup=1, revive_every=0)


@pytest.fixture(scope="module")
def sliced(minilm_bundle):
    import copy

    bundle = copy.deepcopy(minilm_bundle)  # the session's MiniLM, untouched
    slice_layers(bundle.model, 1)
    return bundle


def _edge(sliced):
    import copy

    return EdgeModel(copy.deepcopy(sliced.model), TrainConfig(optimizer="adamw", lr=1e-2), KR)


def _fake_step(edge, seed):
    """One optimizer step with seeded gradients on the active factors, then Kill-and-Revive."""
    g = torch.Generator().manual_seed(seed)
    edge.optimizer.zero_grad(set_to_none=True)
    for p in edge.params.values():
        p.grad = torch.randn(p.shape, generator=g)
    edge.optimizer.step()
    edge.step_count += 1
    edge.kr.after_step(edge.step_count)


def test_edge_state_round_trips_optimizer_kr_steps_and_rng(sliced, tmp_path):
    a = _edge(sliced)
    for s in range(3):
        _fake_step(a, s)
    assert len(a.kr.active) == 1 and a.kr.last_scores  # window 1, budget 0.5 of 2 modules: one killed
    torch.manual_seed(1234)
    save_edge_state(tmp_path, 3, a)
    rng_then = torch.get_rng_state()
    torch.rand(5)  # move the RNG on: the restore must bring it back

    b = _edge(sliced)
    b.load(a.state())  # the factors come from the global, as on resume
    assert restore_edge_state(tmp_path, 3, b) == 3
    assert torch.equal(torch.get_rng_state(), rng_then)
    assert b.step_count == 3 and b.kr.active == a.kr.active and b.kr.last_scores == a.kr.last_scores
    assert b.kr._snap.keys() == a.kr._snap.keys() and all(torch.equal(b.kr._snap[i], a.kr._snap[i]) for i in a.kr._snap)
    # the same next steps give the same factors (AdamW moments and step counts restored)
    for s in (7, 8):
        _fake_step(a, s)
        _fake_step(b, s)
    sa, sb = a.state(), b.state()
    assert all(torch.equal(sa[k], sb[k]) for k in sa.tensors)
    assert a.kr.active == b.kr.active
    # and a fresh optimizer would not: the test can tell
    c = _edge(sliced)
    c.load(b.state())
    _fake_step(c, 9)
    _fake_step(b, 9)
    assert any(not torch.equal(c.state()[k], b.state()[k]) for k in sa.tensors)


def test_restore_takes_the_newest_state_not_after_the_round_and_skips_a_truncated_one(sliced, tmp_path):
    edge = _edge(sliced)
    for r in (1, 2, 3):
        _fake_step(edge, r)
        save_edge_state(tmp_path, r, edge)
    assert restore_edge_state(tmp_path, 2, _edge(sliced)) == 2  # round 3 was saved after the cloud's last checkpoint
    path = tmp_path / "round-000002.safetensors"
    path.write_bytes(path.read_bytes()[:200])  # a write cut short (not via atomic_write)
    fresh = _edge(sliced)
    assert restore_edge_state(tmp_path, 2, fresh) == 1 and fresh.step_count == 1
    assert restore_edge_state(tmp_path, 0, _edge(sliced)) is None
    clear_edge_state(tmp_path)
    assert not list(tmp_path.glob("round-*"))


def _fed(sliced, run_dir, eval_examples=0, resume=True, **run_kw):
    run = RunConfig(rounds=3, strategy=StrategyConfig(name="fedadam"), **run_kw)
    return Federation(run, SplitConfig(edges=2, eval_examples=eval_examples), extract_state(sliced.model), run_dir, resume=resume)


def test_federation_resumes_round_strategy_registry_and_a_lost_metrics_line(sliced, tmp_path):
    fresh = _fed(sliced, tmp_path)
    assert fresh.resumed_from is None and [r["round"] for r in fresh.rows] == [0]
    glob = extract_state(sliced.model)
    glob = type(glob)({k: v + 0.5 for k, v in glob.items()}, {"round": 2})
    strat = fresh.strategy.state_dict()
    row = {
        "round": 2,
        "clients": 2,
        "sampled": [0, 1],
        "num_examples": 8,
        "train_loss": 0.5,
        "bytes_up": 1,
        "bytes_down": 1,
        "rejected": 0,
    }
    save_checkpoint(tmp_path / "checkpoints", 2, glob, strat, {"seed": 0, "edges": {"phone-b": 1, "phone-a": 0}, "row": row})
    # metrics.jsonl lost round 2's line (killed between the checkpoint and the evaluation) and
    # holds a line of round 3 from a later attempt that never checkpointed
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"round": 1, "clients": 2}) + "\n" + json.dumps({"round": 3, "clients": 2}) + "\n")
    fed = _fed(sliced, tmp_path, eval_examples=4)
    assert fed.resumed_from == 2 and fed.round == 2
    assert all(torch.equal(fed.global_state[k], glob[k]) for k in glob.tensors)
    assert fed.register("phone-b") == 1 and fed.register("phone-a") == 0
    state, nxt, trains, evaluate_first = fed.welcome(0)
    assert nxt == 3 and trains and evaluate_first  # the evaluating edge re-evaluates round 2's global
    fed.report_eval(2, 0.4, 0.75)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[2]["eval_accuracy"] == 0.75 and rows[2]["sampled"] == [0, 1]
    # a new edge id takes a slot only when that slot's edge is not connected now
    with pytest.raises(ProtocolError, match="slots"):
        fed.register("phone-c")
    fed.unregister(1)
    assert fed.register("phone-c") == 1
    # a checkpoint of another adapter is refused, naming the way out
    other = extract_state(sliced.model)
    other = type(other)({k: (v[:4] if "lora_A" in k else v) for k, v in other.items()})  # rank 4, not 8
    with pytest.raises(DpeftError, match="different adapter"):
        Federation(RunConfig(rounds=3), SplitConfig(edges=2), other, tmp_path)
    # --fresh: old checkpoints go, metrics start over
    again = _fed(sliced, tmp_path, resume=False)
    assert again.resumed_from is None and not list((tmp_path / "checkpoints").glob("round-*"))
    assert [r["round"] for r in again.rows] == [0]
