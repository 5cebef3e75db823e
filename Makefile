# Two commands on a fresh machine:
#   make run    # set up, fetch the embedded model and data, run the main job
#   make test   # set up, fetch the assets, run the test suite
# Both create .venv; torch is installed first and only when missing (a CUDA torch
# already on the system python is reused through --system-site-packages).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
QT := $(VENV)/bin/qtuning
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup setup-dev assets run test test-numerics bench ui clean
.DEFAULT_GOAL := run

$(VENV)/.installed: pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "reusing the system torch ($$($(PYTHON) -c 'import torch; print(torch.__version__)'))"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; fi
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e ".[pipeline]"
	@touch $@

# the test tools (pytest, selenium, trl) only for the tests: `make run` installs none of them
# DeepSpeed compiles its CPU communication op (deepspeed_shm_comm) on its first ZeRO run, 35-50 s on 2 cores: it
# is built here once, into torch's extension cache, by the call DeepSpeed's torch backend makes (it builds nothing
# where DeepSpeed would not use it; best effort: without a C++ compiler the ZeRO test says what is missing).
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -e ".[pipeline,dev]"
	@$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" \
	  >/dev/null 2>&1 || echo "could not build DeepSpeed's CPU op (a C++ compiler?): its first ZeRO run will try again"
	@touch $@

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

assets: setup
	$(QT) assets

run: assets
	$(QT) run $(ARGS)

# The suite in TEST_WORKERS processes (pytest-xdist), a test file to a process: a module's fixtures (a server, a
# trained run) are built once. The files go out longest first (tests/conftest.py, LONGEST_FIRST), not in xdist's
# order by count of tests. TEST_WORKERS=0 runs it in this process alone.
# Torch's threads in each test process are its share of the cores (TEST_THREADS; as tasks/training.py gives each
# training process its share): two test processes of two threads each on two cores oversubscribe them, and
# an OpenMP thread spins waiting for a partner that the other process holds off the core (the suite took 11:42 and
# 12:19 that way on a 2-core AMD EPYC, 10:20 with one thread each). An OMP_NUM_THREADS already set wins; the thread
# counts themselves are `make test-numerics`'s business.
TEST_WORKERS ?= 2
TEST_THREADS ?= $(or $(OMP_NUM_THREADS),$(shell n=$$(nproc 2>/dev/null || echo 1); w=$(TEST_WORKERS); \
  [ "$$w" -gt 0 ] 2>/dev/null || w=1; t=$$((n / w)); echo $$((t > 0 ? t : 1))))
test: setup-dev assets
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(ARGS)

# The float-sensitive tests (marker `numerics`) as other CPUs run them: torch's kernels without AVX (default)
# and with AVX2 only, on 1 and 2 threads. A tolerance fitted to this CPU's rounding fails here first.
NUMERICS_KERNELS ?= default avx2
NUMERICS_THREADS ?= 1 2
test-numerics: setup-dev assets
	@set -e; for k in $(NUMERICS_KERNELS); do for t in $(NUMERICS_THREADS); do \
	  echo "== numerics: ATEN_CPU_CAPABILITY=$$k, $$t thread(s)"; \
	  ATEN_CPU_CAPABILITY=$$k OMP_NUM_THREADS=$$t $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m numerics -p no:cacheprovider $(ARGS); \
	done; done

bench: assets
	$(PY) -m qtuning.bench $(ARGS)

ui: setup
	$(QT) ui

clean:
	rm -rf $(VENV) runs
