"""One cloud, many edges: concurrent steps stacked into one pass of the base.

Several edges (threads with their own loopback gRPC streams and their own peft copies) step
at once against one cloud; the cloud's window is long enough that they always form one batch.
Every edge must end with the factors (SGD, lr 1, no clipping: the update is the gradient)
and logits it gets stepping alone, to fp32 rounding, and must receive only its own rows.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from dpeft.adapters import adapter_parameters, build_model
from dpeft.codec.tensors import decode_state
from dpeft.config import AdapterConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
from dpeft.data import load_dataset, tokenize
from dpeft.errors import ConfigError
from dpeft.split.cloud import CloudModel
from dpeft.split.config import SplitConfig, load_split_config
from dpeft.split.edge import EdgeModel
from dpeft.split.service import CloudService, handshake
from dpeft.split.spec import slice_layers
from dpeft.transport.split_stream import EdgeConnection, SplitServer

TOL = 1e-5
RUN = RunConfig(train=TrainConfig(loss="cross_entropy", optimizer="sgd", lr=1.0, max_grad_norm=None))
#: payload-carrying kinds the cloud sends in a step
STEP_KINDS = ("lora_input", "features", "lora_output_grad")


def _perturb(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in adapter_parameters(model).items():
            if "lora_B" in k:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def _run_edges(model, batches, split, train=True, taps=None, on_connect=None, prepare=None):
    """One step per batch, each on its own edge, all at once; (per-edge results or errors, service)."""
    service = CloudService(CloudModel(copy.deepcopy(model)), RUN, split)
    server = SplitServer(service.handle, "127.0.0.1:0").start()
    n = len(batches)
    conns = [EdgeConnection(server.address, tap=taps[k] if taps else None, patience_s=10) for k in range(n)]
    if on_connect is not None:
        on_connect(conns)
    try:
        for k, c in enumerate(conns):
            handshake(c.channel, f"edge{k}").tensors({})
        edges = [EdgeModel(copy.deepcopy(model), RUN.train) for _ in range(n)]
        if prepare is not None:
            prepare(edges, conns)
        barrier = threading.Barrier(n)
        out: list = [None] * n

        def work(k):
            b = batches[k]
            barrier.wait()
            try:
                st, logits = edges[k].step(conns[k].channel, b["input_ids"], b["attention_mask"], b.get("labels"), train=train)
                out[k] = (st.loss, logits, {n_: p.detach().clone() for n_, p in edges[k].params.items()})
            except Exception as exc:  # noqa: BLE001 - reported to the test
                out[k] = exc

        threads = [threading.Thread(target=work, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        return out, service, edges, conns
    finally:
        for c in conns:
            c.leave(grace_s=2)
        server.stop(0.5)


def _recorder():
    got: list[tuple[str, dict]] = []

    def tap(direction, msg):
        kind = msg.WhichOneof("kind")
        if direction == "->edge" and kind in STEP_KINDS:
            got.append((kind, dict(decode_state(getattr(msg, kind).payload).items())))

    return got, tap


def _assert_same(alone, batched, tol=TOL):
    loss_a, logits_a, params_a = alone
    loss_b, logits_b, params_b = batched
    assert abs(loss_a - loss_b) <= tol
    assert float((logits_a - logits_b).abs().max()) <= tol
    for k in params_a:
        assert float((params_a[k] - params_b[k]).abs().max()) <= tol, k


def _edge_batches(data, sizes):
    """Batches of the given sizes whose lengths differ (shortest rows first, longest last)."""
    order = torch.argsort(data.attention_mask.sum(1)).tolist()
    picks = [order[: sizes[0]], order[-sizes[1] :], order[len(order) // 2 : len(order) // 2 + sizes[2]]]
    return [data.batch(p) for p in picks]


@pytest.fixture(scope="module")
def minilm():
    bundle = build_model(ModelConfig(max_length=48), AdapterConfig(), 2, 0)
    slice_layers(bundle.model, 2)
    _perturb(bundle.model)
    train, _ = load_dataset(DataConfig(max_train_examples=24, test_examples=4), 0)
    data = tokenize(bundle.tokenizer, train.texts, train.labels, 48)
    batches = _edge_batches(data, [2, 3, 1])
    widths = {int(b["input_ids"].shape[1]) for b in batches}
    assert len(widths) > 1  # the cloud pads some edges to the longest
    return bundle.model, batches


@pytest.fixture(scope="module")
def minilm_runs(minilm):
    model, batches = minilm
    rec_alone = [_recorder() for _ in batches]
    rec_batched = [_recorder() for _ in batches]
    alone, svc_alone, _, _ = _run_edges(model, batches, SplitConfig(max_batch_edges=1), taps=[t for _, t in rec_alone])
    batched, svc, _, _ = _run_edges(
        model, batches, SplitConfig(max_batch_edges=3, batch_window_ms=3000), taps=[t for _, t in rec_batched]
    )
    return alone, batched, svc_alone, svc, rec_alone, rec_batched


def test_minilm_batched_step_equals_each_edge_alone(minilm_runs):
    alone, batched, svc_alone, svc, _, _ = minilm_runs
    assert svc_alone.batcher is None
    assert svc.batcher is not None and svc.batcher.batch_sizes == [3]
    for a, b in zip(alone, batched, strict=True):
        assert not isinstance(a, Exception) and not isinstance(b, Exception), (a, b)
        _assert_same(a, b)
    # the update is real (every factor moved), so equality is not vacuous
    assert all(float((batched[0][2][k] - batched[1][2][k]).abs().max()) > 0 for k in batched[0][2] if "lora_" in k)


def test_each_edge_receives_only_its_own_rows(minilm, minilm_runs):
    _, batches = minilm
    _, _, _, _, rec_alone, rec_batched = minilm_runs
    for b, (got_alone, _), (got, _) in zip(batches, rec_alone, rec_batched, strict=True):
        rows, width = b["input_ids"].shape
        kinds = [k for k, _ in got]
        assert kinds == [k for k, _ in got_alone] and set(kinds) == set(STEP_KINDS)
        for (kind, tensors), (_, tensors_alone) in zip(got, got_alone, strict=True):
            for name, t in tensors.items():
                assert t.shape[0] == rows, (kind, name, tuple(t.shape))
                if t.dim() == 3:
                    assert t.shape[1] == width, (kind, name, tuple(t.shape))
                assert float((t.float() - tensors_alone[name].float()).abs().max()) <= 1e-4, (kind, name)


def test_minilm_evaluation_steps_batch_too(minilm, minilm_runs):
    """Evaluation steps batch with each other; their logits are the (pre-update) logits of the
    training steps each edge took alone (the base and LoRA dropout are off in both)."""
    model, batches = minilm
    alone = minilm_runs[0]
    batched, svc, _, _ = _run_edges(model, batches, SplitConfig(max_batch_edges=3, batch_window_ms=3000), train=False)
    assert svc.batcher.batch_sizes == [3]
    for a, b in zip(alone, batched, strict=True):
        assert float((a[1] - b[1]).abs().max()) <= TOL


def test_edges_with_different_active_and_killed_modules_share_a_batch(minilm):
    """Kill-and-Revive state differs per edge: edge 1's module 1 (value, layer 0) is killed with
    its factors uploaded (the cloud applies them to edge 1's rows only), edge 2 has module 2
    (query, layer 1) inactive; the batch still equals each edge alone."""
    model, batches = minilm

    def prepare(edges, conns):
        edges[1].kr.active.discard(1)
        edges[1].sync_frozen(conns[1].channel, [1], [])
        edges[2].kr.active.discard(2)

    alone, _, _, _ = _run_edges(model, batches, SplitConfig(max_batch_edges=1), prepare=prepare)
    batched, svc, _, _ = _run_edges(model, batches, SplitConfig(max_batch_edges=3, batch_window_ms=3000), prepare=prepare)
    assert svc.batcher.batch_sizes == [3]
    for a, b in zip(alone, batched, strict=True):
        _assert_same(a, b)
    # killed/inactive modules get no gradient on their edge only (SGD leaves them where they were)
    start = adapter_parameters(model)
    v0, q1 = "bert.encoder.layer.0.attention.self.value.lora_B.weight", "bert.encoder.layer.1.attention.self.query.lora_B.weight"
    assert torch.equal(batched[1][2][v0], start[v0]) and torch.equal(batched[2][2][q1], start[q1])
    assert not torch.equal(batched[0][2][v0], start[v0]) and not torch.equal(batched[0][2][q1], start[q1])


def test_an_edge_that_disconnects_mid_batch_fails_alone(minilm, minilm_runs):
    """Edge 1 drops its stream on its second LoRA request; edges 0 and 2 finish their step
    exactly as alone, then step again in a batch of two."""
    model, batches = minilm
    alone = minilm_runs[0]
    holder: list = []
    seen = [0]

    def tap(direction, msg):
        if direction == "->edge" and msg.WhichOneof("kind") == "lora_input":
            seen[0] += 1
            if seen[0] == 2:
                holder[0]._responses.cancel()  # the edge's stream goes away mid-step
                raise ConnectionError("edge 1 unplugged")

    taps = [lambda d, m: None, tap, lambda d, m: None]
    split = SplitConfig(max_batch_edges=3, batch_window_ms=3000)
    service = CloudService(CloudModel(copy.deepcopy(model)), RUN, split)
    server = SplitServer(service.handle, "127.0.0.1:0").start()
    conns = [EdgeConnection(server.address, tap=taps[k], patience_s=10) for k in range(3)]
    holder.append(conns[1])
    try:
        for k, c in enumerate(conns):
            handshake(c.channel, f"edge{k}").tensors({})
        edges = [EdgeModel(copy.deepcopy(model), RUN.train) for _ in range(3)]
        out: list = [None] * 3
        barrier = threading.Barrier(3)

        def work(k, ks):
            if len(ks) == 3:
                barrier.wait()
            try:
                b = batches[k]
                st, logits = edges[k].step(conns[k].channel, b["input_ids"], b["attention_mask"], b["labels"], train=True)
                out[k] = (st.loss, logits, {n: p.detach().clone() for n, p in edges[k].params.items()})
            except Exception as exc:  # noqa: BLE001
                out[k] = exc

        def step_all(ks):
            threads = [threading.Thread(target=work, args=(k, ks)) for k in ks]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not any(t.is_alive() for t in threads)

        step_all([0, 1, 2])
        assert isinstance(out[1], ConnectionError)
        assert service.batcher.batch_sizes == [3]
        _assert_same(alone[0], out[0])
        _assert_same(alone[2], out[2])
        step_all([0, 2])  # the survivors go on batching
        assert service.batcher.batch_sizes == [3, 2]
        assert not isinstance(out[0], Exception) and not isinstance(out[2], Exception)
        assert service.sessions[0].steps == 2 and service.sessions[2].steps == 2
    finally:
        for k in (0, 2):
            conns[k].leave(grace_s=2)
        conns[1]._grpc.close()
        server.stop(0.5)


def test_smollm2_two_layers_batched_step_equals_alone():
    bundle = build_model(
        ModelConfig(name="smollm2", max_length=20), AdapterConfig(target_modules=["q_proj", "v_proj", "o_proj"]), 2, 0
    )
    slice_layers(bundle.model, 2)
    _perturb(bundle.model)
    texts = ["a fine, moving film", "dull and far too long for anyone", "I laughed", "no", "quietly brilliant work"]
    data = tokenize(bundle.tokenizer, texts, [1, 0, 1, 0, 1], 20)
    batches = _edge_batches(data, [2, 1, 2])
    assert len({int(b["input_ids"].shape[1]) for b in batches}) > 1
    alone, _, _, _ = _run_edges(bundle.model, batches, SplitConfig(max_batch_edges=1))
    batched, svc, _, _ = _run_edges(bundle.model, batches, SplitConfig(max_batch_edges=3, batch_window_ms=3000))
    assert svc.batcher.batch_sizes == [3]
    for a, b in zip(alone, batched, strict=True):
        _assert_same(a, b)


@pytest.mark.parametrize(("key", "value"), [("split.max_batch_edges", "0"), ("split.batch_window_ms", "-1")])
def test_bad_batching_keys_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_split_config(None, [f"{key}={value}"])
