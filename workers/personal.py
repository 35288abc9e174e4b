"""Per-client personal tensors on disk (fedsa_lora keeps each client's LoRA B factors here).

One safetensors-format file per client (written by :mod:`dpeft.codec`, never pickled), under
``train.personal_dir`` or ``<run_dir>/personal``. Files are replaced atomically, so a worker
killed mid-write leaves the previous version, and a restarted worker (or another worker
process of the same simulation) finds the client's tensors where it left them. Nothing stays
in memory between tasks.
"""

from __future__ import annotations

import os
from pathlib import Path

from dpeft.codec import decode_state, encode_state
from dpeft.errors import ProtocolError
from dpeft.state import AdapterState


class PersonalStore:
    """Loads and saves one AdapterState per client id."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, client_id: int) -> Path:
        """The file holding ``client_id``'s tensors."""
        return self.directory / f"client-{int(client_id)}.safetensors"

    def load(self, client_id: int) -> AdapterState | None:
        """The client's saved tensors, or None when it has none yet (or the file is unreadable)."""
        p = self.path(client_id)
        if not p.is_file():
            return None
        try:
            return decode_state(p.read_bytes())
        except ProtocolError:
            return None

    def save(self, client_id: int, state: AdapterState) -> None:
        """Atomically replace the client's tensors."""
        self.directory.mkdir(parents=True, exist_ok=True)
        p = self.path(client_id)
        tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
        tmp.write_bytes(encode_state(state))
        os.replace(tmp, p)
