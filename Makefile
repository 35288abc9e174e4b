# Two commands on a fresh machine with Python 3.11: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.docs-installed

.PHONY: install run test lint docs proto bench clean

$(STAMP): pyproject.toml requirements-embedded.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or make PYTHON=python3)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch first (a bare `torch` could pull a multi-GB CUDA build)
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps -r requirements-embedded.txt
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/dpeft simulate $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check dpeft coordinator workers launch tests benchmarks scripts
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

# The documentation site (mkdocs.yml, pages under docs/) in strict mode: a broken link, a missing
# page or a page left out of the navigation fails the build. Output in site/.
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

proto: $(STAMP)
	$(PY) scripts/gen_proto.py

bench: $(STAMP)
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/transport_throughput.py
	$(PY) benchmarks/aggregation.py
	$(PY) benchmarks/codecs.py
	$(PY) benchmarks/scale.py
	$(PY) benchmarks/worker_memory.py
	$(PY) benchmarks/multi_lora.py
	$(PY) benchmarks/flower/compare.py
	$(PY) benchmarks/llm.py --variants fp32,bf16,nf4

clean:
	rm -rf $(VENV) runs .pytest_cache site dist build
