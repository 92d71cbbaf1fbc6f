"""``fedkube compare``: is federation worth it for this job?

Runs the federated job with the embedded runtime, then trains the same model
(same initialisation, optimiser and total number of local epochs: rounds x
epochs) centrally on the pooled training data, and on each tenant's data
alone, and evaluates all of them on the same held-out split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedkube.learning import build_model, evaluate, load_data, train
from fedkube.local.runner import RunOptions, run_job
from fedkube.spec import Client, FederatedJob, load_job


@dataclass
class CompareReport:
    job: str
    federated_status: str
    federated_accuracy: float | None
    central_accuracy: float
    tenant_accuracy: dict[str, float] = field(default_factory=dict)
    epochs: int = 0

    def table(self) -> str:
        fed = self.federated_accuracy
        best_name = max(self.tenant_accuracy, key=self.tenant_accuracy.__getitem__)
        best = self.tenant_accuracy[best_name]
        rows = [
            ("federated (FedAvg)", fed),
            ("centralised, pooled data", self.central_accuracy),
            (f"best tenant alone ({best_name})", best),
        ]
        lines = [
            f"fedkube compare {self.job}: held-out accuracy, {self.epochs} local epochs "
            "of training for every model",
            "",
        ]
        lines += [
            f"  {name:<40} {'n/a' if acc is None else f'{100 * acc:6.2f}%'}" for name, acc in rows
        ]
        lines.append("")
        lines += [
            f"    {name:<38} {100 * acc:6.2f}%"
            for name, acc in sorted(self.tenant_accuracy.items())
        ]
        if fed is not None:
            gap = 100 * (self.central_accuracy - fed)
            lines += [
                "",
                f"  gap to centralised: {gap:+.2f} points; federated beats every "
                f"tenant alone: {'yes' if fed > best else 'no'}",
            ]
        return "\n".join(lines)


def centralised_accuracy(job: FederatedJob, epochs: int) -> float:
    model = build_model(job)
    train(model, load_data(job, "pooled"), job.spec.training, job.spec.seed, epochs=epochs)
    return evaluate(model, load_data(job, "test"))[1]


def tenant_alone_accuracy(job: FederatedJob, tenant_index: int, epochs: int) -> float:
    """A tenant's whole data (all of its replicas' shares) and nobody else's."""
    tenant = job.spec.tenants[tenant_index]
    whole = Client(
        id=f"{tenant.name}-alone",
        tenant=tenant.name,
        region=tenant.region,
        replica=0,
        replicas=1,
        tenant_index=tenant_index,
        num_tenants=len(job.spec.tenants),
    )
    model = build_model(job)
    train(model, load_data(job, "train", whole), job.spec.training, job.spec.seed, epochs=epochs)
    return evaluate(model, load_data(job, "test"))[1]


def compare(job_path: Path, out_dir: Path | None = None, quiet: bool = False) -> CompareReport:
    job = load_job(job_path)
    result = run_job(RunOptions(job_path=job_path, out_dir=out_dir, quiet=quiet))
    evaluated = [r for r in result.history if r.get("accuracy") is not None]
    epochs = job.spec.rounds * job.spec.training.epochs
    return CompareReport(
        job=job.name,
        federated_status=result.status,
        federated_accuracy=evaluated[-1]["accuracy"] if evaluated else None,
        central_accuracy=centralised_accuracy(job, epochs),
        tenant_accuracy={
            t.name: tenant_alone_accuracy(job, i, epochs) for i, t in enumerate(job.spec.tenants)
        },
        epochs=epochs,
    )
