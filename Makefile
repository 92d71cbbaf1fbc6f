# The README's commands. Each one installs what it needs first (scripts/setup.sh).
.PHONY: setup demo compare test lint bench bench-flower cluster

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/fedkube run examples/digits.yaml

compare: setup
	.venv/bin/fedkube compare examples/digits.yaml

# The tests in tests/cluster need the control-plane binaries; the build script
# skips what is up to date (a cold build takes about 16 minutes). The smoke test
# of benchmarks/vs_flower.py needs Flower's own virtualenv (.cache/flower-venv).
test: setup
	./scripts/build-control-plane.sh
	./scripts/install-prometheus.sh
	./scripts/flower-venv.sh
	.venv/bin/python -m pytest

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

# Every benchmark, full size. reconcile_latency.py runs the operator on the
# control plane that `make test` builds too (skipped when up to date). Each one
# has a smoke test in `make test`: --quick in tests/*/test_benchmarks.py, and a
# 100-round soak in tests/integration/test_soak.py.
bench: setup
	./scripts/build-control-plane.sh
	.venv/bin/python benchmarks/fold.py
	.venv/bin/python benchmarks/round_overhead.py
	.venv/bin/python benchmarks/strategies.py
	.venv/bin/python benchmarks/soak.py
	.venv/bin/python benchmarks/reconcile_latency.py
	.venv/bin/python benchmarks/secagg.py

# fedkube against Flower's simulation (flwr[simulation] 1.42), one run on this
# machine: a markdown table of round times, peak memory and start-up. Flower lives
# in its own virtualenv, .cache/flower-venv (it pins another ray than fedkube's).
bench-flower: setup
	./scripts/flower-venv.sh
	.venv/bin/python benchmarks/vs_flower.py

# A loopback Kubernetes control plane with kwok GPU nodes, up until Ctrl-C;
# it prints the `export KUBECONFIG=...` to use (tests/controlplane.py).
cluster: setup
	./scripts/build-control-plane.sh
	.venv/bin/python -m tests.controlplane
