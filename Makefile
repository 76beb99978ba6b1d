# The two commands a new user needs: `make demo` and `make test`. Both create .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned so that pip takes the CPU build where one is provided locally
# (a plain `torch` would pull several GB of CUDA packages). Override for a GPU machine: make TORCH=torch
TORCH ?= torch==2.13.0
PYTEST_WORKERS ?= 2

.PHONY: install demo test clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/postrain run recipes/demo/pipeline.yaml

test: install
	$(PY) -m pytest -n $(PYTEST_WORKERS) tests

clean-venv:
	rm -rf $(VENV)
