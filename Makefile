# The README's commands. Each one installs what it needs first (scripts/setup.sh).
.PHONY: setup demo compare test lint bench

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/fedkube run examples/digits.yaml

compare: setup
	.venv/bin/fedkube compare examples/digits.yaml

test: setup
	.venv/bin/python -m pytest

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

bench: setup
	.venv/bin/python benchmarks/fold.py && .venv/bin/python benchmarks/round_overhead.py
