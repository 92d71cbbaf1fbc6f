"""The bundled chest X-ray-like job in a whole federation: real Redis, real HTTP, PNGs on disk.

Six hospitals in two regions, each reading its own image files through the
task's ``Dataset``; the global tier evaluates on every site's test images,
every hospital on its own validation images, and the headline is mean AUROC.
A tenth of the example's data, so that it runs in seconds.
"""

from __future__ import annotations

import pytest

from fedkube.examples import chest
from fedkube.spec import dump_job, load_job, parse_job
from fedkube.training import headline
from tests.federation import federate
from tests.support import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]


async def test_six_hospitals_train_on_their_own_image_files_judged_by_mean_auroc(
    redis_server, tmp_path
):
    # prepare: the example's manifest, on a tenth of its images, for 3 rounds
    document = dump_job(load_job(ROOT / "examples" / "chest.yaml"))
    document["spec"]["rounds"] = 3
    document["spec"]["task"]["kwargs"].update(root=str(tmp_path / "data"), scale=0.1)
    job = parse_job(document)
    # execute
    outcome = await federate(job, redis_server.url, tmp_path / "run")
    # assert: the central side and every hospital evaluated every model by AUROC
    assert outcome.status == "succeeded", outcome
    findings = {f"auroc_{name}" for name in chest.FINDINGS}
    for record in outcome.history:
        assert record["metrics"].keys() <= findings | {"auroc", "loss"}
        assert {"auroc", "loss"} <= record["metrics"].keys()
        assert sorted(record["sites"]["tenants"]) == ["h1", "h2", "h3", "h4", "h5", "h6"]
        assert record["sites"]["examples"] == 6 * 10  # each hospital's validation images
    assert outcome.history[-1]["sites"]["final"]
    # the images were read from disk, and the model learned from them
    assert len(list((tmp_path / "data" / "h6" / "train").glob("*.png"))) == 15
    losses = [record["metrics"]["loss"] for record in outcome.history]
    assert losses[-1] < losses[0], losses
    assert headline.value(outcome.history[-1], job.spec.evaluation) is not None
