"""A GGUF checkpoint materialised once as an ordinary model directory in the user cache.

One real conversion of the SmolLM2 GGUF (a copy of it, into a fresh cache): two callers ask for
it at the same moment and must end with one complete directory.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dpeft.adapters.embedded import cache_dir_for, cached_dir, materialise
from dpeft.adapters.model import load_source, resolve_model_source
from dpeft.validate import load_config


@pytest.fixture(scope="module")
def gguf_copy(tmp_path_factory) -> tuple[Path, str]:
    cfg = load_config(None, ["model.name=smollm2", "model.task=causal_lm"])
    directory, gguf, _ = resolve_model_source(cfg.model)
    assert gguf is not None
    here = tmp_path_factory.mktemp("gguf")
    shutil.copy2(Path(directory) / gguf, here / gguf)
    return here, gguf


def test_two_materialise_at_once_one_copy(gguf_copy, tmp_path, monkeypatch) -> None:
    """Two threads stand for two processes: each opens the lock file itself, and flock excludes
    open files, not processes; the second waits and finds the first one's complete copy."""
    directory, gguf = gguf_copy
    cache = tmp_path / "cache"
    monkeypatch.setenv("DPEFT_CACHE", str(cache))
    with ThreadPoolExecutor(2) as pool:
        paths = set(pool.map(lambda _: materialise(str(directory), gguf), range(2)))
    assert len(paths) == 1
    target = paths.pop()
    # one complete directory and its lock file; no temporary leftovers
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([target.name, f"{target.name}.lock"])
    assert cached_dir(str(directory), gguf) == target == cache_dir_for(str(directory), gguf)
    # an ordinary directory: config without the GGUF quantization_config, the whole model, the tokenizer
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    assert (target / "model.safetensors").stat().st_size > 500_000_000
    assert "chat_template" in (target / "tokenizer_config.json").read_text() or (target / "chat_template.jinja").is_file()
    # model.path + model.gguf_file load from it; model.layers cuts at load
    cfg = load_config(None, [f"model.path={directory}", f"model.gguf_file={gguf}", "model.task=causal_lm", "model.layers=2"])
    assert load_source(cfg.model) == (str(target), None)
    # a changed GGUF file gets a new copy
    st = (directory / gguf).stat()
    os.utime(directory / gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert cache_dir_for(str(directory), gguf) != target and cached_dir(str(directory), gguf) is None


def test_quantized_gguf_base_needs_a_writable_cache(tmp_path, monkeypatch) -> None:
    from dpeft.errors import ConfigError

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("DPEFT_CACHE", str(blocker))
    cfg = load_config(None, ["model.name=smollm2", "model.task=causal_lm", "model.quantization=nf4"])
    with pytest.raises(ConfigError) as err:
        load_source(cfg.model)
    assert err.value.key == "model.quantization" and "DPEFT_CACHE" in str(err.value)
