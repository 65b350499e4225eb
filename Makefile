# Two commands for a fresh machine: `make demo` and `make test`.
# Everything is installed into .venv; running them again reuses it and the data.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# cpu or cuda; detected from nvidia-smi unless given (make demo DEVICE=cpu).
DEVICE ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
TORCH_VERSION := 2.13.0
TORCHREC_VERSION := 1.8.0
FBGEMM_VERSION := 1.8.0
# PyTorch's CPU-only wheel index: on a CPU machine torch comes from here (or from a
# local wheel), never from PyPI's default CUDA build.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO_DATA := data/synth-criteo
DEMO_ROWS ?= 1000000
STAMP := $(VENV)/.stamp-installed-$(DEVICE)

.PHONY: setup demo test data lint docs bench clean doctor

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "== installing pinned stack for $(DEVICE) into $(VENV) (once)"
	$(PIP) install -q --upgrade pip setuptools wheel 2>&1 | grep -v "is ignored" || true
ifeq ($(DEVICE),cuda)
	$(PIP) install -q torch==$(TORCH_VERSION) fbgemm-gpu==$(FBGEMM_VERSION)
else
	@# A local CPU wheel if this machine has one, else PyTorch's CPU index; then the
	@# ordinary dependencies of torch from PyPI (torch itself is already satisfied).
	$(PIP) install -q --no-deps --no-index torch==$(TORCH_VERSION) 2>/dev/null \
	  || $(PIP) install -q --no-deps torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX)
	$(PIP) install -q torch==$(TORCH_VERSION) fbgemm-gpu-cpu==$(FBGEMM_VERSION) 2>&1 | grep -v "is ignored" || true
endif
	@# torchrec's wheel requires the GPU fbgemm-gpu: install it alone, its real
	@# run-time dependencies are listed in pyproject.toml.
	$(PIP) install -q --no-deps torchrec==$(TORCHREC_VERSION) 2>&1 | grep -v "is ignored" || true
	$(PIP) install -q -e '.[dev]' 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import torch, torchrec, fbgemm_gpu; assert torch.__version__.startswith('$(TORCH_VERSION)'), torch.__version__"
	@touch $@

$(DEMO_DATA)/schema.json: | $(STAMP)
	$(VENV)/bin/embtables data synth --rows $(DEMO_ROWS) --out $(DEMO_DATA) --seed 0

data: $(DEMO_DATA)/schema.json

demo: setup data
	$(VENV)/bin/embtables run quickstart

# The layer contract (import-linter, pyproject.toml), the documentation site, then the tests.
test: setup
	$(VENV)/bin/ruff check embtables tests bench docs examples
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir $(CURDIR)/site
	$(PY) -m pytest -q

docs: setup
	$(VENV)/bin/mkdocs build --strict --site-dir $(CURDIR)/site

lint: setup
	$(VENV)/bin/ruff check embtables tests bench docs examples

doctor: setup
	$(VENV)/bin/embtables doctor

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) data runs site bench/results
