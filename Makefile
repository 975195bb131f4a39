# Day-to-day commands; run `python3 -m venv .venv && .venv/bin/pip install -r requirements-cpu.txt -e ".[test]"` first.
# VENV=/path/to/venv picks another environment.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test lint bench gpu-check demo

test:  ## the whole suite, one process per core
	$(PY) -m pytest -q -n auto

lint:  ## ruff over the tree, mypy over specdec/ (configured in pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench:  ## kernel micro-benchmarks (pytest-benchmark)
	$(PY) -m pytest bench/ --benchmark-only

gpu-check:  ## kernels and engine on a CUDA device
	PYTHONPATH=. $(PY) bench/gpu_check.py

demo:  ## speculative decoding on the embedded demo pair
	$(VENV)/bin/specdec demo
