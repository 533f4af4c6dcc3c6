# Two commands on a fresh CPU machine (see README.md):
#   make train   build the default CPython-stdlib corpus, train the tiny-cpu model, report perplexity
#   make test    the test suite
# Each creates the virtual environment in .venv first if needed.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch: a bare `torch` would pull several GB of CUDA packages on a CPU machine.
TORCH  ?= torch==2.13.0

.PHONY: setup train test

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt "$(TORCH)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

train: setup
	$(VENV)/bin/megatron-memorizing-data build
	$(VENV)/bin/megatron-memorizing-train --config configs/tiny-cpu.yaml

test: setup
	$(PY) -m pytest -q
