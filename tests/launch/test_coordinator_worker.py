"""`dpeft coordinator` and `dpeft worker` as separate processes (the edge deployment)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from integration_testlib import METRIC_KEYS, SHORT, assert_no_traceback, free_port, overrides, read_metrics

pytestmark = pytest.mark.integration


def _finish(coord, workers, timeout: float = 240) -> None:
    rc = coord.wait(timeout)
    assert rc == 0, f"coordinator exit {rc}:\n{coord.stderr}"
    assert_no_traceback(coord.stderr)
    for i, w in enumerate(workers):
        wrc = w.wait(30)  # the coordinator told them to stop: they leave promptly
        assert wrc == 0, f"worker {i} exit {wrc}:\n{w.stderr}"
        assert_no_traceback(w.stderr)


def _coordinator_args(run: Path, listen: str, **changes) -> list[str]:
    args = [a for a in overrides(run, **{**SHORT, **changes}) if not a.startswith("simulate.")]
    return ["coordinator", "--listen", listen, *args]


def test_coordinator_and_two_workers(tmp_path: Path, procs) -> None:
    run = tmp_path / "run"
    port = free_port()
    address = f"127.0.0.1:{port}"
    # both workers in before round 1: a worker without data trains any client, so the first to join
    # could otherwise finish the run before the second connects (which then finds no coordinator)
    coord = procs.start(*_coordinator_args(run, address, train__local_steps=4, sync__min_workers=2))
    workers = [
        procs.start("worker", "--coordinator", address, "--worker-id", f"w{i}", "--threads", "1", "--patience", "60")
        for i in range(2)
    ]
    _finish(coord, workers)
    assert coord.children_seen() == [], "a plain coordinator must not start worker processes"
    rows = read_metrics(run)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert all(k in r for k in METRIC_KEYS), r
        assert r["clients"] == 2 and r["num_examples"] == 200 and r["rejected"] == 0
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert "eval acc" in coord.stderr


def _write_csv(path: Path, pairs: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(pairs)


def test_workers_with_their_own_data(tmp_path: Path, procs) -> None:
    """clients == clients_per_round == 2, each client a worker's private CSV.

    First a worker brings a file with a label the run does not know: it must exit 2 with one
    line naming the file and label, no traceback, and give its client slot back. Then two
    workers with new ids and good files fill both slots and the run completes with both
    clients' examples (before the fix the failed worker held a slot forever: "all 2 client
    slots are taken").
    """
    from dpeft.data.datasets import rotten_tomatoes

    ds = rotten_tomatoes()
    pairs = [(t, ds.label_names[y]) for t, y in zip(ds.texts[:2000], ds.labels[:2000], strict=True)]
    # quotes, commas and newlines inside fields survive the CSV round trip
    pairs[0] = ('a "quoted", multi-line\nreview, honestly', "fresh")
    sizes = (23, 41)
    files = []
    start = 0
    for i, n in enumerate(sizes):
        part = pairs[start : start + n]
        start += n
        assert {lab for _, lab in part} == {"fresh", "rotten"}
        files.append(tmp_path / f"client{i}.csv")
        _write_csv(files[-1], part)
    bad = tmp_path / "bad.csv"
    _write_csv(bad, [("great film", "fresh"), ("awful film", "meh")])

    run = tmp_path / "run"
    coord = procs.start(*_coordinator_args(run, "127.0.0.1:0", clients=2, clients_per_round=2, train__local_steps=3))
    address = coord.wait_for_line(r"listening on (127\.0\.0\.1:\d+)", timeout=120).group(1)
    assert not address.endswith(":0")

    def worker(name: str, path: Path):
        return procs.start(
            "worker", "--coordinator", address, "--data", str(path), "--worker-id", name, "--threads", "1", "--patience", "60"
        )

    rc = (w := worker("typo", bad)).wait(120)
    assert rc == 2, f"worker with unknown labels: exit {rc}\n{w.stderr}"
    assert "meh" in w.stderr and str(bad) in w.stderr
    assert_no_traceback(w.stderr)
    assert len([line for line in w.stderr.splitlines() if line.strip()]) == 1, w.stderr

    workers = [worker(f"edge{i}", f) for i, f in enumerate(files)]
    _finish(coord, workers)
    rows = read_metrics(run)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["clients"] == 2, r
        assert r["num_examples"] == sum(sizes), r
        assert r["rejected"] == 0
        assert sorted(r.get("sampled", [0, 1])) == [0, 1]


def test_an_edge_worker_ignores_simulated_heterogeneity(tmp_path: Path, procs) -> None:
    """``simulate.*`` drops, delays and corruption act around `dpeft simulate`'s workers only: a
    plain `dpeft worker` trains every task of a run configured to drop nearly all of them and to
    corrupt every client's update x -1000."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    address = f"127.0.0.1:{free_port()}"
    sim = ["simulate.dropout=0.99", "simulate.byzantine_clients=[0,1,2,3]", "simulate.byzantine_scale=-1000", "simulate.speed_factors=[50]"]
    coord = procs.start(*_coordinator_args(run, address, rounds=1, train__local_steps=4), *sim)
    worker = procs.start("worker", "--coordinator", address, "--worker-id", "edge", "--threads", "1", "--patience", "60")
    _finish(coord, [worker], timeout=180)
    rows = read_metrics(run)
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["clients"] == 2 and rows[1]["rejected"] == 0
    final = load_file(sorted((run / "checkpoints").glob("round-*.safetensors"))[-1])
    assert max(float(v.abs().max()) for v in final.values()) < 5.0  # an honest update, not x -1000
