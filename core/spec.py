"""The FederatedJob spec: one typed model, the single source of truth.

The same manifest YAML is read by ``fedkube run`` (embedded runtime), by the
Ray runtime and by the operator; the CRD schema (and the chart's copy) is derived from these
models. Field names on the wire are camelCase, as Kubernetes users expect;
Python code uses snake_case attributes.

Validation happens here, at the boundary: an invalid manifest raises
:class:`~fedkube.errors.SpecError` listing every problem with its field path
(``spec.tenants[1].region``) and the reason.

Over 400 lines on purpose, like Kubernetes' own ``types.go``: one API version's
types in one file, in the order a manifest reads, because their field
descriptions are the CRD's and the README's reference (``fedkube.tools.specdoc``);
the cross-field rules follow the model they check, and :func:`parse_job` is the
one way in.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from fedkube.errors import SpecError

API_VERSION = "fedkube.io/v1alpha1"
KIND = "FederatedJob"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Child objects are named from these (``<job>-combiner-<region>`` must stay a
# 63-character DNS label), so the limits are part of the contract.
MAX_JOB_NAME = 30
MAX_TENANT_NAME = 30
MAX_REGION_NAME = 20
MAX_TENANTS = 1000
MAX_REGIONS = 50
# Worker processes (pods) per tenant; each hosts one client, or under
# spec.simulation up to clientsPerWorker virtual clients.
MAX_WORKERS_PER_TENANT = 1000
MAX_REPLICAS = 100_000
# Under secure aggregation a region needs this many clients: with two, each
# could subtract its own update from the sum and learn the other's.
MIN_SECURE_REGION = 3
ENTRYPOINT = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
# A Client API script: a module, or a .py file (in the image, on a pod).
SCRIPT = r"^([A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*|[A-Za-z0-9_./-]+\.py)$"
# A metric's name: a Prometheus label value and a column, bounded and plain (fedkube.task).
METRIC_NAME = r"^[a-z][a-z0-9_]{0,62}$"
# Metric names one result may carry: a tenant cannot blow up the series count.
MAX_METRICS = 16
# A task may also be a bare module whose functions are the task.
TASK_ENTRYPOINT = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(:[A-Za-z_][A-Za-z0-9_]*)?$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$"


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class Entrypoint(_Model):
    """A ``module:callable`` reference plus keyword arguments for it."""

    entrypoint: str = Field(pattern=ENTRYPOINT, description="`module.path:callable`")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for it")


class PartitionScheme(str, Enum):
    iid = "iid"
    dirichlet = "dirichlet"


class Partition(_Model):
    """How the built-in example data is split across tenants.

    Real deployments point each tenant at its own data (``tenants[].data``);
    the partition then only matters for simulated tenants.
    """

    scheme: PartitionScheme = Field(
        default=PartitionScheme.iid, description="how simulated tenants split the data set"
    )
    alpha: float = Field(
        default=0.5, gt=0, description="Dirichlet concentration (smaller: more label skew)"
    )


class TaskSpec(_Model):
    """The user's code: a task (fedkube.task), or a script of the Client API (fedkube.client)."""

    entrypoint: str | None = Field(
        default=None,
        pattern=TASK_ENTRYPOINT,
        description="`module.path:Class` (built with kwargs), `module.path:object` or "
        "`module.path` whose train(), and optionally model(), data() and evaluate(), "
        "are the task (unset: the built-in classifier over spec.model and spec.data)",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments for the task's class"
    )
    script: str | None = Field(
        default=None,
        pattern=SCRIPT,
        max_length=512,
        description="a training script of the Client API (fedkube.client) that keeps its own "
        "main(): a module run as __main__, or a .py file; the worker runs it in a thread",
    )
    args: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="the script's command-line arguments (sys.argv[1:])",
    )


class ModelSpec(Entrypoint):
    """``module:callable`` returning the ``torch.nn.Module`` (unless spec.task builds it)."""


class DataSpec(_Model):
    entrypoint: str | None = Field(
        default=None,
        pattern=ENTRYPOINT,
        description="`module.path:callable` (context, **kwargs) -> data; unset when "
        "spec.task's data() loads it",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="keyword arguments for the data factory (or spec.task's data())",
    )
    partition: Partition = Field(default_factory=Partition)
    test_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="held-out share that the global tier evaluates on"
    )


class Region(_Model):
    name: str = Field(
        pattern=DNS_LABEL,
        max_length=MAX_REGION_NAME,
        description="DNS label; one combiner per region",
    )


class Resources(_Model):
    cpu: str | None = Field(default=None, pattern=QUANTITY, description="Kubernetes quantity")
    memory: str | None = Field(default=None, pattern=QUANTITY, description="Kubernetes quantity")
    gpu: int = Field(
        default=0, ge=0, description="GPUs per worker; trains on CUDA when > 0 and one is present"
    )

    @field_validator("cpu", mode="before")
    @classmethod
    def _number_to_string(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int | float) else value


class TenantData(_Model):
    """Per-tenant overrides of the data factory's kwargs (e.g. a local path)."""

    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="merged over spec.data.kwargs for this tenant's workers"
    )


class Toleration(_Model):
    """A Kubernetes toleration for the tenant's worker pods."""

    key: str | None = Field(default=None, max_length=253)
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = Field(default=None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, ge=0)


class Tenant(_Model):
    name: str = Field(
        pattern=DNS_LABEL, max_length=MAX_TENANT_NAME, description="DNS label, unique"
    )
    region: str = Field(
        pattern=DNS_LABEL, max_length=MAX_REGION_NAME, description="one of spec.regions"
    )
    site: str | None = Field(
        default=None,
        pattern=DNS_LABEL,
        max_length=63,
        description="the site whose operator runs this tenant's workers (`fedkube operator "
        "--site`); unset: the central operator runs them",
    )
    replicas: int = Field(
        default=1,
        ge=1,
        le=MAX_REPLICAS,
        description="clients of this tenant; they split its data. One worker (pod) each, "
        f"at most {MAX_WORKERS_PER_TENANT}; under spec.simulation they are virtual clients, "
        "clientsPerWorker to a worker process",
    )
    resources: Resources = Field(default_factory=Resources)
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="nodeSelector of the tenant's worker pods"
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=20, description="tolerations of its worker pods"
    )
    priority_class_name: str | None = Field(
        default=None, max_length=253, description="priorityClassName of its worker pods"
    )
    data: TenantData = Field(default_factory=TenantData)
    max_weight: int | None = Field(
        default=None,
        ge=1,
        description="the most samples one of this tenant's clients may claim as its update's "
        "weight; an update above it is refused (weight_above_cap). Unset: "
        "spec.participation.maxWeight",
    )


class Optimizer(str, Enum):
    sgd = "sgd"
    adam = "adam"


class Lora(_Model):
    """Low-rank adapters (the ``peft`` library): only they train and travel."""

    rank: int = Field(default=8, ge=1, le=1024, description="r, the adapters' rank")
    alpha: float = Field(
        default=16.0, gt=0, description="lora_alpha (the update is scaled by alpha/r)"
    )
    dropout: float = Field(default=0.0, ge=0, lt=1, description="lora_dropout")
    target_modules: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="names of the modules to adapt (peft's target_modules); empty: peft's "
        "default for the model's architecture",
    )


class Training(_Model):
    epochs: int = Field(default=1, ge=1, le=1000, description="local epochs per round")
    batch_size: int = Field(default=32, ge=1)
    optimizer: Optimizer = Optimizer.sgd
    learning_rate: float = Field(default=0.05, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1, description="SGD momentum")
    peft: Lora | None = Field(
        default=None,
        description="fine-tune low-rank adapters instead of the whole model: the frozen base "
        "is loaded once per worker and never sent",
    )


class Participation(_Model):
    """Who takes part in a round, and when a round may close.

    ``fraction`` of all clients is selected each round (seeded, reproducible).
    A round opens once a quorum of its selected clients has registered (a
    worker registers by polling its combiner), so that slow starts do not eat
    into the round's deadline. A round closes as soon as every selected client reported, or at its
    deadline if at least ``minClients`` (or ``minFraction`` of the selected)
    reported; otherwise ``onQuorumMissed`` decides: extend the deadline (at
    most ``maxExtensions`` times) or fail the job.
    """

    fraction: float = Field(
        default=1.0, gt=0, le=1, description="share of clients selected per round"
    )
    min_clients: int | None = Field(
        default=None, ge=1, description="quorum as a count (overrides minFraction)"
    )
    min_fraction: float = Field(
        default=0.5, gt=0, le=1, description="quorum as a share of the selected clients"
    )
    round_timeout_seconds: float = Field(
        default=60.0, gt=0, description="deadline after a round opens"
    )
    start_timeout_seconds: float = Field(
        default=600.0,
        gt=0,
        description="how long a round waits for a quorum of its "
        "selected clients to have registered before it opens; then the job fails",
    )
    on_quorum_missed: Literal["extend", "fail"] = Field(
        default="extend", description="at a deadline without quorum"
    )
    max_extensions: int = Field(
        default=3, ge=0, description="deadline extensions before the job fails"
    )
    max_weight: int | None = Field(
        default=None,
        ge=1,
        description="the most samples any client may claim as its update's weight (a "
        "weight is a claim: capped, one client cannot outweigh the rest); a tenant's "
        "maxWeight overrides it",
    )
    registration_ttl_seconds: float = Field(
        default=300.0,
        gt=0,
        description="a client that has not polled its combiner for this long is gone: "
        "rounds no longer wait for it until it polls again (keep it above the round timeout)",
    )


CompressionScheme = Literal["none", "fp16", "int8", "topk"]


class WireCompression(_Model):
    """How one direction's payloads are compressed (``fedkube.wire.compression``)."""

    scheme: CompressionScheme = Field(
        default="none", description="none, fp16, int8, or topk (updates only)"
    )
    block_size: int | None = Field(
        default=None,
        ge=16,
        le=1 << 24,
        description="int8: values that share one scale; unset: one scale per tensor",
    )
    stochastic_rounding: bool = Field(
        default=False, description="int8: round up or down at random in proportion (unbiased)"
    )
    fraction: float = Field(
        default=0.01,
        gt=0,
        le=1,
        description="topk: share of the update's entries sent (the largest, across all tensors)",
    )
    error_feedback: bool = Field(
        default=True,
        description="topk: add what was not sent to the next update (kept in the client's "
        "durable state)",
    )


class Compression(_Model):
    """Per direction: ``up`` (worker updates), ``down`` (the model to the workers)."""

    up: WireCompression = Field(default_factory=WireCompression)
    down: WireCompression = Field(default_factory=WireCompression)


StrategyName = Literal[
    "fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "scaffold", "fednova"
]
RobustRuleName = Literal["none", "median", "trimmedMean", "krum", "multiKrum"]

# What each strategy does, where it acts and which `spec.strategy` fields it
# reads: the README's strategy table is generated from this (fedkube.tools.specdoc),
# and a test checks that it names exactly the strategies and fields above.
STRATEGY_GUIDE: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "fedavg": (
        "sample-weighted mean of the client deltas (McMahan et al. 2017)",
        "server",
        ("serverLearningRate",),
    ),
    "fedavgm": (
        "FedAvg with server momentum v ← βv + Δ̄, w ← w + ηv (Hsu et al. 2019)",
        "server",
        ("serverLearningRate", "serverMomentum"),
    ),
    "fedadam": (
        "Adam on the mean delta as pseudo-gradient (Reddi et al. 2021)",
        "server",
        ("serverLearningRate", "beta1", "beta2", "tau"),
    ),
    "fedyogi": (
        "Yogi's additive second moment, steadier than Adam's (Reddi et al. 2021)",
        "server",
        ("serverLearningRate", "beta1", "beta2", "tau"),
    ),
    "fedadagrad": (
        "Adagrad's growing second moment (Reddi et al. 2021)",
        "server",
        ("serverLearningRate", "beta1", "tau"),
    ),
    "fedprox": (
        "FedAvg with μ/2·‖w − w_g‖² in every local loss (Li et al. 2020)",
        "worker, server",
        ("proximalMu", "serverLearningRate"),
    ),
    "scaffold": (
        "control variates c, c_i correct client drift; Δc travels up beside Δw "
        "(Karimireddy et al. 2020)",
        "worker (c_i in its state), combiner, server",
        ("serverLearningRate",),
    ),
    "fednova": (
        "averages Δ_i/τ_i, rescaled by τ_eff = Σp_i·τ_i (Wang et al. 2020)",
        "combiner, server",
        ("serverLearningRate",),
    ),
}
ROBUST_GUIDE: dict[str, tuple[str, tuple[str, ...]]] = {
    "none": ("the strategy's running weighted sum: memory O(model) per combiner", ()),
    "median": (
        "coordinate-wise median of the region's updates (Yin et al. 2018)",
        ("maxBufferBytes",),
    ),
    "trimmedMean": (
        "coordinate-wise mean after cutting β of the values at each end (Yin et al. 2018)",
        ("trimFraction", "maxBufferBytes"),
    ),
    "krum": (
        "the update closest to its n − f − 2 nearest neighbours (Blanchard et al. 2017)",
        ("byzantine", "maxBufferBytes"),
    ),
    "multiKrum": (
        "weighted mean of the m best-scored updates under Krum's score",
        ("byzantine", "multiKrumKeep", "maxBufferBytes"),
    ),
}

# The adaptive server optimizers (Reddi et al. 2021) take small server steps;
# every other strategy defaults to the plain FedAvg step of 1.0.
FEDOPT = ("fedadam", "fedyogi", "fedadagrad")
DEFAULT_FEDOPT_SERVER_LR = 0.1


class Robust(_Model):
    """Byzantine-robust aggregation, wrapped around any strategy.

    ``rule`` replaces each region's weighted sum by a robust estimate over the
    region's buffered updates (memory: every update of the region, bounded by
    ``maxBufferBytes``); the global tier then takes the weighted mean of the
    regions' estimates. ``normBound`` clips every update to an L2 norm before it
    is folded or buffered, and needs no buffer.
    """

    rule: RobustRuleName = Field(
        default="none", description="robust rule applied per region over its buffered updates"
    )
    trim_fraction: float = Field(
        default=0.1,
        ge=0,
        lt=0.5,
        description="trimmedMean: share of values cut at each end of every coordinate (β)",
    )
    byzantine: int = Field(
        default=1,
        ge=0,
        le=100,
        description="krum/multiKrum: Byzantine clients tolerated per region (f)",
    )
    multi_krum_keep: int | None = Field(
        default=None,
        ge=1,
        description="multiKrum: updates averaged (m; default: the region's updates minus f)",
    )
    norm_bound: float | None = Field(
        default=None,
        gt=0,
        description="clip every update to this L2 norm before aggregation (any rule)",
    )
    max_buffer_bytes: int = Field(
        default=1024**3,
        ge=1024,
        description="a robust rule's per-region buffer; an update that would exceed it is "
        "refused (reason buffer_full)",
    )


class Strategy(_Model):
    """How updates become the next global model: the aggregation and server step."""

    name: StrategyName = Field(default="fedavg", description="a registered strategy")
    server_learning_rate: float | None = Field(
        default=None,
        gt=0,
        description="server step on the aggregated delta (default 1.0; 0.1 for "
        "fedadam, fedyogi, fedadagrad)",
    )
    server_momentum: float = Field(
        default=0.9, ge=0, lt=1, description="fedavgm: server momentum β"
    )
    beta1: float = Field(
        default=0.9, ge=0, lt=1, description="fedadam, fedyogi, fedadagrad: first-moment decay"
    )
    beta2: float = Field(
        default=0.99, ge=0, lt=1, description="fedadam, fedyogi: second-moment decay"
    )
    tau: float = Field(
        default=1e-3, gt=0, description="fedadam, fedyogi, fedadagrad: adaptivity (ε) τ"
    )
    proximal_mu: float = Field(
        default=0.01, ge=0, description="fedprox: weight μ of the proximal term μ/2·‖w − w_g‖²"
    )
    robust: Robust = Field(default_factory=Robust)

    @property
    def server_lr(self) -> float:
        """The server learning rate in force (the explicit one, else the strategy's default)."""
        if self.server_learning_rate is not None:
            return self.server_learning_rate
        return DEFAULT_FEDOPT_SERVER_LR if self.name in FEDOPT else 1.0


class Evaluation(_Model):
    every_rounds: int = Field(
        default=1, ge=1, description="evaluate the global model every N rounds (and after the last)"
    )
    metric: str = Field(
        default="accuracy",
        pattern=METRIC_NAME,
        description="the headline metric, one the task's evaluate() returns: it drives the "
        "progress line, the summary's best round, the plot, the status and `kubectl get`",
    )
    goal: Literal["maximize", "minimize"] = Field(
        default="maximize", description="whether a higher or a lower metric is better"
    )
    central: bool = Field(
        default=True,
        description="evaluate at the global aggregator on the held-out split (role test); "
        "off when the central side holds no data",
    )
    sites: Literal["none", "selected", "all"] = Field(
        default="none",
        description="which clients evaluate the new global model on their own validation "
        "data (role validation) every everyRounds: the round's selected clients, all, or none; "
        "their metrics are averaged by examples, per tenant and overall",
    )
    cross_site: bool = Field(
        default=True,
        description="with sites: after the last round every client evaluates the final model "
        "(cross-site validation)",
    )
    site_timeout_seconds: float = Field(
        default=120,
        gt=0,
        le=86400,
        description="how long an evaluation at the sites waits for its clients' reports",
    )


INFLIGHT_BELOW_UPDATE = (
    "below maxUpdateBytes: an update of the largest size could never be received"
)


class TlsMode(str, Enum):
    disabled = "disabled"
    server = "server"
    mutual = "mutual"


class Tls(_Model):
    """TLS between the tiers: workers to combiners, combiners to the global tier.

    ``fedkube run`` mints a CA for the run and a certificate for each service
    and tenant; the operator mints them into Secrets (see the README's
    Security section).
    """

    mode: TlsMode = Field(
        default=TlsMode.disabled,
        description="disabled: plain HTTP (inside a cluster whose network is trusted); "
        "server: every connection is TLS and each caller verifies the service's certificate "
        "against the job's CA; mutual: callers present certificates too, and a tenant's "
        "requests must come with that tenant's certificate and a combiner's with its "
        "region's (403 bad_certificate), beside their tokens",
    )
    server_names: list[Annotated[str, Field(min_length=1, max_length=253)]] = Field(
        default_factory=list,
        max_length=16,
        description="more DNS names or IP addresses for the combiners' and the global "
        "tier's certificates: the names that other sites reach them by (an ingress host)",
    )


class Transport(_Model):
    """What a combiner takes from its tenants' workers, and how much of it at once.

    The in-flight budgets bound the memory that update bodies can hold in a
    combiner whatever its clients do: a tenant that opens uploads announcing
    large bodies and sends them slowly is answered ``busy`` (503 or 429, with
    Retry-After; an honest worker sends again) rather than growing the
    combiner until it fails every tenant of its region.
    """

    max_update_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1024,
        description="larger updates are rejected (reason oversized)",
    )
    max_inflight_bytes: int = Field(
        default=2 * 1024 * 1024 * 1024,
        ge=1024,
        description="update bytes (as announced) a combiner receives at once; an upload beyond "
        "it is answered 503 busy with Retry-After and sent again by the worker",
    )
    max_inflight_bytes_per_tenant: int | None = Field(
        default=None,
        ge=1024,
        description="one tenant's share of maxInflightBytes (beyond it: 429 busy); default: "
        "half of it where the region has several tenants, all of it otherwise",
    )
    body_timeout_seconds: float = Field(
        default=30,
        gt=0,
        le=3600,
        description="how far an update body may fall behind minUploadBytesPerSecond: at t "
        "seconds it must have delivered minUploadBytesPerSecond x (t - this) bytes, else it is "
        "refused (408 slow_body) and its budget freed",
    )
    min_upload_bytes_per_second: int = Field(
        default=256 * 1024,
        ge=1,
        description="the slowest upload a combiner waits for, on average (see bodyTimeoutSeconds)",
    )
    norm_bound: float | None = Field(
        default=None,
        gt=0,
        description="reject updates whose L2 norm exceeds it (reason norm_bound)",
    )
    tls: Tls = Field(default_factory=Tls, description="TLS between the tiers")

    def inflight_per_tenant(self, tenants: int) -> int:
        """One tenant's in-flight budget in a region of ``tenants`` tenants."""
        if self.max_inflight_bytes_per_tenant is not None:
            return min(self.max_inflight_bytes_per_tenant, self.max_inflight_bytes)
        if tenants <= 1:
            return self.max_inflight_bytes
        return max(self.max_inflight_bytes // 2, self.max_update_bytes)


class SecretKeyRef(_Model):
    name: str = Field(max_length=253, description="a Secret in the job's namespace")
    key: str = Field(max_length=253, description="the key that holds the value")


class State(_Model):
    """Where round state lives and how long it outlives the job."""

    redis_url: str | None = Field(
        default=None,
        max_length=1024,
        description="use this Redis (else `fedkube run` starts its own and the operator "
        "uses its --redis-url)",
    )
    redis_password_secret: SecretKeyRef | None = Field(
        default=None, description="Redis password (on a cluster), given to every component"
    )
    checkpoint_claim: str | None = Field(
        default=None,
        max_length=253,
        description="PersistentVolumeClaim for the global aggregator's checkpoints "
        "(on a cluster; default: an emptyDir, so a rescheduled aggregator restarts "
        "from Redis' history but not from the model)",
    )
    key_ttl_seconds: int = Field(
        default=24 * 3600, ge=1, description="TTL of a closed round's and a finished job's keys"
    )


class DpMode(str, Enum):
    central = "central"
    local = "local"


class DifferentialPrivacy(_Model):
    """Client-level differential privacy (DP-FedAvg): see fedkube/privacy.py."""

    mode: DpMode = Field(
        default=DpMode.central,
        description="central: the global aggregator adds the noise once per round (the "
        "aggregator tier is trusted with clipped updates); local: every worker noises its own "
        "update",
    )
    clip_norm: float = Field(
        gt=0,
        description="every client update is clipped to this L2 norm at the worker; the "
        "combiner refuses a larger one (over_clip_norm)",
    )
    noise_multiplier: float | None = Field(
        default=None,
        ge=0,
        description="noise standard deviation over clipNorm; or set epsilon instead",
    )
    epsilon: float | None = Field(
        default=None,
        gt=0,
        description="target ε at delta after spec.rounds rounds: the noise multiplier is "
        "solved for it (with the job's sampling rate)",
    )
    delta: float = Field(default=1e-5, gt=0, lt=1, description="the δ of (ε, δ)-DP")
    budget: float | None = Field(
        default=None,
        gt=0,
        description="the most ε the job may spend: a round that would exceed it does not run",
    )
    on_budget_exhausted: Literal["stop", "fail"] = Field(
        default="stop",
        description="when the budget would be exceeded: stop (the job succeeds with the rounds "
        "it ran) or fail",
    )


class SecureAggregation(_Model):
    """Secure aggregation per region (SecAgg+ over Bonawitz et al.): see fedkube/secagg.py."""

    threshold: float = Field(
        default=2 / 3,
        gt=0.5,
        le=1,
        description="fraction of a client's share holders (its neighbours and itself) whose "
        "shares rebuild its secrets: t = ceil(threshold x holders); fewer survivors fail the "
        "round",
    )
    neighbours: int | None = Field(
        default=None,
        ge=2,
        le=MAX_REPLICAS,
        description="clients each client masks with and shares its secrets among (the "
        "SecAgg+ graph's degree); default min(n - 1, 2 ceil(log2 n) + 2) for a region of n "
        "clients; n - 1 or more is Bonawitz's complete graph",
    )
    clip_range: float = Field(
        default=8.0,
        gt=0,
        le=2.0**20,
        description="every coordinate of an update is clipped to [-clipRange, clipRange] "
        "before its fixed-point encoding (the sum cannot overflow the 32-bit modulus)",
    )
    phase_timeout_seconds: float = Field(
        default=30,
        gt=0,
        le=3600,
        description="how long a combiner waits for the clients of one protocol step (keys "
        "shared, masked updates, unmasking shares) before going on with those that answered",
    )


class Privacy(_Model):
    dp: DifferentialPrivacy | None = Field(
        default=None, description="client-level differential privacy (unset: none)"
    )
    secure_aggregation: SecureAggregation | None = Field(
        default=None,
        description="combiners learn only their region's sum of masked updates, never one "
        "client's (unset: updates travel in the clear over the token-authenticated channel)",
    )


class Simulation(_Model):
    """Virtual clients: one worker process hosts many of a tenant's clients.

    What Flower's simulation gives a researcher, through the real protocol:
    each virtual client keeps its own data shard, seed and durable state
    (SCAFFOLD's c_i, top-k residuals), and sends its own update to its
    combiner, which checks it like any other. A worker process polls for all
    of its clients at once, fetches each round's model once, and trains its
    selected clients in turn; a client that is not selected costs nothing
    but its entry in the worker's table (its data is loaded only to train).
    """

    clients_per_worker: int = Field(
        default=100,
        ge=1,
        le=MAX_REPLICAS,
        description="virtual clients hosted by one worker process (pod or Ray actor); a "
        "tenant's replicas are split into ceil(replicas / clientsPerWorker) workers",
    )


class JobSpec(_Model):
    rounds: int = Field(ge=1, le=100_000)
    suspend: bool = Field(
        default=False,
        description="on a cluster: stop every pod of the job; setting it back to false "
        "resumes from the same round",
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="on a cluster: fail the job once it ran this long"
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        description="on a cluster: delete the finished job (and its children) after this",
    )
    backoff_limit: int = Field(
        default=6,
        ge=0,
        le=1000,
        description="on a cluster: pod failures tolerated before the job fails",
    )
    image: str | None = Field(
        default=None,
        max_length=512,
        description="container image of the workers and the global aggregator, which run "
        "the job's code (default: the operator's --image; combiners run its --slim-image)",
    )
    seed: int = Field(
        default=0,
        ge=0,
        # numpy and torch take non-negative 64-bit seeds; 2^53 - 1 is the largest that
        # every JSON parser on the way (kubectl's included) reads exactly.
        le=2**53 - 1,
        description="model initialisation, selection, partitioning (0 to 2^53 - 1)",
    )
    task: TaskSpec | None = Field(
        default=None,
        description="the user's training code (fedkube.task); unset: the built-in "
        "classifier (cross-entropy, accuracy)",
    )
    model: ModelSpec | None = Field(
        default=None, description="the model's factory; required unless spec.task builds it"
    )
    data: DataSpec = Field(default_factory=lambda: DataSpec())
    regions: list[Region] = Field(min_length=1, max_length=MAX_REGIONS)
    tenants: list[Tenant] = Field(min_length=1, max_length=MAX_TENANTS)
    training: Training = Field(default_factory=Training)
    participation: Participation = Field(default_factory=Participation)
    strategy: Strategy = Field(default_factory=Strategy)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    transport: Transport = Field(default_factory=Transport)
    compression: Compression = Field(default_factory=Compression)
    state: State = Field(default_factory=State)
    privacy: Privacy = Field(default_factory=Privacy)
    simulation: Simulation | None = Field(
        default=None,
        description="host many virtual clients per worker process (unset: one worker per client)",
    )

    def code_references(self) -> list[tuple[str, str]]:
        """(field, reference) of every piece of code the job asks a tier to import.

        What site and central entrypoint policies check (fedkube.policy).
        """
        named = [
            ("spec.task.entrypoint", self.task.entrypoint if self.task else None),
            ("spec.task.script", self.task.script if self.task else None),
            ("spec.model.entrypoint", self.model.entrypoint if self.model else None),
            ("spec.data.entrypoint", self.data.entrypoint),
        ]
        return [(field, reference) for field, reference in named if reference is not None]


class Metadata(_Model):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    name: str = Field(pattern=DNS_LABEL, max_length=MAX_JOB_NAME)
    namespace: str | None = None


class FederatedJob(_Model):
    """A whole manifest: ``apiVersion``, ``kind``, ``metadata`` and ``spec``."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )

    api_version: Literal["fedkube.io/v1alpha1"]
    kind: Literal["FederatedJob"]
    metadata: Metadata
    spec: JobSpec

    @property
    def name(self) -> str:
        return self.metadata.name

    def clients(self) -> list[Client]:
        return list_clients(self.spec)

    def worker_groups(self) -> list[WorkerGroup]:
        return list_worker_groups(self.spec)

    def region_names(self) -> list[str]:
        return [region.name for region in self.spec.regions]

    def weight_cap(self, tenant: str) -> int | None:
        """The most samples a client of ``tenant`` may claim (None: no cap)."""
        for entry in self.spec.tenants:
            if entry.name == tenant and entry.max_weight is not None:
                return entry.max_weight
        return self.spec.participation.max_weight


@dataclass(frozen=True)
class Client:
    """One training participant: replica ``replica`` of tenant ``tenant``.

    ``tenant_index`` / ``num_tenants`` say which data partition the tenant
    owns when the data factory simulates tenants from one data set.
    """

    id: str
    tenant: str
    region: str
    replica: int
    replicas: int
    tenant_index: int
    num_tenants: int

    @classmethod
    def whole_tenant(cls, spec: JobSpec, index: int, id: str | None = None) -> Client:
        """Tenant ``index`` as one client holding all of its data (every replica's share)."""
        tenant = spec.tenants[index]
        return cls(
            id=id or tenant.name,
            tenant=tenant.name,
            region=tenant.region,
            replica=0,
            replicas=1,
            tenant_index=index,
            num_tenants=len(spec.tenants),
        )


def list_clients(spec: JobSpec) -> list[Client]:
    """Every client of the job, in a stable order (tenant order, then replica)."""
    return [
        Client(
            id=f"{tenant.name}-{replica}",
            tenant=tenant.name,
            region=tenant.region,
            replica=replica,
            replicas=tenant.replicas,
            tenant_index=index,
            num_tenants=len(spec.tenants),
        )
        for index, tenant in enumerate(spec.tenants)
        for replica in range(tenant.replicas)
    ]


@dataclass(frozen=True)
class WorkerGroup:
    """The clients that one worker process hosts (all of one tenant).

    Without ``spec.simulation`` every client is its own group, named by the
    client's id; with it, a tenant's replicas are cut into runs of
    ``clientsPerWorker`` named ``<tenant>-v<k>``.
    """

    name: str
    tenant: str
    region: str
    clients: tuple[Client, ...]

    def worker_args(self, simulation: bool) -> list[str]:
        """How ``fedkube worker`` is told which clients it hosts."""
        return ["--group", self.name] if simulation else ["--client", self.name]


def list_worker_groups(spec: JobSpec) -> list[WorkerGroup]:
    """Every worker process of the job, in client order."""
    clients = list_clients(spec)
    if spec.simulation is None:
        return [WorkerGroup(c.id, c.tenant, c.region, (c,)) for c in clients]
    size = spec.simulation.clients_per_worker
    groups: list[WorkerGroup] = []
    start = 0
    for tenant in spec.tenants:  # list_clients keeps a tenant's clients together
        for k, offset in enumerate(range(0, tenant.replicas, size)):
            chunk = tuple(clients[start + offset : start + min(offset + size, tenant.replicas)])
            groups.append(WorkerGroup(f"{tenant.name}-v{k}", tenant.name, tenant.region, chunk))
        start += tenant.replicas
    return groups


def workers_of(spec: JobSpec, tenant: Tenant) -> int:
    """How many worker processes (pods) ``tenant`` runs."""
    if spec.simulation is None:
        return tenant.replicas
    return math.ceil(tenant.replicas / spec.simulation.clients_per_worker)


def _cross_field_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """Rules that span fields; the CRD states the same rules in CEL."""
    problems: list[tuple[str, str]] = []
    if spec.task is None and spec.model is None:
        problems.append(
            ("spec.model", "required unless spec.task names a task that builds the model")
        )
    if spec.task is None and spec.data.entrypoint is None:
        problems.append(
            ("spec.data.entrypoint", "required unless spec.task names a task that loads the data")
        )
    problems += _task_problems(spec)
    problems += _transport_problems(spec.transport)
    region_names = [region.name for region in spec.regions]
    for index, name in enumerate(region_names):
        if region_names.index(name) != index:
            problems.append((f"spec.regions[{index}].name", f"duplicate region {name!r}"))
    seen: set[str] = set()
    for index, tenant in enumerate(spec.tenants):
        if tenant.name in seen:
            problems.append((f"spec.tenants[{index}].name", f"duplicate tenant {tenant.name!r}"))
        seen.add(tenant.name)
        if tenant.region not in region_names:
            problems.append(
                (
                    f"spec.tenants[{index}].region",
                    f"region {tenant.region!r} is not declared in spec.regions "
                    f"({', '.join(region_names)})",
                )
            )
    problems += _strategy_problems(spec, region_names)
    problems += _privacy_problems(spec)
    for index, tenant in enumerate(spec.tenants):
        workers = workers_of(spec, tenant)
        if workers <= MAX_WORKERS_PER_TENANT:
            continue
        if spec.simulation is None:
            problems.append(
                (
                    f"spec.tenants[{index}].replicas",
                    f"{tenant.replicas} clients would be {workers} worker pods (at most "
                    f"{MAX_WORKERS_PER_TENANT}); set spec.simulation to host them as virtual "
                    "clients",
                )
            )
        else:
            problems.append(
                (
                    "spec.simulation.clientsPerWorker",
                    f"tenant {tenant.name!r}'s {tenant.replicas} clients would need {workers} "
                    f"worker processes (at most {MAX_WORKERS_PER_TENANT}): raise it to at least "
                    f"{math.ceil(tenant.replicas / MAX_WORKERS_PER_TENANT)}",
                )
            )
    total = sum(tenant.replicas for tenant in spec.tenants)
    minimum = spec.participation.min_clients
    if minimum is not None and minimum > total:
        problems.append(
            (
                "spec.participation.minClients",
                f"{minimum} exceeds the {total} clients that the tenants' replicas provide",
            )
        )
    return problems


def _task_problems(spec: JobSpec) -> list[tuple[str, str]]:
    task = spec.task
    if task is None:
        return []
    problems: list[tuple[str, str]] = []
    if (task.entrypoint is None) == (task.script is None):
        problems.append(("spec.task", "set exactly one of entrypoint and script"))
    if task.script is not None:
        if spec.model is None:
            problems.append(
                ("spec.model", "required with spec.task.script: the global tier builds the model")
            )
        if spec.simulation is not None:
            problems.append(
                ("spec.task.script", "a script hosts one client: spec.simulation cannot be set")
            )
        if task.kwargs:
            problems.append(("spec.task.kwargs", "a script takes args, not kwargs"))
    elif task.args:
        problems.append(("spec.task.args", "only a script takes args"))
    return problems


def _secure_aggregation_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """What a combiner that sees only masked updates cannot do."""
    if spec.privacy.secure_aggregation is None:
        return []
    problems: list[tuple[str, str]] = []
    if spec.strategy.robust.rule != "none" or spec.strategy.robust.norm_bound is not None:
        problems.append(
            (
                "spec.strategy.robust",
                "a robust rule or normBound needs each client's update, which secure "
                "aggregation hides from the combiner",
            )
        )
    if spec.transport.norm_bound is not None:
        problems.append(
            (
                "spec.transport.normBound",
                "a masked update's norm cannot be checked: clip at the worker instead "
                "(spec.privacy.dp.clipNorm or secureAggregation.clipRange)",
            )
        )
    if spec.compression.up.scheme != "none":
        problems.append(
            (
                "spec.compression.up.scheme",
                "masked updates are 32-bit fixed point: send them uncompressed",
            )
        )
    for region in spec.regions:
        clients = sum(t.replicas for t in spec.tenants if t.region == region.name)
        if clients < MIN_SECURE_REGION:
            problems.append(
                (
                    "spec.privacy.secureAggregation",
                    f"region {region.name!r} has {clients} clients: a region's sum hides one "
                    f"client's update only among at least {MIN_SECURE_REGION}",
                )
            )
    return problems


def _privacy_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """What differential privacy cannot be combined with (each would break its bound)."""
    problems = _secure_aggregation_problems(spec)
    dp = spec.privacy.dp
    if dp is None:
        return problems
    if (dp.noise_multiplier is None) == (dp.epsilon is None):
        problems.append(("spec.privacy.dp", "set exactly one of noiseMultiplier and epsilon"))
    if spec.strategy.name in ("scaffold", "fednova"):
        problems.append(
            (
                "spec.strategy.name",
                f"{spec.strategy.name} sends more than a clipped update (control variates or "
                "local step counts): its privacy is not accounted; use fedavg, fedprox or a "
                "server optimizer with spec.privacy.dp",
            )
        )
    if spec.strategy.robust.rule != "none":
        problems.append(
            (
                "spec.strategy.robust.rule",
                "a robust rule is not a clipped sum plus noise: its privacy is not accounted",
            )
        )
    if spec.compression.up.scheme != "none":
        problems.append(
            (
                "spec.compression.up.scheme",
                "a compressed update may exceed clipNorm after rounding: send updates "
                "uncompressed with spec.privacy.dp",
            )
        )
    return problems


def _transport_problems(transport: Transport) -> list[tuple[str, str]]:
    """A budget smaller than one update would refuse that update for ever."""
    problems: list[tuple[str, str]] = []
    for field, budget in (
        ("maxInflightBytes", transport.max_inflight_bytes),
        ("maxInflightBytesPerTenant", transport.max_inflight_bytes_per_tenant),
    ):
        if budget is not None and budget < transport.max_update_bytes:
            problems.append((f"spec.transport.{field}", INFLIGHT_BELOW_UPDATE))
    return problems


def _strategy_problems(spec: JobSpec, region_names: list[str]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    strategy, robust = spec.strategy, spec.strategy.robust
    if strategy.name == "scaffold" and spec.training.optimizer != Optimizer.sgd:
        problems.append(
            (
                "spec.training.optimizer",
                "scaffold corrects SGD steps (its control-variate update assumes SGD); "
                f"got {spec.training.optimizer.value!r}",
            )
        )
    if spec.compression.down.scheme == "topk":
        problems.append(
            (
                "spec.compression.down.scheme",
                "topk sparsifies updates; the model travels as none, fp16 or int8",
            )
        )
    if robust.rule in ("krum", "multiKrum"):
        per_region = {name: 0 for name in region_names}
        for tenant in spec.tenants:
            if tenant.region in per_region:
                per_region[tenant.region] += tenant.replicas
        needed = 2 * robust.byzantine + 3
        small = {name: n for name, n in per_region.items() if n < needed}
        if small:
            problems.append(
                (
                    "spec.strategy.robust.byzantine",
                    f"{robust.rule} with f={robust.byzantine} needs at least 2f+3={needed} "
                    "clients in every region (it runs per region); "
                    + ", ".join(f"{name} has {n}" for name, n in sorted(small.items())),
                )
            )
        keep = robust.multi_krum_keep
        if keep is not None and per_region and keep > min(per_region.values()):
            problems.append(
                (
                    "spec.strategy.robust.multiKrumKeep",
                    f"{keep} exceeds the clients of the smallest region "
                    f"({min(per_region.values())})",
                )
            )
    return problems


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def parse_job(document: Any) -> FederatedJob:
    """Validate a manifest already parsed from YAML/JSON."""
    if not isinstance(document, dict):
        raise SpecError([("<root>", "a FederatedJob manifest must be a mapping")])
    check_tree(document, SpecError)
    try:
        job = FederatedJob.model_validate(document)
    except ValidationError as exc:
        problems = [(_field_path(err["loc"]) or "<root>", err["msg"]) for err in exc.errors()]
        raise SpecError(problems) from None
    problems = _cross_field_problems(job.spec)
    if problems:
        raise SpecError(problems)
    return job


def read_yaml(
    path: str | Path, error: type[SpecError] = SpecError, field: str | None = None
) -> list[Any]:
    """The non-empty YAML documents of a file, each a plain tree; ``error`` names what is wrong.

    Shared by manifests and site policies (``error`` is :class:`PolicyError`
    there); ``field`` replaces ``<file>`` and ``<root>`` as the problem's place.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise error([(field or "<file>", f"cannot read {path}: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise error(
            [(field or "<file>", f"{path} is not UTF-8 text: {exc.reason} at byte {exc.start}")]
        ) from None
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise error([(field or "<root>", f"not valid YAML: {exc}")]) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise error(
            [(field or "<root>", "not valid YAML: collections nest deeper than it can read")]
        ) from None
    for document in documents:
        check_tree(document, error, field or "<root>")
    return documents


# What one document may expand to (its YAML aliases followed), and how deep it may
# nest: what the operator stores and each worker receives as JSON. pydantic's
# serializer gives up near 255 levels (dump_job); no manifest needs 20.
MAX_DOCUMENT_VALUES = 1_000_000
MAX_DOCUMENT_DEPTH = 100
_END: tuple[Any, Any] = (None, None)  # told apart by identity: no pair is this one


def check_tree(document: Any, error: type[SpecError], field: str = "<root>") -> None:
    """Refuse a document that JSON cannot hold, or that could not be written back as JSON.

    A collection that contains itself (``kwargs: &x {a: *x}``) would pass into
    an Any-typed field (the kwargs) and fail only when the job is written as
    JSON for the operator or a worker; so would kwargs nested deeper than the
    serializer follows; YAML's ``.inf`` and ``.nan`` are no JSON numbers (in
    kwargs, dump_job wrote them as null); and aliases of aliases expand
    exponentially (a "billion laughs"). Walked without recursion, so that
    depth costs no stack.
    """
    values = 0
    on_path: set[int] = set()
    where: list[str | int] = []  # the keys and indices down to the collection walked
    stack: list[tuple[int | None, Iterator[tuple[Any, Any]]]] = [(None, iter([("", document)]))]
    while stack:
        item = next(stack[-1][1], _END)
        if item is _END:
            owner, _ = stack.pop()
            if owner is not None:
                on_path.discard(owner)
                where.pop()
            continue
        key, node = item
        values += 1
        if values > MAX_DOCUMENT_VALUES:
            raise error(
                [(field, f"more than {MAX_DOCUMENT_VALUES} values once YAML aliases are expanded")]
            )
        if isinstance(node, float) and not math.isfinite(node):
            path = _field_path(tuple([*where[1:9], key] if len(where) else []))
            place = f"{field} {path}".strip() if field != "<root>" else path or field
            raise error([(place, f"{node} is not a JSON number")])
        if isinstance(node, dict | list):
            where.append(key if isinstance(key, int) and not isinstance(key, bool) else str(key))
            path = _field_path(tuple(where[1:9])) + ("..." if len(where) > 9 else "")
            # Under the file's own name (--data-binding) when it has one, else the path.
            place = f"{field} {path}".strip() if field != "<root>" else path or field
            if len(where) - 1 > MAX_DOCUMENT_DEPTH:
                raise error([(place, f"nests deeper than {MAX_DOCUMENT_DEPTH} levels")])
            if id(node) in on_path:
                raise error([(place, "a YAML alias refers to a collection that contains it")])
            on_path.add(id(node))
            pairs = node.items() if isinstance(node, dict) else enumerate(node)
            stack.append((id(node), iter(pairs)))


def load_job(path: str | Path) -> FederatedJob:
    """Read and validate a manifest file (the YAML that ``kubectl apply`` takes)."""
    documents = read_yaml(path)
    jobs = [doc for doc in documents if isinstance(doc, dict) and doc.get("kind") == KIND]
    if len(jobs) != 1:
        raise SpecError([("<root>", f"expected exactly one {KIND} in {path}, found {len(jobs)}")])
    return parse_job(jobs[0])


def dump_job(job: FederatedJob) -> dict[str, Any]:
    """The manifest as plain data with wire (camelCase) names, defaults filled in."""
    return job.model_dump(mode="json", by_alias=True, exclude_none=True)


def quorum(participation: Participation, selected: int) -> int:
    """How many reports a round with ``selected`` participants needs to close."""
    if participation.min_clients is not None:
        return min(participation.min_clients, selected)
    needed = math.ceil(participation.min_fraction * selected - 1e-9)
    return max(1, min(selected, needed))
