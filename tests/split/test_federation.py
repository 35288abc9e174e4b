"""Split + federation: edges share one cloud base; a strategy closes each round over the sampled edges; resume."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading

import pytest
import torch

from dpeft.adapters import build_model, extract_state
from dpeft.config import DataConfig, ModelConfig, RunConfig, StrategyConfig, TrainConfig
from dpeft.data import load_dataset, tokenize
from dpeft.split.cloud import CloudModel
from dpeft.split.config import SplitConfig
from dpeft.split.edge import EdgeModel, head_flops, lora_flops
from dpeft.split.service import CloudService, EdgeData, Federation, handshake, run_edge_session
from dpeft.split.spec import lora_path, lora_sites, slice_layers
from dpeft.state import AdapterState
from dpeft.transport.split_stream import EdgeConnection, SplitServer


def test_two_edges_fedavg_round_is_the_weighted_mean_of_their_deltas():
    run = RunConfig(
        rounds=2,
        model=ModelConfig(max_length=24),
        train=TrainConfig(local_steps=2, batch_size=4, loss="cross_entropy", lr=1e-2),
        strategy=StrategyConfig(name="fedavg"),
    )
    split = SplitConfig(edges=2, layers=2, eval_examples=0)
    bundle = build_model(run.model, run.adapter, 2, 0)
    slice_layers(bundle.model, 2)
    init = extract_state(bundle.model)
    fed = Federation(run, split, init.clone())
    submitted: dict[int, list] = {}
    real_submit = fed.submit

    def spy(client_id, round_num, delta, num_examples, metrics):
        submitted.setdefault(round_num, []).append((delta.clone(), num_examples))
        return real_submit(client_id, round_num, delta, num_examples, metrics)

    fed.submit = spy
    globals_seen: list[AdapterState] = []
    real_finish = fed.strategy.finish_round

    def finish(global_state, agg):
        new = real_finish(global_state, agg)
        globals_seen.append((global_state.clone(), new.clone()))
        return new

    fed.strategy.finish_round = finish
    service = CloudService(CloudModel(copy.deepcopy(bundle.model)), run, split, fed)
    server = SplitServer(service.handle, "127.0.0.1:0").start()
    train, _ = load_dataset(DataConfig(max_train_examples=20, test_examples=4), 0)
    tok = tokenize(bundle.tokenizer, train.texts, train.labels, 24)
    shards = [list(range(0, 8)), list(range(8, 20))]
    edges, errors = [], []

    def edge_main(i):
        try:
            conn = EdgeConnection(server.address, patience_s=10)
            welcome = handshake(conn.channel, f"e{i}")
            edge = EdgeModel(copy.deepcopy(bundle.model), run.train, split.kr)
            edge.drop_body()
            edges.append((i, edge))
            run_edge_session(conn.channel, welcome, edge, EdgeData(tok, shards[i], None, 2), run, split)
            conn.close()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    _serve_edges(service, server, edge_main, 2, errors)
    # rounds are numbered from 1 (round 0: the untrained global's line), as in `dpeft simulate`
    assert len(globals_seen) == 2 and [r["round"] for r in fed.rows] == [0, 1, 2] and sorted(submitted) == [1, 2]
    assert fed.rows[0]["clients"] == 0 and fed.rows[0]["train_loss"] is None
    for r, (before, after) in enumerate(globals_seen, start=1):
        ups = submitted[r]
        total = sum(n for _, n in ups)
        assert sorted(n for _, n in ups) == [8, 12]
        for k in after.tensors:
            expect = before[k] + sum(d[k] * (n / total) for d, n in ups)
            assert torch.allclose(after[k], expect, atol=1e-6), k
        assert any(float(d[k].abs().max()) > 0 for d, _ in ups for k in d.tensors)
    # both edges end on the final global
    for _, edge in edges:
        state = edge.state()
        for k, v in fed.global_state.items():
            assert torch.equal(state[k], v)
    assert fed.rows[1]["bytes_up"] > 0 and fed.rows[1]["split_steps"] == 4 and fed.rows[1]["sampled"] == [0, 1]


def test_edge_flop_formula_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    bundle = build_model(ModelConfig(), RunConfig().adapter, 2, 0)
    site = lora_sites(bundle.model)[0]
    x = torch.randn(3, 5, site.in_features, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        y = lora_path(site, x)
        y.backward(torch.ones_like(y))
    assert fc.get_total_flops() == lora_flops(15, site.r, site.in_features, site.out_features, True, True)
    x2 = torch.randn(3, 5, site.in_features)
    with FlopCounterMode(display=False) as fc:
        y = lora_path(site, x2)
        y.backward(torch.ones_like(y))
    assert fc.get_total_flops() == lora_flops(15, site.r, site.in_features, site.out_features, True, False)
    head = torch.nn.Linear(384, 2)
    h = torch.randn(4, 384, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        head(h).sum().backward()
    assert fc.get_total_flops() == head_flops(4, 384, 2, True)


SIMULATE = [
    sys.executable,
    "-m",
    "dpeft_launch.cli",
    "split",
    "simulate",
    "rounds=3",
    "train.local_steps=2",
    "train.batch_size=4",
    "split.edges=2",
    "split.layers=1",
    "data.max_train_examples=40",
    "data.test_examples=8",
    "split.eval_examples=8",
    "model.max_length=24",
    "data.partition=iid",
    "split.kr.enabled=true",
    "split.kr.window=1",
    "split.kr.warmup=1",
    "split.kr.revive_every=0",
    "split.wire_dtype=bf16",
    "adapter.dropout=0.1",
]


def _in_own_group(cmd, run_dir, timeout, until=None):
    """Run ``cmd`` as its own process group (the cloud and its edge processes); the group is
    SIGKILLed when ``until()`` turns true, on timeout, and in any case before returning.
    Returns (exit code, stderr)."""
    import os
    import signal
    import tempfile
    import time

    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: nothing blocks while we poll
        proc = subprocess.Popen([*cmd, f"run_dir={run_dir}"], stdout=err, stderr=err, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline and not (until is not None and until()):
                time.sleep(0.02)
            assert until is not None or proc.poll() is not None, f"{cmd} did not finish in {timeout} s"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the cloud and any edge still alive, at once
            except ProcessLookupError:  # all over already
                pass
            proc.wait()
        err.seek(0)
        return proc.returncode, err.read()


def _adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.integration
def test_split_simulate_sigkilled_and_resumed_ends_like_an_uninterrupted_run(tmp_path):
    """Two edge processes, Kill-and-Revive, LoRA dropout, AdamW: the process group (cloud and
    edges) is SIGKILLed after round 1 of 3; `dpeft split simulate` again resumes from round 1
    and ends on the same adapter as an uninterrupted run (1e-6), one metrics line per round."""
    ref = tmp_path / "ref"
    rc, err = _in_own_group(SIMULATE, ref, timeout=240)
    assert rc == 0, err[-2000:]
    rows = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]  # 1-based like `dpeft simulate`, round 0 = before training
    assert rows[0]["clients"] == 0 and rows[0]["train_loss"] is None and 0.0 <= rows[0]["eval_accuracy"] <= 1.0
    for r in rows[1:]:
        assert r["clients"] == 2 and r["sampled"] == [0, 1] and 0.0 <= r["eval_accuracy"] <= 1.0 and r["bytes_up"] > 0
    assert "eval acc" in err and "round 3/3" in err and "3 rounds in" in err  # progress + summary, as simulate prints them
    for name in ("accuracy.png", "bytes.png"):
        assert (ref / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (ref / "checkpoints").iterdir()) == [f"round-00000{i}.safetensors" for i in (1, 2, 3)]

    run = tmp_path / "run"
    first = run / "checkpoints" / "round-000001.safetensors"
    rc, err = _in_own_group(SIMULATE, run, timeout=240, until=first.exists)
    assert rc in (-9, 0), err[-2000:]
    # the kill lands during round 2 or 3 (or, on a slow machine, after the end): keep only the
    # checkpoint of round 1, as if it had landed right after it; the edges' states of later
    # rounds and metrics lines past round 1 stay behind and must be ignored/redone on resume
    for p in (run / "checkpoints").glob("round-*.safetensors"):
        if p.name != first.name:
            p.unlink()
    rc, err = _in_own_group(SIMULATE, run, timeout=240)
    assert rc == 0, err[-2000:]
    assert "resumed from round 1" in err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    got, want = _adapter(run), _adapter(ref)
    assert got.keys() == want.keys()
    for k in want:
        assert float((got[k] - want[k]).abs().max()) <= 1e-6, k
    assert any(float((want[k]).abs().max()) > 0 for k in want if "lora_B" in k)  # it trained
    # a bad key exits 2 with a message naming it
    bad = subprocess.run(
        [sys.executable, "-m", "dpeft_launch.cli", "split", "simulate", "split.kr.budget=2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "split.kr.budget" in bad.stderr


def test_token_is_checked_and_never_sent_to_edges():
    from dpeft.errors import ProtocolError

    run = RunConfig(model=ModelConfig(max_length=16))
    split = SplitConfig(federated=False, layers=1, token="s3cret-token")
    bundle = build_model(run.model, run.adapter, 2, 0)
    slice_layers(bundle.model, 1)
    service = CloudService(CloudModel(bundle.model), run, split)
    server = SplitServer(service.handle, "127.0.0.1:0").start()
    try:
        conn = EdgeConnection(server.address, patience_s=10)
        with pytest.raises(ProtocolError, match="invalid token"):
            handshake(conn.channel, "intruder", "wrong")
        conn.close()
        conn = EdgeConnection(server.address, patience_s=10)
        welcome = handshake(conn.channel, "edge", "s3cret-token")
        assert "s3cret-token" not in welcome.fields["config_yaml"]
        assert welcome.fields["modules"] == [
            "bert.encoder.layer.0.attention.self.query",
            "bert.encoder.layer.0.attention.self.value",
        ]
        conn.channel.send("goodbye", reason="done")
        conn.close()
    finally:
        server.stop(0.5)


@pytest.mark.integration
def test_split_cloud_listen_and_edge_with_own_data_file(tmp_path):
    """`dpeft split cloud --listen` + `dpeft split edge --data FILE` as separate processes."""
    import csv
    import os
    import re

    data = tmp_path / "mine.csv"
    with open(data, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in range(12):
            w.writerow([f"private sentence number {i} is {'great' if i % 2 else 'awful'}", i % 2])
    run_dir = tmp_path / "cloud"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cloud = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dpeft_launch.cli",
            "split",
            "cloud",
            "--listen",
            "127.0.0.1:0",
            "rounds=1",
            "train.local_steps=2",
            "train.batch_size=4",
            "split.edges=1",
            "split.layers=1",
            "model.max_length=16",
            "split.token=tok",
            f"run_dir={run_dir}",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        address = None
        for line in cloud.stderr:
            m = re.search(r"listening on (\S+)", line)
            if m:
                address = m.group(1)
                break
        assert address, "the cloud did not report its address"
        edge = subprocess.run(
            [
                sys.executable,
                "-m",
                "dpeft_launch.cli",
                "split",
                "edge",
                "--cloud",
                address,
                "--data",
                str(data),
                "--token",
                "tok",
            ],
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
        )
        assert edge.returncode == 0, edge.stderr[-2000:]
        assert "2 steps" in edge.stdout
        out, _ = cloud.communicate(timeout=60)
        assert cloud.returncode == 0
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1] and rows[1]["num_examples"] == 12
        assert not any("eval_accuracy" in r for r in rows)  # the only edge has no held-out data
        assert (run_dir / "checkpoints" / "round-000001.safetensors").is_file()
        assert (run_dir / "adapter" / "adapter_config.json").is_file()
    finally:
        if cloud.poll() is None:
            cloud.kill()
            cloud.wait()


def _serve_edges(service, server, edge_main, n: int, errors: list) -> None:
    """Run ``edge_main(i)`` for i < n in threads against ``server``; assert none failed and the run finished; stop the server."""
    threads = [threading.Thread(target=edge_main, args=(i,)) for i in range(n)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert service.finished.wait(10)
    finally:
        server.stop(0.5)


def _run_federation(fed, bundle, run, split, shards, tok, state_dirs=None):
    """Serve ``fed`` and run one edge thread per shard (client i = edge-i); returns their reports."""
    fed.reserve([f"edge-{i}" for i in range(len(shards))])
    service = CloudService(CloudModel(copy.deepcopy(bundle.model)), run, split, fed)
    server = SplitServer(service.handle, "127.0.0.1:0").start()
    reports, errors = {}, []

    def edge_main(i):
        try:
            conn = EdgeConnection(server.address, patience_s=10)
            welcome = handshake(conn.channel, f"edge-{i}")
            edge = EdgeModel(copy.deepcopy(bundle.model), run.train, split.kr)
            edge.drop_body()
            sd = state_dirs[i] if state_dirs else None
            reports[i] = run_edge_session(
                conn.channel, welcome, edge, EdgeData(tok, shards[i], None, 2), run, split, f"edge-{i}", sd
            )
            conn.close()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    _serve_edges(service, server, edge_main, len(shards), errors)
    return reports


def test_clients_per_round_samples_edges_like_the_round_engine():
    """3 edges, 2 per round: each round trains the round engine's seeded sample; the others sit out."""
    from dpeft.rounds.sampling import sample_clients

    run = RunConfig(
        rounds=3,
        clients_per_round=2,
        seed=3,
        model=ModelConfig(max_length=24),
        strategy=StrategyConfig(name="fedavg"),
        train=TrainConfig(local_steps=1, batch_size=4, loss="cross_entropy", lr=1e-2),
    )
    split = SplitConfig(edges=3, layers=1, eval_examples=0)
    bundle = build_model(run.model, run.adapter, 2, 0)
    slice_layers(bundle.model, 1)
    fed = Federation(run, split, extract_state(bundle.model))
    folded: dict[int, list[int]] = {}
    real_submit = fed.submit

    def spy(client_id, round_num, delta, num_examples, metrics):
        folded.setdefault(round_num, []).append(client_id)
        return real_submit(client_id, round_num, delta, num_examples, metrics)

    fed.submit = spy
    train, _ = load_dataset(DataConfig(max_train_examples=24, test_examples=4), 0)
    tok = tokenize(bundle.tokenizer, train.texts, train.labels, 24)
    reports = _run_federation(fed, bundle, run, split, [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))], tok)
    expect = {r: sample_clients(3, r, [0, 1, 2], 2) for r in (1, 2, 3)}
    assert len({tuple(v) for v in expect.values()}) > 1, "pick a seed whose samples differ between rounds"
    assert {r: sorted(v) for r, v in folded.items()} == expect
    assert [r["sampled"] for r in fed.rows[1:]] == [expect[r] for r in (1, 2, 3)]
    assert all(r["clients"] == 2 and r["num_examples"] == 16 for r in fed.rows[1:])
    for i, rep in reports.items():
        assert rep.trained == [r for r in (1, 2, 3) if i in expect[r]]
        assert rep.rounds == [1, 2, 3]  # every edge sees every global
        assert rep.steps == len(rep.trained)
