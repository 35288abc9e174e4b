"""Split + federation: two edges share one cloud base; FedAvg closes each round."""

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
from dpeft.split.transport import EdgeConnection, SplitServer
from dpeft.state import AdapterState


def test_two_edges_fedavg_round_is_the_weighted_mean_of_their_deltas():
    run = RunConfig(rounds=2, model=ModelConfig(max_length=24), train=TrainConfig(local_steps=2, batch_size=4, loss="cross_entropy", lr=1e-2), strategy=StrategyConfig(name="fedavg"))
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

    threads = [threading.Thread(target=edge_main, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert service.finished.wait(10)
    finally:
        server.stop(0.5)
    assert len(globals_seen) == 2 and len(fed.rows) == 2
    for r, (before, after) in enumerate(globals_seen):
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
    assert fed.rows[0]["bytes_up"] > 0 and fed.rows[0]["split_steps"] == 4


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


@pytest.mark.integration
def test_split_simulate_cli_two_edge_processes(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "dpeft.launch.cli", "split", "simulate", "rounds=2", "train.local_steps=2", "train.batch_size=4",
           "split.edges=2", "split.layers=1", "data.max_train_examples=40", "data.test_examples=8", "split.eval_examples=8",
           "model.max_length=24", "data.partition=iid", "split.kr.enabled=true", "split.kr.window=1", "split.kr.warmup=1",
           "split.kr.revive_every=0", "split.wire_dtype=bf16", f"run_dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    for r in rows:
        assert r["clients"] == 2 and 0.0 <= r["eval_accuracy"] <= 1.0 and r["bytes_up"] > 0
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert "eval acc" in proc.stdout
    # a bad key exits 2 with a message naming it
    bad = subprocess.run([sys.executable, "-m", "dpeft.launch.cli", "split", "simulate", "split.kr.budget=2"], capture_output=True, text=True, timeout=60)
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
        assert welcome.fields["modules"] == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"]
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
        [sys.executable, "-m", "dpeft.launch.cli", "split", "cloud", "--listen", "127.0.0.1:0", "rounds=1", "train.local_steps=2",
         "train.batch_size=4", "split.edges=1", "split.layers=1", "model.max_length=16", "split.token=tok", f"run_dir={run_dir}"],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        address = None
        for line in cloud.stderr:
            m = re.search(r"listening on (\S+)", line)
            if m:
                address = m.group(1)
                break
        assert address, "the cloud did not report its address"
        edge = subprocess.run([sys.executable, "-m", "dpeft.launch.cli", "split", "edge", "--cloud", address, "--data", str(data), "--token", "tok"],
                              capture_output=True, text=True, timeout=180, env=env)
        assert edge.returncode == 0, edge.stderr[-2000:]
        assert "2 steps" in edge.stdout
        out, _ = cloud.communicate(timeout=60)
        assert cloud.returncode == 0
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 1 and rows[0]["num_examples"] == 12 and "eval_accuracy" not in rows[0]
        assert (run_dir / "adapter" / "adapter_config.json").is_file()
    finally:
        if cloud.poll() is None:
            cloud.kill()
            cloud.wait()
