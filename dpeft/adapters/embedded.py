"""A GGUF checkpoint materialised once as an ordinary Hugging Face directory, cached per user.

transformers reads a GGUF file by de-quantizing every tensor on each load (about 13 s for
SmolLM2-135M with its tokenizer, against well under a second from safetensors) and refuses a
``quantization_config`` (a 4/8-bit base) together with ``gguf_file``. The first load writes the
de-quantized model (fp32 safetensors, ``config.json`` without the GGUF ``quantization_config``,
the tokenizer and its chat template) under ``$DPEFT_CACHE`` (default ``~/.cache/dpeft``), in
``models/<gguf stem>-<key>/``; every later load, quantized or not, reads that directory.

The key hashes the GGUF file's resolved path, size and modification time, and the transformers
version that converted it: a changed file gets a new directory. The directory is written to a
temporary sibling and renamed into place, under a file lock, so two processes materialising at
once both end with the one complete copy. The cache holds the whole model; ``model.layers``
cuts layers when the directory is loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

#: written last into a complete directory
_DONE = "dpeft-materialised.txt"


def cache_root() -> Path:
    """``$DPEFT_CACHE`` or ``~/.cache/dpeft``."""
    env = os.environ.get("DPEFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dpeft"


def cache_dir_for(directory: str, gguf_file: str) -> Path:
    """Where the materialised copy of ``directory/gguf_file`` lives (whether or not it exists yet)."""
    import transformers

    src = (Path(directory) / gguf_file).resolve()
    st = src.stat()
    key = hashlib.sha256(f"{src}\0{st.st_size}\0{st.st_mtime_ns}\0{transformers.__version__}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{src.stem}-{key}"


def cached_dir(directory: str, gguf_file: str) -> Path | None:
    """The complete materialised directory of the GGUF file, or None when there is none yet."""
    target = cache_dir_for(directory, gguf_file)
    return target if (target / _DONE).is_file() else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (no lock where fcntl is missing: the rename still keeps copies whole)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def materialise(directory: str, gguf_file: str) -> Path:
    """The materialised directory of ``directory/gguf_file``, written first when missing."""
    target = cache_dir_for(directory, gguf_file)
    if (target / _DONE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f"{target.name}.lock"):
        if (target / _DONE).is_file():  # another process wrote it while this one waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            _write(directory, gguf_file, tmp)
            if target.exists():  # an incomplete leftover (a crash between rename and marker cannot happen, but be safe)
                shutil.rmtree(target, ignore_errors=True)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("materialised %s as %s", Path(directory) / gguf_file, target)
    return target


def _write(directory: str, gguf_file: str, out: Path) -> None:
    """De-quantize the GGUF checkpoint into ``out`` (safetensors, config, tokenizer, marker last)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    except ValueError:  # an architecture without a causal-LM head: keep the bare encoder
        model = AutoModel.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    # the weights are de-quantized fp32 now: drop the GGUF quantizer so the directory is ordinary
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    setattr(model, "hf_quantizer", None)  # noqa: B010 - torch types module attributes as Tensor | Module
    setattr(model, "is_quantized", False)  # noqa: B010
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file).save_pretrained(out)
    (out / _DONE).write_text(f"{Path(directory).resolve() / gguf_file}\n")
    os.chmod(out, 0o755)  # mkdtemp makes it private; the cache is an ordinary directory
