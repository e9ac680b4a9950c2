# Quick start: `make demo` and `make test` each set themselves up on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (a plain `torch` requirement could pull a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: help setup demo test lint typecheck check bench clean redis-server

help:
	@echo "make demo   - set up, pull the default model, start an embedded Valkey + worker, stream an answer"
	@echo "make test   - set up and run the whole test suite (CPU, starts its own servers)"
	@echo "make check  - ruff + mypy"
	@echo "make bench  - engine benchmark vs HF transformers (see benchmarks/)"

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[worker,gateway,dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/tokenfleet demo

test: setup
	@# Pull before collection so that tests parametrized over the real tokenizer see it.
	$(BIN)/tokenfleet models pull smollm2 --cache-dir .cache/tokenfleet-test
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

typecheck: setup
	@# mypy cannot follow the editable install's package-dir mapping: give it a symlink tree.
	@mkdir -p .typecheck/tokenfleet && for d in engine worker producer kernels; do ln -sfn ../../$$d .typecheck/tokenfleet/$$d; done
	MYPYPATH=.typecheck $(BIN)/mypy -p tokenfleet

check: lint typecheck

bench: setup
	$(BIN)/python benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
