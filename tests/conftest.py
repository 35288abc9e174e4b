"""Shared fixtures: the MiniLM + LoRA default task is loaded once per session.

Fixtures here hand out objects that tests must not mutate in place unless they restore them
(the model fixture is function-scoped around a session-scoped bundle and resets the adapter).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: exercises several parts together (real gRPC, subprocesses)")


#: The modules that take longest (module totals of a `--durations` run on the 2-core box), longest first.
#: `make test` hands whole modules to its two processes in collection order
#: (`--dist loadfile --no-loadscope-reorder`); collecting these first means no long module is
#: the last one started while the other process sits idle. Refresh from a `--durations=0` run
#: when the list drifts; a module missing here only runs later, nothing is skipped.
LONGEST_FIRST = (
    "tests/transport/test_ray_transport.py",
    "tests/test_reference_runs.py",
    "tests/edge/test_chaos.py",
    "tests/integration_strategies/test_simulate_policies.py",
    "tests/integration_strategies/test_worker_hyperparams.py",
    "tests/transport/test_allreduce.py",
    "tests/integration_strategies/test_lora_fair_hetlora_runs.py",
    "tests/split/test_federation.py",
    "tests/split/test_kill_revive.py",
    "tests/test_python_api.py",
    "tests/launch/test_worker_restart.py",
    "tests/test_examples.py",
    "tests/launch/test_signals.py",
    "tests/launch/test_methods.py",
    "tests/launch/test_coordinator_worker.py",
    "tests/launch/test_config_combinations.py",
    "tests/launch/test_fed_eval_simulate.py",
    "tests/launch/test_secagg_runs.py",
    "tests/train/test_core_budget.py",
    "tests/launch/test_simulate.py",
    "tests/launch/test_quantized_base.py",
    "tests/launch/test_cli_errors.py",
    "tests/test_plugins.py",
    "tests/train/test_multi_lora.py",
    "tests/launch/test_instruction_data.py",
    "tests/edge/test_crash_resume.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist only: the modules of :data:`LONGEST_FIRST` first, in that order (a
    stable sort: tests keep their order within a module, the other modules theirs)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


@pytest.fixture(scope="session")
def minilm_bundle():
    """MiniLM (seq_cls, 2 labels) + LoRA r=8 on query/value, seed 0, built once."""
    from dpeft.adapters import build_model
    from dpeft.config import AdapterConfig, ModelConfig

    return build_model(ModelConfig(), AdapterConfig(), 2, 0)


@pytest.fixture(scope="session")
def minilm_initial_state(minilm_bundle):
    from dpeft.adapters import extract_state

    return extract_state(minilm_bundle.model)


@pytest.fixture
def minilm_model(minilm_bundle, minilm_initial_state):
    """The shared MiniLM bundle, with its adapter reset to the initial state after the test."""
    from dpeft.adapters import load_state

    yield minilm_bundle
    load_state(minilm_bundle.model, minilm_initial_state)
    minilm_bundle.model.eval()


@pytest.fixture(scope="session")
def rotten_tomatoes_small():
    """(train, test) of rotten tomatoes capped small (seeded)."""
    from dpeft.config import DataConfig
    from dpeft.data import load_dataset

    return load_dataset(DataConfig(max_train_examples=256, test_examples=64), seed=0)


@pytest.fixture
def single_thread():
    """torch on one intra-op thread for the test (restored after).

    The CI box has 2 cores shared by several jobs; with 2 OpenMP threads under that load a
    MiniLM step is ~10x slower than with one.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
