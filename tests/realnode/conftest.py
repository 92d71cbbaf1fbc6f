"""Fixtures for tests on a real node (tests/node.py): containerd, kubelet, kube-proxy, CoreDNS.

One cluster with one node serves every test here (it takes about a minute to start, and
loading fedkube's images into it takes minutes the first time); each test gets its own
namespaces. The images are built first (scripts/build-images.sh: seconds when nothing
changed). Every test here is marked ``node``; ``pytest -m "not node"`` skips them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.node import HostState, NodeCluster, build_images, start_node_cluster

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.node)


@pytest.fixture(scope="session")
def node_cluster(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[NodeCluster]:
    """A control plane and a real node with fedkube's images loaded.

    Its stop is checked like a test: what the node changed on the host must be undone.
    """
    build_images()
    cluster = start_node_cluster(tmp_path_factory.mktemp("node"))
    # On the terminal even when the tests pass: how long the node and its images took.
    loads = ", ".join(f"{image} {s:.0f}s" for image, s in cluster.image_load_s.items())
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"node: up in {cluster.startup_s:.0f}s; images loaded: {loads}")
    try:
        yield cluster
    finally:
        left = cluster.stop()
    assert not left, f"the node left behind: {left}"


def host_differences(before: HostState, after: HostState) -> list[str]:
    """What differs between two captures of the host (empty: nothing)."""
    found = []
    if before.sysctls != after.sysctls:
        found.append(f"sysctls {before.sysctls} -> {after.sysctls}")
    for key, chains in after.chains.items():
        if chains != before.chains.get(key, set()):
            found.append(f"{key}: chains {sorted(chains ^ before.chains.get(key, set()))}")
    if after.nft_tables != before.nft_tables:
        found.append(f"nft tables {sorted(after.nft_tables ^ before.nft_tables)}")
    if after.netns != before.netns:
        found.append(f"network namespaces {sorted(after.netns ^ before.netns)}")
    if after.files != before.files:
        found.append(f"files {sorted(map(str, after.files ^ before.files))}")
    return found
