# One-command entry points. CPU machines get the local CPU build of torch and onnxruntime; on a GPU
# machine run `make venv TORCH=torch ORT=gpu` first (PyPI's default Linux torch wheel is the CUDA
# build; ORT=gpu installs onnxruntime-gpu instead of onnxruntime, never both).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
ORT    ?= cpu
PY      = $(VENV)/bin/python
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PYTHONUNBUFFERED = 1

.PHONY: venv demo test bench lint clean

venv: $(VENV)/.installed

# constraints.txt: the versions the demo's numbers were measured with (README); CONSTRAINTS= lifts them.
CONSTRAINTS ?= -c constraints.txt

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q $(CONSTRAINTS) -e ".[dev,$(ORT)]"
	touch $@

$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install -q $(CONSTRAINTS) -e ".[dev,$(ORT),bench]"
	touch $@

# Build the demo world + demo tagger, then run every pipeline stage on it.
demo: venv
	$(PY) -m flows.full_pipeline --config configs/demo.yaml

# Another CPU's numerics on this one: MKL, oneDNN and ATen held to SSE4.2-era kernels.
OTHER_ISA = MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 ATEN_CPU_CAPABILITY=default

# The whole test suite (CPU, no network; the 15 slowest listed: both passes must stay under 12 min on
# 2 cores, tests/README.md), two test modules at a time (pytest-xdist: one module's tests stay in one
# process, so its fixtures are shared), then the float-sensitive tests once more under another
# instruction set.
# Prints the wall time of both passes. CI runs exactly this.
test: venv
	@start=$$(date +%s); status=0; \
	echo "$(PY) -m pytest -q -n 2 --dist loadfile --durations=15"; \
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 || status=$$?; \
	if [ $$status -eq 0 ]; then \
		echo '$(OTHER_ISA) $(PY) -m pytest -q -m "numerics and not slow"'; \
		$(OTHER_ISA) $(PY) -m pytest -q -m "numerics and not slow" || status=$$?; \
	fi; \
	echo "make test: $$(( $$(date +%s) - start )) s wall, both passes (exit $$status)"; exit $$status

# Every benchmark script; each ends with a RESULT line.
bench: $(VENV)/.bench
	@set -e; for f in benchmarks/*.py; do echo "== $$f"; $(PY) $$f; done

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs shards/demo* $(VENV)
