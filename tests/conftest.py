"""Shared fixtures: a real redis-server, small job manifests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fedkube.spec import FederatedJob, parse_job
from fedkube.state.redis_server import RedisServer
from tests.support import small_job_dict


@pytest.fixture
def job_file(tmp_path: Path) -> Callable[..., Path]:
    """Write a small manifest (with overrides) to a file and return its path."""

    def write(name: str = "small", **spec_overrides: Any) -> Path:
        document = small_job_dict(**spec_overrides)
        document["metadata"]["name"] = name
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(document))
        return path

    return write


@pytest.fixture
def small_job() -> FederatedJob:
    return parse_job(small_job_dict())


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, stopped after the test."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Many in-process workers share two cores: one intra-op thread each, as the
    runner gives each worker process its share."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
