# `make demo` and `make test` each build .venv from nothing when it is missing, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# The pinned CPU build first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# LoraHub on the built-in zoo (`loraloom demo`); the LoRA walk-through is `loraloom demo lora`.
demo: $(STAMP)
	$(PY) -m loraloom demo

# No torchao (the `quant` extra, for int4 on CUDA): int8 needs none, and with torchao present transformers
# imports it on every model load (about half a second, and its import-time warnings).
test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/lora_train.py
	$(PY) benchmarks/fourierft.py
	$(PY) benchmarks/lorahub_vs_reference.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache demo_out
