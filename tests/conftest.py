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
