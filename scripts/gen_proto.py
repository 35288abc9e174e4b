"""Regenerate dpeft/_proto from proto/ (``python scripts/gen_proto.py [--check]``).

Generated modules are committed; ``--check`` regenerates into a temp dir and exits 1 when the
committed files differ (run by a test, so a stale checkout fails CI). The generators' own version
stamps (``GRPC_GENERATED_VERSION``, the protobuf gencode version) are left out of the comparison:
a newer grpcio-tools writes the same code with a newer stamp, and the committed stamp is the one
that matters, since it is the lowest grpcio / protobuf the shipped code accepts at import.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "dpeft" / "_proto"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    rc = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *protos])
    if rc != 0:
        raise SystemExit(f"protoc failed with {rc}")
    files = []
    for path in sorted(out.rglob("*.py*")):
        text = path.read_text()
        # generated code imports `dpeft.v1`; it lives under `dpeft._proto.dpeft.v1`
        text = re.sub(r"^from dpeft\.v1 import", "from dpeft._proto.dpeft.v1 import", text, flags=re.M)
        path.write_text(text)
        files.append(path)
    dirs = {out}
    for p in files:
        d = p.parent
        while d != out.parent and d not in dirs:
            dirs.add(d)
            d = d.parent
    for pkg in sorted(dirs):
        init = pkg / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated protobuf code (do not edit; run scripts/gen_proto.py)."""\n')
    return files


#: the generators' version stamps: (pattern, what a stamp reads as in the comparison)
_STAMPS = [
    (re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M), "GRPC_GENERATED_VERSION = <stamp>"),
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: <stamp>"),
    (
        re.compile(r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,"),
        r"\1 <stamp>,",
    ),
]


def comparable(text: str) -> str:
    """Generated code with the generators' version stamps blanked out."""
    for pattern, repl in _STAMPS:
        text = pattern.sub(repl, text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when the committed code is stale")
    args = parser.parse_args()
    if not args.check:
        generate(OUT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "_proto"
        generate(fresh)
        stale = []
        for path in sorted(fresh.rglob("*.py*")):
            committed = OUT / path.relative_to(fresh)
            if not committed.exists() or comparable(path.read_text()) != comparable(committed.read_text()):
                stale.append(str(committed.relative_to(ROOT)))
        if stale:
            print("generated protobuf code is stale: " + ", ".join(stale) + "; run python scripts/gen_proto.py", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
