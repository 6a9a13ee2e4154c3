# One-command entry points. CPU machines get the local CPU build of torch; on a GPU machine run
# `make venv TORCH=torch` first (PyPI's default Linux wheel is the CUDA build).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PYTHONUNBUFFERED = 1

.PHONY: venv demo test bench lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,bench]"
	touch $@

# Build the demo world + demo tagger, then run every pipeline stage on it.
demo: venv
	$(PY) -m flows.full_pipeline --config configs/demo.yaml

# The whole test suite (CPU, no network). CI runs exactly this.
test: venv
	$(PY) -m pytest -q

# Every benchmark script; each ends with a RESULT line.
bench: $(VENV)/.bench
	@set -e; for f in benchmarks/*.py; do echo "== $$f"; $(PY) $$f; done

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs shards/demo* $(VENV)
