# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine:
# they create .venv (if missing) and install the project with pinned torch wheels.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xbarflow-installed

.PHONY: install demo lint test test-slow test-numerics bench ui clean

# The venv takes about 6.5 GB (torch 2.14.1 with its CUDA libraries): a short disk is named
# up front instead of surfacing as pip's "No space left on device" half-way through.
$(STAMP): pyproject.toml constraints.txt
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); [ "$$free" -ge 7 ] || \
	  echo "warning: $$free GB free on this disk; installing .venv needs about 7 GB" >&2
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test,sweep]"
	touch $(STAMP)

install: $(STAMP)

# One technology-aware run of the default config (FCN 784-500-10 on the embedded
# 5,000-image MNIST subset, RRAM, 64x64 tiles, paper non-idealities), logged to ./mlflow.db.
demo: install
	$(PY) run.py

# ruff (pyflakes, pycodestyle, isort, bugbear; see pyproject.toml) on everything, mypy on the
# physics core and the layers. A finding fails `make test` and CI.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Lint, then the test suite (slow tests excluded) in one pytest-xdist worker per core, a file per worker
# (TEST_WORKERS=1 for one process; `logical` counts hardware threads, where `auto` would count
# physical cores once psutil is installed); about 15-18 minutes on 2 cores.
TEST_WORKERS ?= logical
test: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Long tests too (parallel-sweep race repetitions, ngspice on larger arrays, ...).
test-slow: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "slow or not slow"

# The numerical tests (marker `numerics`) again on another CPU code path: ATen's generic kernels
# instead of AVX2/AVX-512 and MKL held to SSE4.2, so other vector widths and matmul blockings.
# Float comparisons must hold to rounding on any CPU, not to the bits of the one they were written on.
test-numerics: install
	ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile \
	  -m "numerics and not slow"

bench: install
	$(PY) scripts/bench_crossbar.py
	$(PY) scripts/bench_wire.py

ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1

clean:
	rm -rf outputs multirun mlruns .pytest_cache
