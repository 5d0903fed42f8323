# Quick start: `make serve` (set up, then run the main job) and `make test` (set up, then test).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Where torch comes from. Empty: pip's configured index (PyPI's torch==2.13.0 on Linux is the CUDA
# build, several GB, unless a CPU wheel is already provided locally). For a CPU-only install:
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: setup serve test test-gpu-visible lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# pinned: an unpinned or newer torch would pull a newer multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# cuda: triton (~290 MB wheel, no torch dependency): its kernels are tested on CPU under TRITON_INTERPRET=1
	$(PY) -m pip install -q -e '.[dev,cuda,cluster]'
	@touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/matrixinfer serve

# mypy (~50 s of one core) runs beside the tests at the lowest priority: the suite keeps about one of
# two cores busy on average, so it takes the idle one instead of adding its time to the run
test: $(STAMP)
	$(VENV)/bin/ruff check matrixinfer tests benchmarks
	@log=$$(mktemp); nice -n 19 $(VENV)/bin/mypy matrixinfer > $$log 2>&1 & mypy=$$!; \
	$(PY) -m pytest -q; rc=$$?; \
	if wait $$mypy; then cat $$log; rm -f $$log; else cat $$log; rm -f $$log; exit 1; fi; exit $$rc

# the suite as a GPU machine runs it: every process sees torch.cuda.is_available() as True (tests/gpu_visible)
test-gpu-visible: $(STAMP)
	MATRIXINFER_TEST_PRETEND_GPU=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check matrixinfer tests benchmarks
	$(VENV)/bin/mypy matrixinfer

clean:
	rm -rf $(VENV) build *.egg-info
