# Two commands for a fresh machine: `make run` (the main job) and `make test`. Each creates or reuses the
# virtual environment .venv, installs torch==2.13.0 there when no torch is present (the CPU wheel), then
# fastpref itself with --no-build-isolation (so the build uses that torch) and the extras it needs.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastpref-installed
BUILD_INPUTS := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
PYTEST_ARGS ?=

.PHONY: run test bench install clean

run: $(STAMP)
	$(PY) -m fastpref demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks

install: $(STAMP)

$(STAMP): $(BUILD_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja numpy
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation -e ".[triton,train,test]"
	touch $(STAMP)

clean:
	rm -rf build fastpref/_C*.so *.egg-info
