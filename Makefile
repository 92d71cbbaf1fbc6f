# The README's commands. Each one installs what it needs first (scripts/setup.sh).
.PHONY: setup demo compare test lint bench bench-flower fuzz cluster cluster-kwok images

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/fedkube run examples/digits.yaml

compare: setup
	.venv/bin/fedkube compare examples/digits.yaml

# The tests in tests/cluster need the control-plane binaries, those in tests/node
# the node's (kubelet, containerd, CoreDNS, a registry) and fedkube's images; each
# script skips what is up to date (cold: about 16, 10 and 12 minutes). The smoke
# test of benchmarks/vs_flower.py needs Flower's own virtualenv (.cache/flower-venv).
test: setup
	./scripts/build-control-plane.sh
	./scripts/build-node.sh
	./scripts/build-images.sh
	./scripts/install-prometheus.sh
	./scripts/flower-venv.sh
	.venv/bin/python -m pytest

# fedkube's images (podman, from a Debian base the script makes; no registry needed).
images:
	./scripts/build-images.sh

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
	.venv/bin/python benchmarks/hostile_load.py

# The decoders of what a tenant or a site sends (safetensors, compressed updates, secure
# aggregation's messages, signatures, JSON bodies, manifests, policies), fuzzed with
# hypothesis' long profile: 25 times the inputs `make test` tries (tests/fuzz, profile ci),
# each test's count printed. About four minutes here.
fuzz: setup
	FEDKUBE_FUZZ_PROFILE=long .venv/bin/python -m pytest tests/fuzz -q -p no:cacheprovider --hypothesis-show-statistics

# fedkube against Flower's simulation (flwr[simulation] 1.42), one run on this
# machine: a markdown table of round times, peak memory and start-up. Flower lives
# in its own virtualenv, .cache/flower-venv (it pins another ray than fedkube's).
bench-flower: setup
	./scripts/flower-venv.sh
	.venv/bin/python benchmarks/vs_flower.py

# A Kubernetes cluster on this machine with one real node (containerd, kubelet,
# kube-proxy, CoreDNS) and fedkube's images loaded, up until Ctrl-C; it prints the
# `export KUBECONFIG=...` to use (tests/node.py; needs root).
cluster: setup
	./scripts/build-control-plane.sh
	./scripts/build-node.sh
	./scripts/build-images.sh
	.venv/bin/python -m tests.node --no-build

# The control plane alone, with kwok's fake GPU nodes (scale tests; nothing runs).
cluster-kwok: setup
	./scripts/build-control-plane.sh
	.venv/bin/python -m tests.controlplane
