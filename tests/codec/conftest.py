"""Fixtures for the codec tests."""

from __future__ import annotations

import pytest
import torch
from codec_testlib import FLOAT_DTYPES


@pytest.fixture(params=FLOAT_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def float_dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param
