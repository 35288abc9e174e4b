"""dpeft's own adapter methods (loreft, direft, houlsby, pfeiffer): what holds at init, R's
orthonormality through local steps and aggregation, positions under left and right padding,
the export and its one-line loader, and the config errors. Tiny: MiniLM and 2-layer random LMs."""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from dpeft.adapters import build_model, extract_state, load_adapter, load_state
from dpeft.adapters.native import NativeAdapterModel, build_native, post_aggregate
from dpeft.adapters.reft import orthonormalize_rows, position_mask
from dpeft.config import AdapterConfig, ModelConfig
from dpeft.errors import ConfigError
from dpeft.rounds.tally import finish_step
from dpeft.state import AdapterState
from dpeft.strategies import ClientUpdate, make_strategy
from dpeft.validate import load_config

pytestmark = pytest.mark.usefixtures("single_thread")

METHODS = ["loreft", "direft", "houlsby", "pfeiffer"]
TEXTS = ["a gripping, funny film", "dull", "the plot goes nowhere and the actors look bored"]


def _minilm(method: str, **options):
    return build_model(ModelConfig(max_length=32), AdapterConfig(method=method, r=4, options=options), 2, 0)


def _batch(bundle, side: str = "right"):
    tok = bundle.tokenizer
    tok.padding_side = side
    try:
        return tok(TEXTS, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"


def _bare_logits(model: NativeAdapterModel, batch) -> torch.Tensor:
    """The base model's logits with the adapter's hooks taken off (put back after)."""
    base = model.remove()
    try:
        with torch.no_grad():
            return base(**batch).logits
    finally:
        model._handles = model.get_submodule(model.prefix).attach(base, _blocks(base))  # type: ignore[operator]


def _blocks(base):
    from dpeft.adapters.native import transformer_blocks

    return transformer_blocks(base)


def _orthonormal_error(r: torch.Tensor) -> float:
    r = r.double()
    return float((r @ r.T - torch.eye(r.shape[0], dtype=torch.float64)).abs().max())


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init_and_state_names(method: str) -> None:
    bundle = _minilm(method)
    model = bundle.model
    assert isinstance(model, NativeAdapterModel)
    batch = _batch(bundle)
    with torch.no_grad():
        got = model(**batch).logits
    assert torch.allclose(got, _bare_logits(model, batch), atol=1e-5)
    state = extract_state(model)
    prefix = "reft." if method in ("loreft", "direft") else "bottleneck."
    assert all(k.startswith(prefix) or k.startswith("classifier.") for k in state.tensors)
    assert {"classifier.weight", "classifier.bias"} <= set(state.tensors)  # the head is trained and exchanged
    adapted = {k.split(".")[1] for k in state.tensors if k.startswith(prefix)}
    want = {"loreft": 6, "direft": 6, "houlsby": 12, "pfeiffer": 6}[method]  # MiniLM has 6 layers
    assert len(adapted) == want
    # the base is frozen: only the adapter and the head train
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.adapter_parameters().values()}


def test_random_init_is_not_identity_and_r_is_orthonormal() -> None:
    bundle = _minilm("loreft", init="random")
    model = bundle.model
    batch = _batch(bundle)
    with torch.no_grad():
        got = model(**batch).logits
    assert (got - _bare_logits(model, batch)).abs().max() > 1e-4
    for key, value in extract_state(model).items():
        if key.endswith(".R"):
            assert value.shape == (4, 384) and _orthonormal_error(value) < 1e-5


def test_position_mask_counts_real_tokens_left_or_right_padded() -> None:
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    left = torch.flip(right, dims=[1])
    spec = (1, 1)  # f1+l1
    r = position_mask(right, (2, 6), torch.device("cpu"), spec)
    assert r.tolist() == [[True, False, False, True, False, False], [True, True, False, False, False, False]]
    assert position_mask(left, (2, 6), torch.device("cpu"), spec).tolist() == torch.flip(r, dims=[1]).tolist()
    # a decoding step (one new token, KV cache): the new token is the row's last real token
    assert position_mask(torch.ones(2, 7), (2, 1), torch.device("cpu"), spec).tolist() == [[True], [True]]
    assert position_mask(right, (2, 6), torch.device("cpu"), None).tolist() == (right == 1).tolist()


def test_r_stays_orthonormal_after_local_steps(rotten_tomatoes_small) -> None:
    from dpeft.config import TrainConfig
    from dpeft.data import tokenize
    from dpeft.train import local_train

    bundle = _minilm("loreft", init="random")
    train, _ = rotten_tomatoes_small
    data = tokenize(bundle.tokenizer, train.texts[:16], train.labels[:16], 32)
    before = extract_state(bundle.model)
    params = list(bundle.model.adapter_parameters().values())
    local_train(bundle.model, params, data, list(range(16)), TrainConfig(local_steps=3, batch_size=8, lr=0.05), "seq_cls", 0)
    after = extract_state(bundle.model)
    for key in after.tensors:
        if key.endswith(".R"):
            assert not torch.allclose(after[key], before[key])  # R trained
            assert _orthonormal_error(after[key]) < 1e-5


def _orthonormal_state(seed: int) -> AdapterState:
    gen = torch.Generator().manual_seed(seed)
    r = orthonormalize_rows(torch.randn(4, 16, generator=gen))
    return AdapterState(
        OrderedDict([("reft.0.R", r), ("reft.0.W.weight", torch.randn(4, 16, generator=gen))]), {"method": "loreft"}
    )


def _round(strategy: str, glob: AdapterState, clients: list[AdapterState]):
    strat = make_strategy(load_config(None, [f"strategy.name={strategy}"]).strategy)
    agg = strat.begin_round(glob)
    for i, c in enumerate(clients):
        agg.add(ClientUpdate(i, AdapterState(OrderedDict((k, c[k] - glob[k]) for k in glob.tensors)), 10, {}))
    return strat, agg


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "fedavgm"])
def test_aggregation_projects_r_back_onto_orthonormal_rows(strategy: str) -> None:
    glob = _orthonormal_state(0)
    clients = [_orthonormal_state(s) for s in (1, 2, 3)]
    strat, agg = _round(strategy, glob, clients)
    raw = strat.finish_round(glob.clone(), agg)
    assert _orthonormal_error(raw["reft.0.R"]) > 1e-2  # the server step leaves the manifold
    strat, agg = _round(strategy, glob, clients)
    new = finish_step(strat, glob.clone(), agg, 1)
    assert new.meta == {"method": "loreft", "round": 1}
    assert _orthonormal_error(new["reft.0.R"]) < 1e-6
    # the projection is the polar factor U V^T of the server step's R, the closest orthonormal-row matrix
    u, _, vh = torch.linalg.svd(raw["reft.0.R"].double(), full_matrices=False)
    assert torch.allclose(new["reft.0.R"].double(), u @ vh, atol=1e-5)
    assert torch.allclose(new["reft.0.W.weight"], raw["reft.0.W.weight"], atol=1e-6)  # only R is projected
    if strategy == "fedavg":
        mean = torch.stack([c["reft.0.R"] for c in clients]).mean(0)
        assert torch.allclose(raw["reft.0.R"], mean, atol=1e-6)


def test_other_methods_are_not_projected() -> None:
    state = AdapterState(OrderedDict([("reft.0.R", torch.ones(2, 3))]), {"method": "direft"})
    assert post_aggregate(state) is state


@pytest.mark.parametrize("method", ["loreft", "houlsby"])
def test_export_loads_with_one_line_and_matches(tmp_path: Path, method: str) -> None:
    from transformers import AutoModelForSequenceClassification

    from dpeft.adapters.model import resolve_model_source

    bundle = _minilm(method, **({"positions": "f1+l1"} if method == "loreft" else {}))
    state = extract_state(bundle.model)
    gen = torch.Generator().manual_seed(1)
    trained = state.map(lambda t: t + 0.05 * torch.randn(t.shape, generator=gen))
    trained.tensors.update(post_aggregate(AdapterState(trained.tensors, {"method": method})).tensors)
    load_state(bundle.model, trained)
    bundle.model.save_pretrained(tmp_path / "adapter")
    batch = _batch(bundle)
    with torch.no_grad():
        want = bundle.model(**batch).logits
    torch.manual_seed(1234)  # another head init: the loaded head must come from the export
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_source(ModelConfig())[0], num_labels=2)
    import dpeft

    loaded = dpeft.load_adapter(base, tmp_path / "adapter")  # the one-liner, from the package root
    with torch.no_grad():
        got = loaded(**batch).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert (want - _bare_logits(bundle.model, batch)).abs().max() > 1e-3  # the export is not the base model


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """arch -> a saved 2-layer random causal LM directory (made once per arch)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "launch"))
    from tiny_archs import save_tiny_causal_lm

    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = save_tiny_causal_lm(arch, tmp_path_factory.mktemp(arch))
        return made[arch]

    return get


@pytest.fixture(scope="module")
def tiny_lm_dir(tiny_lm) -> Path:
    return tiny_lm("qwen2")


@pytest.mark.parametrize(
    ("arch", "method"), [("llama", "loreft"), ("qwen2", "direft"), ("mistral", "houlsby"), ("qwen2", "pfeiffer")]
)
def test_causal_lm_padding_side_and_export(tmp_path: Path, tiny_lm, arch: str, method: str) -> None:
    from transformers import AutoModelForCausalLM

    tiny_lm_dir = tiny_lm(arch)

    options = {"positions": "f1+l1", "init": "random"} if method in ("loreft", "direft") else {"reduction_factor": 4}
    cfg = ModelConfig(path=str(tiny_lm_dir), task="causal_lm", max_length=16)
    bundle = build_model(cfg, AdapterConfig(method=method, r=2, options=options), None, 0)
    model = bundle.model
    if method in ("houlsby", "pfeiffer"):  # identity at init; perturb so the export means something
        load_state(model, extract_state(model).map(lambda t: t + 0.1))
    right, left = _batch(bundle, "right"), _batch(bundle, "left")
    with torch.no_grad():
        r_logits, l_logits = model(**right).logits, model(**left).logits
        positional = model(right["input_ids"], right["attention_mask"]).logits  # the mask found positionally too
    assert torch.allclose(positional, r_logits)
    # each row's last real token sees the same intervened tokens whichever side pads
    n = right["attention_mask"].sum(1)
    for i in range(len(TEXTS)):
        assert torch.allclose(r_logits[i, n[i] - 1], l_logits[i, -1], atol=1e-4)
    assert (r_logits - _bare_logits(model, right)).abs().max() > 1e-4
    model.save_pretrained(tmp_path / "adapter")
    loaded = load_adapter(AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir)), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(loaded(**right).logits, r_logits, atol=1e-5)
        out = loaded.generate(**left, max_new_tokens=2, do_sample=False)  # type: ignore[operator]
    assert out.shape[1] == left["input_ids"].shape[1] + 2


def test_build_native_on_a_subset_of_layers(tiny_lm_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir))
    model = build_native(base, AdapterConfig(method="houlsby", options={"layers": [1]}), "causal_lm", 0)
    assert {k.split(".")[1] for k in model.adapter_parameters()} == {"1_attn", "1_ffn"}
    with pytest.raises(ConfigError, match=r"adapter\.options\.layers"):
        build_native(base, AdapterConfig(method="pfeiffer", options={"layers": [5]}), "causal_lm", 0)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["adapter.method=loreft", "adapter.options={positions: middle}"], "adapter.options.positions"),
        (["adapter.method=direft", "adapter.options={reduction_factor: 4}"], "adapter.options.reduction_factor"),
        (["adapter.method=houlsby", "adapter.options={non_linearity: swish}"], "adapter.options.non_linearity"),
        (["adapter.method=pfeiffer", "adapter.options={layers: [-1]}"], "adapter.options.layers"),
        (["adapter.method=loreft", "model.quantization=4bit"], "model.quantization"),
        (["adapter.method=houlsby", "train.lockstep=true"], "train.lockstep"),
        (["adapter.method=loreft", "split.edges=1"], None),
    ],
)
def test_config_errors_name_the_key(overrides: list[str], key: str | None) -> None:
    if key is None:  # split mode is a separate command: its config check refuses the method
        from dpeft.split.config import load_split_config

        with pytest.raises(ConfigError, match=r"adapter\.method"):
            load_split_config(None, overrides)
        return
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.key == key
