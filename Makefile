# The two Quickstart commands: `make demo` and `make test`. Both set up .venv first.
PY := .venv/bin/python

.PHONY: setup demo test test-fast bench
setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m deltatune demo

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

bench: setup
	bash bench/setup_peers.sh
	$(PY) bench/run.py
