"""The reconcile-latency benchmark still runs: ``--quick``, to the end, with its table.

It starts its own control plane (as ``make bench`` does), so it needs the
binaries that ``make test`` builds first, hence its place under tests/cluster;
the other benchmarks' smoke tests are in tests/integration/test_benchmarks.py.
"""

from __future__ import annotations

from tests.integration.test_benchmarks import figure_rows, run_benchmark, table_rows


def test_reconcile_latency_benchmark_times_every_job_size_to_the_end():
    output = run_benchmark("reconcile_latency.py", "--quick", timeout=600)
    rows = table_rows(output, "children: median")
    for tenants in ("2", "4"):
        assert figure_rows(rows, tenants), f"no figures for {tenants} tenants in:\n{output}"
