"""Error feedback for lossy update codecs, with per-client residuals in RAM or on disk.

Per client: ``compensated = delta + residual``; ``sent = codec.encode(compensated)``;
``residual = compensated - codec.decode(sent)``. Over rounds, the decoded updates then add up
to the true deltas minus the (bounded) current residual, so top-k and int8 do not drop signal
for good. Arithmetic and residuals are in fp32 (fp64 for fp64 tensors), so the rounding of the
compensated value back to the delta's dtype is fed back as well.

Residual stores share one interface; :class:`DiskResidualStore` keeps one safetensors file
per client so that thousands of clients need not sit in memory.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dpeft.codec.updates.base import UpdateCodec
from dpeft.state import AdapterState


class ResidualStore(ABC):
    """client id -> residual tensors (name -> tensor)."""

    @abstractmethod
    def get(self, client_id: str) -> OrderedDict[str, torch.Tensor] | None:
        """The stored residual, or None."""

    @abstractmethod
    def put(self, client_id: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace the client's residual."""

    @abstractmethod
    def delete(self, client_id: str) -> None:
        """Forget the client's residual (no error when there is none)."""

    @abstractmethod
    def clients(self) -> list[str]:
        """Ids with a stored residual, sorted."""


class MemoryResidualStore(ResidualStore):
    """Residuals in a dict (copies in and out, so callers cannot alias them)."""

    def __init__(self) -> None:
        self._data: dict[str, OrderedDict[str, torch.Tensor]] = {}

    def get(self, client_id: str) -> OrderedDict[str, torch.Tensor] | None:
        got = self._data.get(client_id)
        return None if got is None else OrderedDict((k, v.clone()) for k, v in got.items())

    def put(self, client_id: str, tensors: Mapping[str, torch.Tensor]) -> None:
        self._data[client_id] = OrderedDict((k, v.detach().cpu().clone()) for k, v in tensors.items())

    def delete(self, client_id: str) -> None:
        self._data.pop(client_id, None)

    def clients(self) -> list[str]:
        return sorted(self._data)


class DiskResidualStore(ResidualStore):
    """One ``<key>.safetensors`` file per client in ``directory`` (written atomically).

    The file name is the hex of the id's UTF-8 (or a SHA-256 for very long ids); the id
    itself is kept in the file's metadata, so any string is a valid client id.
    """

    SUFFIX = ".safetensors"

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path_for(self, client_id: str) -> Path:
        """Where ``client_id``'s residual lives."""
        raw = client_id.encode("utf-8", "surrogatepass")
        stem = raw.hex() if len(raw) <= 100 else "sha256-" + hashlib.sha256(raw).hexdigest()
        return self.directory / ("c-" + stem + self.SUFFIX)

    def get(self, client_id: str) -> OrderedDict[str, torch.Tensor] | None:
        path = self.path_for(client_id)
        if not path.exists():
            return None
        return OrderedDict(load_file(str(path)))

    def put(self, client_id: str, tensors: Mapping[str, torch.Tensor]) -> None:
        data = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=self.SUFFIX)
        os.close(fd)
        try:
            save_file(data, tmp, metadata={"client_id": client_id})
            os.replace(tmp, self.path_for(client_id))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def delete(self, client_id: str) -> None:
        self.path_for(client_id).unlink(missing_ok=True)

    def clients(self) -> list[str]:
        out = []
        for path in self.directory.glob("c-*" + self.SUFFIX):
            with safe_open(str(path), framework="pt") as f:
                cid = (f.metadata() or {}).get("client_id")
            if cid is not None:
                out.append(cid)
        return sorted(out)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class ErrorFeedback:
    """Wraps a codec with a per-client residual (see module doc)."""

    def __init__(self, codec: UpdateCodec, store: ResidualStore | None = None) -> None:
        self.codec = codec
        self.store = store if store is not None else MemoryResidualStore()

    def residual(self, client_id: str) -> OrderedDict[str, torch.Tensor] | None:
        """The client's current residual (fp32/fp64 tensors by name), or None."""
        return self.store.get(client_id)

    def reset(self, client_id: str) -> None:
        """Drop the client's residual (e.g. when it leaves or its adapter changes)."""
        self.store.delete(client_id)

    def encode(self, client_id: str, delta: AdapterState) -> AdapterState:
        """Encode ``delta`` plus the client's residual; store the new residual; return the wire state.

        A stored residual that does not match ``delta``'s names and shapes (a new adapter)
        is discarded.
        """
        floats = [n for n, t in delta.items() if t.dtype.is_floating_point]
        old = self.store.get(client_id)
        if old is not None and (
            sorted(old) != sorted(floats)
            or any(tuple(old[n].shape) != tuple(delta[n].shape) or old[n].dtype != _acc_dtype(delta[n].dtype) for n in floats)
        ):
            old = None
        comp_acc: dict[str, torch.Tensor] = {}
        comp = OrderedDict()
        for name, t in delta.items():
            if name in floats:
                acc = t.detach().cpu().to(_acc_dtype(t.dtype))
                if old is not None:
                    acc = acc + old[name]
                comp_acc[name] = acc
                comp[name] = acc.to(t.dtype)
            else:
                comp[name] = t
        wire = self.codec.encode(AdapterState(comp, dict(delta.meta)))
        back = self.codec.decode(wire, delta.schema())
        self.store.put(client_id, OrderedDict((n, comp_acc[n] - back[n].to(comp_acc[n].dtype)) for n in floats))
        return wire
