"""The same job placed as Ray actors on a local Ray (``--runtime ray``), and the
resource requests that place each service (pure, no Ray running)."""

from __future__ import annotations

import json
import os

import pytest

from fedkube.errors import SpecError
from fedkube.local.ray_runtime import REGION_SHARE, SERVICE_CPUS, actor_options
from fedkube.spec import parse_job
from tests.support import SMALL_JOB, fedkube_cli, small_job_dict


@pytest.mark.integration
@pytest.mark.ray
def test_fedkube_run_on_ray_trains_to_completion(job_file, tmp_path):
    out = tmp_path / "run"
    done = fedkube_cli(
        "run",
        str(job_file(rounds=2)),
        "--runtime",
        "ray",
        "--out",
        str(out),
        timeout=480,
        env={**os.environ, "RAY_DISABLE_USAGE_STATS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "runtime ray" in done.stdout
    records = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["reported"] == 4 for r in records)
    # The services ran inside Ray actors and logged to the run directory.
    assert "round closed" in (out / "logs" / "global.log").read_text()
    assert "update sent" in (out / "logs" / "worker-a-0.log").read_text()


# Resources of alive nodes, as ray.nodes()[i]["Resources"] reports them.
LOCAL = [{"CPU": 2.0, "memory": 8e9, "node:127.0.0.1": 1.0}]
EU = {"CPU": 2.0, "region-eu": 8.0}
US = {"CPU": 2.0, "region-us": 8.0}
GLOBAL = ["aggregator", "--job", "job.yaml", "--host", "127.0.0.1"]


def combiner(region: str) -> list[str]:
    return ["combiner", "--job", "job.yaml", "--region", region, "--host", "127.0.0.1"]


def worker(client: str) -> list[str]:
    return ["worker", "--job", "job.yaml", "--client", client, "--host", "127.0.0.1"]


def gpu_job(gpus: int):
    """The small job with tenant ``a`` (region eu) asking ``gpus`` GPUs per worker."""
    tenants = [dict(t) for t in SMALL_JOB["spec"]["tenants"]]
    tenants[0]["resources"] = {"gpu": gpus}
    return parse_job(small_job_dict(tenants=tenants))


def test_actor_options_on_a_plain_ray_ask_only_for_a_little_cpu(small_job):
    plain = {"num_cpus": SERVICE_CPUS, "num_gpus": 0}
    assert actor_options(GLOBAL, small_job, LOCAL) == plain
    assert actor_options(combiner("eu"), small_job, LOCAL) == plain
    assert actor_options(worker("c-0"), small_job, LOCAL) == plain
    assert actor_options(worker("c-0"), small_job, []) == plain


def test_actor_options_pin_each_region_to_the_nodes_that_offer_it(small_job):
    nodes = [EU, US]
    assert "resources" not in actor_options(GLOBAL, small_job, nodes)
    for argv, region in [
        (combiner("eu"), "eu"),
        (worker("a-0"), "eu"),
        (worker("b-0"), "eu"),
        (combiner("us"), "us"),
        (worker("c-0"), "us"),
        (worker("d-0"), "us"),
    ]:
        options = actor_options(argv, small_job, nodes)
        assert options == {
            "num_cpus": SERVICE_CPUS,
            "num_gpus": 0,
            "resources": {f"region-{region}": REGION_SHARE},
        }, argv


def test_actor_options_fall_back_to_anywhere_for_a_region_no_node_offers(small_job):
    assert actor_options(worker("a-0"), small_job, [EU])["resources"] == {"region-eu": REGION_SHARE}
    assert "resources" not in actor_options(worker("c-0"), small_job, [EU])
    assert "resources" not in actor_options(combiner("us"), small_job, [EU])


def test_actor_options_ask_for_the_tenants_gpus():
    job = gpu_job(2)
    nodes = [{**EU, "GPU": 2.0}, US]
    assert actor_options(worker("a-0"), job, nodes) == {
        "num_cpus": SERVICE_CPUS,
        "num_gpus": 2,
        "resources": {"region-eu": REGION_SHARE},
    }
    assert actor_options(worker("b-0"), job, nodes)["num_gpus"] == 0  # same region, no GPU asked
    assert actor_options(combiner("eu"), job, nodes)["num_gpus"] == 0
    # No regions on the cluster: any node with the GPUs will do.
    assert actor_options(worker("a-0"), job, [{"CPU": 4.0}, {"CPU": 4.0, "GPU": 4.0}]) == {
        "num_cpus": SERVICE_CPUS,
        "num_gpus": 2,
    }


def test_actor_options_train_on_cpu_when_no_node_has_a_gpu():
    # As resources.gpu says: CUDA when one is present (a laptop's local Ray).
    assert actor_options(worker("a-0"), gpu_job(2), LOCAL)["num_gpus"] == 0
    assert actor_options(worker("a-0"), gpu_job(2), [EU, US]) == {
        "num_cpus": SERVICE_CPUS,
        "num_gpus": 0,
        "resources": {"region-eu": REGION_SHARE},
    }


@pytest.mark.parametrize(
    "nodes",
    [
        [{**EU, "GPU": 1.0}, US],  # fewer than asked
        [EU, {**US, "GPU": 8.0}],  # GPUs, but not in the tenant's region
    ],
)
def test_actor_options_name_the_field_when_no_node_can_give_the_gpus(nodes):
    with pytest.raises(SpecError) as caught:
        actor_options(worker("a-0"), gpu_job(2), nodes)
    (path, reason), *_ = caught.value.problems
    assert path == "spec.tenants[0].resources.gpu"
    assert "'a' asks 2 GPU(s)" in reason
