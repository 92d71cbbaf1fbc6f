"""``fedkube compare``: is federation worth it for this job, and with which strategy?

Runs the federated job with the embedded runtime, then trains the same model
(same initialisation, optimiser and total number of local epochs: rounds x
epochs) centrally on the pooled training data, and on each tenant's data
alone, and evaluates all of them on the same held-out split, by the job's
headline metric (``spec.evaluation.metric``, higher or lower is better).

With ``--strategies a,b,c`` (and ``--seeds N``) it runs the same job once per
strategy and seed, changing only ``spec.strategy.name`` (and ``spec.seed``),
so the strategies see the same split, initialisation and budget; the
baselines depend on neither the strategy nor anything but the seed, so they
are trained once per seed. :mod:`.compare_report` turns the runs into the
tables and the plot without running anything, which keeps the arithmetic
testable on its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from fedkube.errors import SpecError
from fedkube.local.runner import RunOptions, run_job
from fedkube.spec import (
    Client,
    FederatedJob,
    WireCompression,
    dump_job,
    load_job,
    parse_job,
)
from fedkube.task import Role, TaskContext, load_task
from fedkube.tools.compare_report import (
    CompareReport,
    SeedBaselines,
    StrategyComparison,
    StrategyRun,
    default_target,
    metric_curves,
    plot_curves,
)
from fedkube.training import headline
from fedkube.training.learning import build_model, load_data


def _metric_of(job: FederatedJob, metrics: Mapping[str, float]) -> float:
    """The headline metric of one evaluation; a clear error when the task does not return it."""
    name = job.spec.evaluation.metric
    if name not in metrics:
        raise SpecError(
            [
                (
                    "spec.evaluation.metric",
                    f"{name!r} is not among the metrics the task's evaluate() returns "
                    f"({', '.join(sorted(metrics)) or 'none'})",
                )
            ]
        )
    return float(metrics[name])


def centralisedscore(job: FederatedJob, epochs: int) -> float:
    return _baselinescore(job, "pooled", None, epochs)


def tenant_alonescore(job: FederatedJob, tenant_index: int, epochs: int) -> float:
    """A tenant's whole data (all of its replicas' shares) and nobody else's."""
    name = job.spec.tenants[tenant_index].name
    whole = Client.whole_tenant(job.spec, tenant_index, id=f"{name}-alone")
    return _baselinescore(job, "train", whole, epochs)


def _baselinescore(job: FederatedJob, role: Role, client: Client | None, epochs: int) -> float:
    """One model trained by the job's task on one data set for ``epochs``; its headline
    metric on the held-out split (role ``test``)."""
    task = load_task(job)
    model = build_model(job, task)
    training = job.spec.training.model_copy(update={"epochs": epochs})
    ctx = TaskContext(job, role, seed=job.spec.seed, client=client, training_override=training)
    task.train(model, load_data(job, role, client, task=task), ctx)
    test = TaskContext(job, "test", seed=job.spec.seed)
    return _metric_of(job, task.evaluate(model, load_data(job, "test", task=task), test).metrics)


def compare(job_path: Path, out_dir: Path | None = None, quiet: bool = False) -> CompareReport:
    job = load_job(job_path)
    result = run_job(RunOptions(job_path=job_path, out_dir=out_dir, quiet=quiet))
    evaluated = headline.evaluated(result.history, job.spec.evaluation)
    epochs = job.spec.rounds * job.spec.training.epochs
    return CompareReport(
        job=job.name,
        federated_status=result.status,
        federated=evaluated[-1][1] if evaluated else None,
        central=centralisedscore(job, epochs),
        tenants={t.name: tenant_alonescore(job, i, epochs) for i, t in enumerate(job.spec.tenants)},
        epochs=epochs,
        strategy=job.spec.strategy.name,
        evaluation=job.spec.evaluation,
    )


def compression_setting(label: str) -> dict[str, Any]:
    """``spec.compression.up`` for a ``--compression`` entry.

    ``none``, ``fp16``, ``int8``, ``int8:<block size>``, ``topk`` (1 %) or
    ``topk:<fraction>``; checked by the spec's own model.
    """
    scheme, _, argument = label.partition(":")
    setting: dict[str, Any] = {"scheme": scheme}
    if argument and scheme == "topk":
        setting["fraction"] = float(argument)
    elif argument and scheme == "int8":
        setting["blockSize"] = int(argument)
    elif argument:
        raise ValueError(f"{label!r}: only int8:<block size> and topk:<fraction> take a value")
    WireCompression.model_validate(setting)
    return setting


def dp_setting(job: FederatedJob, label: str) -> dict[str, Any] | None:
    """``spec.privacy.dp`` for a ``--dp`` entry: ``none``, or a target ε for the whole job.

    The manifest's own ``privacy.dp`` block gives everything else (mode,
    clipNorm, delta); ``noiseMultiplier`` is then solved for the target.
    """
    if label == "none":
        return None
    epsilon = float(label)
    if not epsilon > 0:
        raise ValueError(f"{label!r}: a target epsilon must be positive")
    if job.spec.privacy.dp is None:
        raise SpecError(
            [
                (
                    "spec.privacy.dp",
                    "compare --dp varies its epsilon: the manifest must set it (mode, clipNorm)",
                )
            ]
        )
    setting = job.spec.privacy.dp.model_dump(mode="json", by_alias=True, exclude_none=True)
    setting.pop("noiseMultiplier", None)
    setting.pop("budget", None)
    setting["epsilon"] = epsilon
    return setting


def dp_label(label: str) -> str:
    """How a ``--dp`` entry is shown as a row."""
    return "no DP" if label == "none" else f"ε = {float(label):g}"


def variant(job: FederatedJob, label: str, seed: int, axis: str = "strategy") -> dict[str, Any]:
    """The job's manifest with only ``spec.seed`` and the compared setting replaced.

    ``axis`` ``strategy``: ``label`` is ``spec.strategy.name``; ``compression``:
    it is ``spec.compression.up`` (see :func:`compression_setting`); ``dp``: a
    target ε, or ``none`` (see :func:`dp_setting`). Built
    from the parsed model, so every other parameter (and every default) stays
    as the manifest had it.
    """
    document = dump_job(job)
    document["spec"]["seed"] = seed
    if axis == "strategy":
        document["spec"]["strategy"]["name"] = label
    elif axis == "compression":
        document["spec"]["compression"]["up"] = compression_setting(label)
    elif axis == "dp":
        document["spec"]["privacy"]["dp"] = dp_setting(job, label)
        if document["spec"]["privacy"]["dp"] is None:
            del document["spec"]["privacy"]["dp"]
    else:
        raise ValueError(f"unknown comparison axis {axis!r}")
    parse_job(document)  # an unknown strategy fails here, before anything runs
    return document


def seed_baselines(job: FederatedJob) -> SeedBaselines:
    """Centralised and every-tenant-alone headline metric, for the job's own seed."""
    epochs = job.spec.rounds * job.spec.training.epochs
    return SeedBaselines(
        seed=job.spec.seed,
        central=centralisedscore(job, epochs),
        tenants={t.name: tenant_alonescore(job, i, epochs) for i, t in enumerate(job.spec.tenants)},
    )


def compare_strategies(
    job_path: Path,
    strategies: Sequence[str],
    seeds: int = 1,
    out_dir: Path | None = None,
    target: float | None = None,
    quiet: bool = False,
    axis: str = "strategy",
) -> StrategyComparison:
    """Run the job once per (seed, variant); train the baselines once per seed.

    The variants are strategies, or with ``axis="compression"`` upload
    compressions (``none``, ``int8``, ``topk:0.01``: see
    :func:`compression_setting`), or with ``axis="dp"`` target epsilons and
    ``none`` (see :func:`dp_setting`). Seeds are ``spec.seed``, ``spec.seed + 1``,
    ... Each run gets its own directory ``<out>/seed-<seed>/<variant>/``
    holding its manifest (``manifest.yaml``) and the usual run outputs.
    ``target`` defaults to nearly the mean centralised metric (:func:`default_target`).
    """
    if not strategies:
        raise ValueError("compare_strategies needs at least one strategy")
    if seeds < 1:
        raise ValueError("compare_strategies needs at least one seed")
    job = load_job(job_path)
    out = (out_dir or Path("runs") / f"compare-{job.name}").resolve()
    seed_list = [job.spec.seed + offset for offset in range(seeds)]
    plan = {
        (seed, name): variant(job, name, seed, axis) for seed in seed_list for name in strategies
    }
    runs: list[StrategyRun] = []
    baselines: list[SeedBaselines] = []
    for seed in seed_list:
        for name in strategies:
            folder = f"epsilon-{name}" if axis == "dp" else name.replace(":", "-")
            run_dir = out / f"seed-{seed}" / folder
            run_dir.mkdir(parents=True, exist_ok=True)
            manifest = run_dir / "manifest.yaml"
            manifest.write_text(yaml.safe_dump(plan[seed, name], sort_keys=False))
            if not quiet:
                print(f"fedkube compare: {axis} {name}, seed {seed} -> {run_dir}", flush=True)
            result = run_job(RunOptions(job_path=manifest, out_dir=run_dir, quiet=quiet))
            if result.status == "interrupted":
                raise KeyboardInterrupt  # run_job swallowed the Ctrl-C; stop every run
            shown = dp_label(name) if axis == "dp" else name
            runs.append(StrategyRun(shown, seed, result.status, result.history, run_dir))
        if not quiet:
            print(f"fedkube compare: baselines, seed {seed}", flush=True)
        baselines.append(seed_baselines(parse_job(plan[seed, strategies[0]])))
    evaluation = job.spec.evaluation
    comparison = StrategyComparison(
        axis=axis,
        evaluation=evaluation,
        job=job.name,
        seeds=seed_list,
        rounds=job.spec.rounds,
        epochs_per_round=job.spec.training.epochs,
        runs=runs,
        baselines=baselines,
        target=default_target(baselines, evaluation) if target is None else target,
        target_is_default=target is None,
    )
    comparison.plot_path = plot_curves(
        metric_curves(runs, evaluation), out / "compare.png", job.name, baselines, evaluation
    )
    (out / "compare.txt").write_text(comparison.table() + "\n")
    return comparison
