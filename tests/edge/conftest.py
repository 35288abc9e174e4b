"""Fixtures of the edge tests (tiny model, test certificates); helpers live in edge_testlib.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from edge_testlib import make_tiny_bert  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Path:
    from dpeft.transport.tls import make_test_certs

    out = tmp_path_factory.mktemp("certs")
    make_test_certs(out)
    other = out / "other"
    make_test_certs(other)  # a second, unrelated CA (the "wrong CA")
    return out
