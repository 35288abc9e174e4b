"""Former name of ``scripts/sync_config_reference.py``: the config reference now lives in
``docs/reference/config.md``. Kept so that ``python scripts/sync_readme_reference.py`` still works."""

from __future__ import annotations

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).resolve().parent / "sync_config_reference.py"), run_name="__main__")
