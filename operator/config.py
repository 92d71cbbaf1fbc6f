"""The operator's own configuration (command-line flags), checked at the boundary."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fedkube.errors import ConfigError
from fedkube.policy import DEFAULT_ENTRYPOINTS, ENTRYPOINT_RULE, SitePolicy
from fedkube.spec import DNS_LABEL, QUANTITY

DEFAULT_IMAGE = "fedkube:0.1.0"
# The image of the components that never train (the operator itself and the regional
# combiners): no torch, a tenth of the size (the Dockerfile's `slim` target).
DEFAULT_SLIM_IMAGE = "fedkube-slim:0.1.0"


@dataclass(frozen=True)
class OperatorConfig:
    """How children are built and where they point.

    ``central_address`` matters in site mode only: a URL template for the
    combiner of a region at the coordinating site, with ``{job}``,
    ``{namespace}`` and ``{region}`` placeholders (for example
    ``https://fl.example.org/{job}/{region}``).
    """

    # Workers and the global aggregator (a job's spec.image replaces it); combiners run
    # ``slim_image``, which a job cannot replace: they run no code of the job's.
    image: str = DEFAULT_IMAGE
    slim_image: str = DEFAULT_SLIM_IMAGE
    image_pull_policy: str = "IfNotPresent"
    redis_url: str | None = None
    # From $FEDKUBE_REDIS_PASSWORD, never a flag (it would show in `ps`).
    redis_password: str | None = field(default=None, repr=False)
    gpu_resource: str = "nvidia.com/gpu"
    site: str | None = None
    central_address: str | None = None
    service_port: int = 8080
    metrics_port: int = 9090
    run_as_user: int = 10001
    namespaces: tuple[str, ...] = field(default_factory=tuple)
    status_interval_s: float = 2.0
    # The aggregator tier's requests (memory is also its limit). The global
    # aggregator holds the model and one running sum and imports torch to
    # evaluate it (about 560 MB before any model); a combiner (about 70 MB)
    # one sum and the update it is reading: size them for the largest model.
    aggregator_cpu: str = "500m"
    aggregator_memory: str = "2Gi"
    combiner_cpu: str = "250m"
    combiner_memory: str = "512Mi"
    # Site mode: what this site lets a job do with its tenants (fedkube.policy).
    policy: SitePolicy = field(default_factory=SitePolicy)
    # Central mode: the model and evaluation-data entrypoints the aggregator
    # tier may import and call (exact, or module prefixes).
    allow_entrypoints: tuple[str, ...] = DEFAULT_ENTRYPOINTS

    def __post_init__(self) -> None:
        problems: list[tuple[str, str]] = []
        if self.site is not None:
            if not re.match(DNS_LABEL, self.site):
                problems.append(("--site", f"{self.site!r} is not a DNS label"))
            if not self.central_address:
                problems.append(("--central-address", "site mode needs the central address"))
        if self.central_address and "{region}" not in self.central_address:
            problems.append(
                ("--central-address", "the template must contain {region} (one combiner each)")
            )
        if not re.match(r"^[A-Za-z0-9.-]+(/[A-Za-z0-9._-]+)+$", self.gpu_resource):
            problems.append(
                ("--gpu-resource", f"{self.gpu_resource!r} is not an extended resource name")
            )
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            problems.append(("--image-pull-policy", "must be Always, IfNotPresent or Never"))
        for flag, value in (
            ("--aggregator-cpu", self.aggregator_cpu),
            ("--aggregator-memory", self.aggregator_memory),
            ("--combiner-cpu", self.combiner_cpu),
            ("--combiner-memory", self.combiner_memory),
        ):
            if not re.match(QUANTITY, value):
                problems.append((flag, f"{value!r} is not a Kubernetes quantity"))
        for item in self.allow_entrypoints:
            if not re.match(ENTRYPOINT_RULE, item):
                problems.append(
                    (
                        "--allow-entrypoint",
                        f"{item!r} is neither module:callable nor a module prefix ending "
                        "with '.' or ':'",
                    )
                )
        if not 0 < self.status_interval_s <= 300:
            problems.append(("--status-interval", "must be in (0, 300] seconds"))
        if problems:
            raise ConfigError(problems)

    @property
    def central(self) -> bool:
        """Central mode runs the aggregator tier; site mode only its own tenants."""
        return self.site is None
