"""Overlapped evaluation (``eval.overlap``): round r's global is evaluated while round r+1 trains,
the metrics lines stay complete and in order, and a run interrupted mid-evaluation resumes to the
adapter of an uninterrupted run."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from enginelib import Reply, make_engine

from dpeft.rounds.checkpoint import latest_checkpoint
from dpeft.state import AdapterState

BASE = ["rounds=3", "clients=2", "clients_per_round=2", "eval.overlap=true"]


def _round_of(state: AdapterState) -> int:
    return int(state.meta.get("round", 0))


def _lines(engine) -> list[dict]:
    return [json.loads(line) for line in (engine.run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("overlap", [True, False])
def test_evaluation_runs_while_the_next_round_trains(tmp_path, overlap: bool) -> None:
    trained: dict[int, threading.Event] = {r: threading.Event() for r in range(1, 5)}

    def behaviour(task, state):
        trained[task.round].set()  # round task.round's tasks were handed out
        return Reply(delay_s=0.05)

    engine, tr = make_engine(tmp_path, [*BASE[:-1], f"eval.overlap={str(overlap).lower()}"], behaviour)
    evaluate, overlapped = engine.evaluate, {}

    def watching(state: AdapterState) -> dict[str, float]:
        r = _round_of(state)
        if r < 3:  # does round r + 1 start training before round r's evaluation ends?
            overlapped[r] = trained[r + 1].wait(5.0 if overlap else 0.5)
        return evaluate(state)

    engine.evaluate = watching
    rows = engine.run(tr)
    assert overlapped == {0: overlap, 1: overlap, 2: overlap}
    for got in (rows, _lines(engine)):
        assert [r["round"] for r in got] == [0, 1, 2, 3]
        assert all(r["eval_accuracy"] is not None and "wall_s" in r for r in got)
        assert all("eval_s" in r for r in got[1:])
    # each row holds the evaluation of its own round's global (+1 per client and round on the head)
    heads = [float(s["classifier.weight"].sum()) for s in engine.gm.evaluated]
    assert heads == sorted(heads) and len(set(heads)) == 4
    _, final, _, _ = latest_checkpoint(engine.run_dir / "checkpoints")
    assert all(torch.equal(final[k], engine.global_state[k]) for k in final.tensors)


def test_a_run_that_dies_during_an_overlapped_evaluation_resumes_to_the_same_adapter(tmp_path) -> None:
    reference, tr = make_engine(tmp_path / "ref", BASE, lambda t, s: Reply())
    reference.run(tr)

    crashing, tr = make_engine(tmp_path / "run", BASE, lambda t, s: Reply(delay_s=0.05))
    evaluate = crashing.evaluate

    def dies_at_round_2(state: AdapterState) -> dict[str, float]:
        if _round_of(state) == 2:
            raise RuntimeError("killed during the evaluation of round 2")
        return evaluate(state)

    crashing.evaluate = dies_at_round_2
    with pytest.raises(RuntimeError, match="round 2"):
        crashing.run(tr)
    # round 2 was never closed: no line, no checkpoint; nothing after it was recorded either
    assert [r["round"] for r in _lines(crashing)] == [0, 1]
    assert latest_checkpoint(crashing.run_dir / "checkpoints")[0] == 1

    resumed, tr = make_engine(tmp_path / "run", BASE, lambda t, s: Reply(), resume=True)
    assert resumed.resumed_from == 1
    rows = resumed.run(tr)
    assert [r["round"] for r in rows] == [0, 1, 2, 3] == [r["round"] for r in _lines(resumed)]
    assert all(torch.equal(resumed.global_state[k], reference.global_state[k]) for k in reference.global_state.tensors)


def test_a_run_stopped_during_an_overlapped_evaluation_waits_for_it(tmp_path) -> None:
    engine, tr = make_engine(tmp_path, BASE, lambda t, s: Reply(delay_s=0.2))
    evaluate = engine.evaluate

    def stop_at_round_1(state: AdapterState) -> dict[str, float]:
        if _round_of(state) == 1:
            engine.stop_event.set()  # Ctrl-C while round 1 is evaluated and round 2 trains
        return evaluate(state)

    engine.evaluate = stop_at_round_1
    engine.run(tr)
    assert [r["round"] for r in _lines(engine)] == [0, 1]  # round 1's evaluation finished and was recorded
    assert _lines(engine)[1]["eval_accuracy"] is not None
    assert latest_checkpoint(engine.run_dir / "checkpoints")[0] == 1

    resumed, tr = make_engine(tmp_path, BASE, lambda t, s: Reply(), resume=True)
    assert [r["round"] for r in resumed.run(tr)] == [0, 1, 2, 3]
