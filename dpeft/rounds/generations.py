"""``generations.jsonl``: a few sample generations of each evaluated round, for a person to read.

One JSON object per line: ``round``, ``prompt``, ``reference``, ``answer``, ``correct``. An
evaluation hands its samples over inside its metrics under :data:`GENERATIONS_KEY`; the
recorder moves them here when it writes the round's metrics line (so they never reach
``metrics.jsonl``, and a round restored from its checkpoint brings its samples back).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: the key under which an evaluation's sample generations travel with a round's row
GENERATIONS_KEY = "_generations"


class GenerationsLog:
    """Appends sample generations to ``<run_dir>/generations.jsonl``; drops rounds that will be redone."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "generations.jsonl"

    def append(self, round_num: int, samples: list[dict[str, Any]]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            for sample in samples:
                fh.write(json.dumps({"round": round_num, **sample}, ensure_ascii=False) + "\n")
            fh.flush()

    def rows(self) -> list[dict[str, Any]]:
        """The rows on disk (a torn last line is ignored)."""
        out: list[dict[str, Any]] = []
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        break
        return out

    def truncate_after(self, round_num: int) -> None:
        """Keep only rows of rounds up to ``round_num`` (a negative round: none; the file goes)."""
        if not self.path.exists():
            return
        if round_num < 0:
            self.path.unlink()
            return
        kept = [r for r in self.rows() if r.get("round", 0) <= round_num]
        self.path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
