"""Federated evaluation end to end: `dpeft simulate eval.federated=true` (a real coordinator and
worker process) and the all-reduce rounds record the clients' evaluation of the global adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
from integration_testlib import assert_no_traceback, overrides, read_metrics

pytestmark = pytest.mark.integration

RUN = dict(
    rounds=2,
    clients=3,
    clients_per_round=2,
    train__local_steps=2,
    train__batch_size=8,
    data__max_train_examples=90,
    data__test_examples=16,
    model__max_length=32,
    simulate__processes=1,
)
FED = ["eval.federated=true", "eval.client_test_fraction=0.2"]


def _cfg(run: Path, *more: str):
    from dpeft.validate import load_config

    return load_config(None, [*overrides(run, **RUN), *more])


def test_simulate_records_federated_evaluation(tmp_path: Path, procs) -> None:
    from dpeft.data import load_dataset, partition
    from dpeft.rounds.checkpoint import latest_checkpoint
    from dpeft.rounds.fedeval import EVALUATE, client_split, sample_eval_clients
    from dpeft.rounds.sampling import sample_clients
    from dpeft.transport.base import TrainTask
    from dpeft_workers.runtime import WorkerRuntime

    run = tmp_path / "run"
    rc, p = procs.run("simulate", *overrides(run, **RUN), *FED, timeout=240)
    assert rc == 0, p.stderr
    assert_no_traceback(p.stderr)
    assert "fed acc" in p.stderr  # progress lines and the summary table show the clients' accuracy
    rows = read_metrics(run)
    assert [r["round"] for r in rows] == [0, 1, 2]
    cfg = _cfg(run, *FED)
    train, _ = load_dataset(cfg.data, cfg.seed, need_labels=True)
    parts = partition(
        train.labels, cfg.clients, cfg.data.partition, cfg.seed, cfg.data.dirichlet_alpha, cfg.data.min_examples_per_client
    )
    splits = [client_split(parts[c], 0.2, cfg.seed, c) for c in range(cfg.clients)]
    for r in rows[1:]:
        # training: the same clients as without federated evaluation, on their training split only
        assert r["sampled"] == sample_clients(cfg.seed, r["round"], [0, 1, 2], 2)
        assert r["num_examples"] == sum(len(splits[c][0]) for c in r["sampled"])
        # evaluation: an independent seeded sample, each client on its held-out split
        assert r["fed_eval_sampled"] == sample_eval_clients(cfg.seed, r["round"], [0, 1, 2], 2)
        per = r["fed_eval_clients"]
        assert sorted(int(c) for c in per) == r["fed_eval_sampled"] and r["fed_eval_failed"] == 0
        assert all(m["examples"] == len(splits[int(c)][1]) for c, m in per.items())
        n = sum(m["examples"] for m in per.values())
        assert r["fed_eval_examples"] == n
        assert r["fed_eval_loss"] == pytest.approx(sum(m["loss"] * m["examples"] for m in per.values()) / n, rel=1e-9)
        assert r["fed_eval_accuracy"] == pytest.approx(sum(m["accuracy"] * m["examples"] for m in per.values()) / n, rel=1e-9)
        assert r["fed_eval_bytes_down"] > 0 and 0 < r["fed_eval_bytes_up"] < 1000  # the global down, no tensors up
        assert "eval_accuracy" in r  # the coordinator's own evaluation is still there
    # the last round's client metrics are those of the final global on each held-out split
    found = latest_checkpoint(run / "checkpoints")
    assert found is not None and found[0] == 2
    from dpeft.codec import encode_state

    rt = WorkerRuntime(cfg)
    payload = encode_state(found[1])
    last = rows[-1]["fed_eval_clients"]
    for c, m in last.items():
        ((_, n, got),) = rt.evaluate_tasks(
            [(TrainTask(f"check-{c}", 2, int(c), "b", len(payload), b"", {}, kind=EVALUATE), payload)]
        )
        assert (
            n == m["examples"]
            and got["eval_loss"] == pytest.approx(m["loss"], abs=1e-5)
            and got["eval_accuracy"] == m["accuracy"]
        )


def test_allreduce_ranks_evaluate_their_share(tmp_path: Path, procs) -> None:
    run = tmp_path / "ar"
    rc, p = procs.run(
        "simulate", *overrides(run, **{**RUN, "simulate__processes": 2, "rounds": 1}), *FED, "aggregation=allreduce", timeout=240
    )
    assert rc == 0, p.stderr
    row = read_metrics(run)[-1]
    assert row["transport"] == "allreduce" and row["world_size"] == 2
    per = row["fed_eval_clients"]
    assert len(per) == 2 and row["fed_eval_failed"] == 0  # one client on each rank, summed by the all-reduce
    n = sum(m["examples"] for m in per.values())
    assert row["fed_eval_examples"] == n
    assert row["fed_eval_loss"] == pytest.approx(sum(m["loss"] * m["examples"] for m in per.values()) / n, rel=1e-9)


def test_edge_workers_evaluate_on_their_own_data(tmp_path: Path, procs) -> None:
    """`dpeft coordinator` (deadline policy) + two `dpeft worker --data`: each evaluates on a held-out part of its own file."""
    import csv

    from dpeft.data.datasets import rotten_tomatoes
    from dpeft.rounds.fedeval import held_out_count

    ds = rotten_tomatoes()
    sizes = (20, 30)
    files = []
    for i, n in enumerate(sizes):
        files.append(tmp_path / f"client{i}.csv")
        with open(files[-1], "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["text", "label"])
            start = sum(sizes[:i])
            w.writerows(
                (t, ds.label_names[y]) for t, y in zip(ds.texts[start : start + n], ds.labels[start : start + n], strict=True)
            )
    run = tmp_path / "run"
    changes = {**RUN, "clients": 2, "rounds": 1, "sync__name": "deadline", "sync__over_selection": 1.0}
    args = [a for a in overrides(run, **changes) if not a.startswith("simulate.")]
    coord = procs.start("coordinator", "--listen", "127.0.0.1:0", *args, *FED)
    address = coord.wait_for_line(r"listening on (127\.0\.0\.1:\d+)", timeout=120).group(1)
    workers = [
        procs.start(
            "worker", "--coordinator", address, "--data", str(f), "--worker-id", f"edge{i}", "--threads", "1", "--patience", "60"
        )
        for i, f in enumerate(files)
    ]
    assert coord.wait(240) == 0, coord.stderr
    for w in workers:
        assert w.wait(30) == 0, w.stderr
    row = read_metrics(run)[-1]
    assert row["sync"] == "deadline" and row["num_examples"] == sum(n - held_out_count(n, 0.2) for n in sizes)
    assert row["fed_eval_failed"] == 0 and row["fed_eval_examples"] == sum(held_out_count(n, 0.2) for n in sizes)
    assert sorted(m["examples"] for m in row["fed_eval_clients"].values()) == [held_out_count(n, 0.2) for n in sizes]
