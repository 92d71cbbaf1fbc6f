"""The task API's boundary: what a task may return, how it is loaded, what its failures say."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from fedkube.errors import EntrypointError, SpecError
from fedkube.operator.config import DEFAULT_IMAGE
from fedkube.policy import check, check_central, parse_policy
from fedkube.spec import parse_job
from fedkube.task import MAX_METRICS, Result, Task, TaskContext, TaskFailed, check_result
from fedkube.training.learning import build_model, load_data
from tests.support import small_job_dict


@pytest.mark.parametrize(
    ("returned", "problem"),
    [
        ({"loss": 1.0}, "returned dict, not fedkube.task.Result"),
        (Result(examples=True), "examples is bool"),
        (Result(examples=2.5), "examples is float"),  # type: ignore[arg-type]
        (Result(examples=0), "examples is 0"),
        (Result(examples=-3), "examples is -3"),
        (Result(10, [("loss", 1.0)]), "metrics is list"),  # type: ignore[arg-type]
        (Result(10, {"loss": {"mean": 1.0}}), "metric 'loss' is dict, not a number"),
        (Result(10, {"loss": "0.3"}), "metric 'loss' is str"),
        (Result(10, {"loss": math.nan}), "metric 'loss' is nan, not finite"),
        (Result(10, {"auroc": -math.inf}), "metric 'auroc' is -inf, not finite"),
        (Result(10, {"Loss": 1.0}), "metric name 'Loss' is not [a-z][a-z0-9_]*"),
        (Result(10, {"val/loss": 1.0}), "metric name 'val/loss'"),
        (Result(10, {"a" * 64: 1.0}), "at most 63 characters"),
        (Result(10, {f"m{i}": 1.0 for i in range(MAX_METRICS + 1)}), "at most 16 names"),
    ],
)
def test_a_result_that_is_not_a_flat_bounded_map_of_finite_numbers_is_refused(returned, problem):
    with pytest.raises(TaskFailed) as caught:
        check_result(returned, "mine:Task", "train")
    assert problem in caught.value.first_line
    assert str(caught.value).startswith("task mine:Task: train: ")


def test_metrics_from_numpy_and_torch_scalars_become_floats():
    metrics = {"loss": np.float32(0.25), "auroc": torch.tensor(0.75), "seen": np.int64(3)}

    result = check_result(Result(examples=4, metrics=metrics), "mine:Task", "evaluate")

    assert result == Result(4, {"loss": 0.25, "auroc": 0.75, "seen": 3.0})
    assert all(type(v) is float for v in result.metrics.values())


def test_an_evaluation_may_see_no_examples_but_training_may_not():
    assert check_result(Result(examples=0), "t", "evaluate").examples == 0
    with pytest.raises(TaskFailed, match="needs at least one"):
        check_result(Result(examples=0), "t", "train")


def test_an_exception_in_the_users_code_is_reported_with_its_first_line_and_traceback():
    # prepare
    def train(model, data, ctx):
        raise ValueError("label column 'finding' is missing from train.csv")

    task = Task("hospital.xray:functions", types.SimpleNamespace(train=train), {})
    job = parse_job(small_job_dict())
    # execute
    with pytest.raises(TaskFailed) as caught:
        task.train(torch.nn.Linear(2, 2), None, TaskContext(job, "train"))
    # assert
    failed = caught.value
    assert failed.step == "train"
    assert failed.first_line == "ValueError: label column 'finding' is missing from train.csv"
    assert "Traceback" in failed.details and "def train" not in failed.first_line
    assert "in train" in failed.details


def test_a_task_class_is_built_with_the_specs_kwargs_and_a_module_is_used_as_it_is():
    class Mine:
        def __init__(self, width: int):
            self.width = width

        def train(self, model, data, ctx):
            return Result(1)

    built = Task("m:Mine", Mine, {"width": 3})
    module = Task("m", types.SimpleNamespace(train=lambda *a: Result(1)), {})

    assert built.target.width == 3 and not built.has("evaluate")
    assert module.has("train") and not module.has("model")
    with pytest.raises(EntrypointError, match="cannot build it"):
        Task("m:Mine", Mine, {"depth": 3})
    with pytest.raises(EntrypointError, match="is not a class, so it takes no kwargs"):
        Task("m", types.SimpleNamespace(train=lambda *a: Result(1)), {"width": 3})
    with pytest.raises(EntrypointError, match="has no train"):
        Task("m", types.SimpleNamespace(evaluate=lambda *a: Result(1)), {})


def test_a_job_without_a_task_needs_spec_model_and_a_data_entrypoint():
    document = small_job_dict()
    del document["spec"]["model"]
    del document["spec"]["data"]["entrypoint"]

    with pytest.raises(SpecError) as caught:
        parse_job(document)

    message = str(caught.value)
    assert "spec.model: required unless spec.task names a task that builds the model" in message
    assert "spec.data.entrypoint: required unless spec.task names a task" in message


def test_a_task_builds_the_model_and_loads_the_data_with_the_merged_kwargs():
    # prepare: the digits task of the examples, with a tenant's own data kwargs
    document = small_job_dict(
        task={"entrypoint": "fedkube.examples.digits_task:DigitsTask", "kwargs": {"hidden": 8}}
    )
    del document["spec"]["model"]
    del document["spec"]["data"]["entrypoint"]
    job = parse_job(document)
    # execute
    model = build_model(job)
    data = load_data(job, "train", job.clients()[0])
    # assert
    assert model[0].out_features == 8
    assert isinstance(data, torch.utils.data.TensorDataset) and 300 < len(data) < 400


def test_a_task_without_model_needs_spec_model_and_says_so():
    document = small_job_dict(task={"entrypoint": "fedkube.classifier:Classifier"})
    del document["spec"]["model"]
    job = parse_job(document)

    with pytest.raises(EntrypointError, match="spec.model: required, because task"):
        build_model(job)


@pytest.mark.parametrize(
    ("task", "spec", "field", "problem"),
    [
        ({}, {}, "spec.task", "set exactly one of entrypoint and script"),
        (
            {"entrypoint": "m:T", "script": "train.py"},
            {},
            "spec.task",
            "set exactly one of entrypoint and script",
        ),
        ({"script": "train.py"}, {"model": None}, "spec.model", "required with spec.task.script"),
        (
            {"script": "train.py"},
            {"simulation": {"clientsPerWorker": 4}},
            "spec.task.script",
            "a script hosts one client",
        ),
        ({"script": "train.py", "kwargs": {"a": 1}}, {}, "spec.task.kwargs", "takes args"),
        ({"entrypoint": "m:T", "args": ["--x"]}, {}, "spec.task.args", "only a script"),
        ({"script": "../x; rm -rf /"}, {}, "spec.task.script", "pattern"),
    ],
)
def test_a_task_is_either_an_entrypoint_or_a_script_with_the_model_it_needs(
    task, spec, field, problem
):
    document = small_job_dict(task=task, **spec)
    if spec.get("model", "keep") is None:
        del document["spec"]["model"]

    with pytest.raises(SpecError) as caught:
        parse_job(document)

    assert any(path == field and problem in why for path, why in caught.value.problems), (
        caught.value.problems
    )


@pytest.mark.parametrize(
    ("task", "field"),
    [
        ({"entrypoint": "hospital.xray:Task"}, "spec.task.entrypoint"),
        ({"script": "hospital.train"}, "spec.task.script"),
    ],
)
def test_a_sites_policy_checks_the_users_code_as_it_checks_the_model(task, field):
    # prepare: a site that admits the bundled examples only
    job = parse_job(small_job_dict(task=task))
    policy = parse_policy({"entrypoints": ["fedkube.examples."]})
    # execute
    refusals = check(job, policy, None, DEFAULT_IMAGE)
    central = check_central(job, ("fedkube.examples.", "hospital."))
    # assert: refused at the site for every tenant, naming the field; admitted centrally
    assert {r.field for r in refusals} == {field}
    assert len(refusals) == len(job.spec.tenants)
    assert "is not allowed at site" in refusals[0].message
    assert central == []
