"""Site policy: what a data-owning site lets a federated job do next to its data.

A manifest names ``module:callable`` entrypoints (the model, the data) that
every worker imports and calls. In site mode the manifest is written at the
central site, so without a policy the central job author would choose the
code that runs beside a hospital's data. A site's policy says which
entrypoints (exact names or module prefixes) and images it accepts, how many
GPUs and how much memory a job may ask of it, whether it takes part at all,
and binds its tenants' data itself (paths and credentials that never leave
the site). The defaults are safe: only the installed fedkube examples and
fedkube's own file loaders, only the operator's own image.

:func:`check` is pure (a job and a policy in, the refusals out), so the
site operator, ``fedkube run --policy`` and ``fedkube validate --policy``
refuse exactly the same things; :func:`check_central` is the central
operator's allowlist for the aggregator tier (model and evaluation data).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from fedkube.errors import PolicyError
from fedkube.spec import (
    ENTRYPOINT,
    QUANTITY,
    FederatedJob,
    Tenant,
    _field_path,
    check_tree,
    read_yaml,
)

# What a site accepts when its policy says nothing: the examples installed
# with fedkube and fedkube's own loaders of tenant-local files.
DEFAULT_ENTRYPOINTS: tuple[str, ...] = ("fedkube.examples.", "fedkube.datasets:")
# A module prefix: a dotted module name ending with "." (its submodules) or
# ":" (every callable of that module). A prefix without the separator would
# let ``fedkube.examples`` match ``fedkube.examples_evil``.
_MODULE = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
# Or a Client API script's .py file in the image, exactly (a script that is a module is
# admitted by its package's prefix, `hospital.` for `hospital.train`).
SCRIPT_FILE = r"[A-Za-z0-9_./-]+\.py"
ENTRYPOINT_RULE = rf"^({_MODULE}[.:]|{ENTRYPOINT[1:-1]}|{SCRIPT_FILE})$"
LOCAL_SITE = "local"


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class DataVolume(_Model):
    """Storage of the site's own, mounted into its tenant's worker pods (read-only by default).

    Only a site's policy names one: the central manifest can neither see nor
    choose what a site mounts. Exactly one of ``claim`` (a PersistentVolumeClaim
    in the job's namespace) and ``hostPath`` (a directory on the node).
    """

    claim: str | None = Field(
        default=None, pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$", description="a PVC"
    )
    host_path: str | None = Field(
        default=None, pattern=r"^/", max_length=4096, description="a node directory"
    )
    mount_path: str = Field(
        default="/data", pattern=r"^/", max_length=4096, description="where the workers see it"
    )
    read_only: bool = Field(default=True, description="the workers only read their data")

    @model_validator(mode="after")
    def _one_source(self) -> DataVolume:
        if (self.claim is None) == (self.host_path is None):
            raise ValueError("give exactly one of claim and hostPath")
        if self.mount_path.startswith(("/etc/fedkube", "/tmp")):
            raise ValueError(f"mountPath {self.mount_path} is taken by fedkube's own files")
        return self


class DataBinding(_Model):
    """A tenant's data as the site binds it: overrides the central manifest's.

    With ``entrypoint``, the site's own loader replaces the manifest's and
    only these kwargs are passed; without it, these kwargs are merged over
    the manifest's (``spec.data.kwargs``, then ``tenants[].data.kwargs``).
    ``volume`` mounts the site's storage into the tenant's worker pods, where
    the kwargs' paths point.
    """

    entrypoint: str | None = Field(default=None, pattern=ENTRYPOINT)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    volume: DataVolume | None = None


class SitePolicy(_Model):
    """One site's rules (chart ``site.policy``, ``fedkube operator --policy``)."""

    participate: bool = Field(default=True, description="false: refuse every job")
    entrypoints: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ENTRYPOINTS),
        description="accepted `module:callable`s; an item ending with '.' or ':' is a prefix",
    )
    images: list[str] = Field(
        default_factory=list,
        description="accepted worker images (exact, or a prefix ending with '/' or ':'); "
        "empty: only the site operator's own --image",
    )
    max_gpus: int | None = Field(
        default=None, ge=0, description="GPUs a tenant's workers may ask together"
    )
    max_memory: str | None = Field(
        default=None, pattern=QUANTITY, description="memory a tenant's workers may ask together"
    )
    data_bindings: dict[str, DataBinding] = Field(
        default_factory=dict, description="tenant -> the site's own data entrypoint and kwargs"
    )

    @field_validator("entrypoints")
    @classmethod
    def _entrypoint_rules(cls, value: list[str]) -> list[str]:
        # fullmatch: the rule's $ would let match() take "fedkube.examples.\n" too.
        bad = [item for item in value if not re.fullmatch(ENTRYPOINT_RULE, item)]
        if bad:
            raise ValueError(
                f"{bad} are neither module:callable, a module prefix ending with '.' or ':', "
                "nor a script's .py file"
            )
        return value

    @field_validator("images")
    @classmethod
    def _image_rules(cls, value: list[str]) -> list[str]:
        if any(not item.strip() or any(c.isspace() for c in item) for item in value):
            raise ValueError("an image is a non-empty string without spaces")
        return value


@dataclass(frozen=True)
class Refusal:
    """One rule a job breaks at a site: who, which field, which rule, and why."""

    tenant: str  # "" for the central allowlist (the aggregator tier)
    field: str
    rule: str
    message: str

    def describe(self) -> str:
        return f"tenant {self.tenant}: {self.message}" if self.tenant else self.message


def entrypoint_allowed(reference: str, allowed: list[str] | tuple[str, ...]) -> bool:
    return any(
        reference.startswith(item) if item.endswith((".", ":")) else reference == item
        for item in allowed
    )


def image_allowed(image: str, allowed: list[str] | tuple[str, ...]) -> bool:
    return any(
        image.startswith(item) if item.endswith(("/", ":")) else image == item for item in allowed
    )


def memory_bytes(quantity: str) -> Decimal:
    # Imported here: the kubernetes client costs every worker and aggregator process
    # about 0.3 s to import, and only a site's memory limit needs its quantity parser.
    from kubernetes.utils import parse_quantity

    return Decimal(parse_quantity(quantity))


def _entrypoint_refusal(
    tenant: str, field: str, reference: str, allowed: list[str] | tuple[str, ...], where: str
) -> Refusal | None:
    if entrypoint_allowed(reference, allowed):
        return None
    return Refusal(
        tenant,
        field,
        "entrypoints",
        f"{field} {reference!r} is not allowed at {where} (allowed: {', '.join(allowed)})",
    )


def site_tenants(job: FederatedJob, site: str | None) -> list[tuple[int, Tenant]]:
    """The tenants a site runs (``None``: every tenant, as ``fedkube run`` does)."""
    return [(i, t) for i, t in enumerate(job.spec.tenants) if site is None or t.site == site]


def check(job: FederatedJob, policy: SitePolicy, site: str | None, image: str) -> list[Refusal]:
    """Every rule the job breaks at ``site`` (``None``: this machine, every tenant).

    ``image`` is the image the site's workers would run when the job names
    none (the site operator's ``--image``); it is also the only image an
    empty ``images`` list accepts.
    """
    where = f"site {site or LOCAL_SITE}"
    refusals: list[Refusal] = []
    for index, tenant in site_tenants(job, site):
        name = tenant.name
        if not policy.participate:
            refusals.append(
                Refusal(
                    name,
                    f"spec.tenants[{index}].site",
                    "participate",
                    f"{where} does not take part in federated jobs (participate: false)",
                )
            )
            continue
        binding = policy.data_bindings.get(name)
        replaced = binding is not None and binding.entrypoint is not None
        found = [
            _entrypoint_refusal(name, field, reference, policy.entrypoints, where)
            for field, reference in job.spec.code_references()
            # A site's own data entrypoint replaces the manifest's: only the site's runs.
            if not (replaced and field == "spec.data.entrypoint")
        ]
        refusals += [r for r in found if r is not None]
        wanted = job.spec.image or image
        images = policy.images or [image]
        if not image_allowed(wanted, images):
            refusals.append(
                Refusal(
                    name,
                    "spec.image",
                    "images",
                    f"spec.image {wanted!r} is not allowed at {where} "
                    f"(allowed: {', '.join(images)})",
                )
            )
        refusals += _resource_refusals(index, tenant, policy, where)
    return refusals


def _resource_refusals(index: int, tenant: Tenant, policy: SitePolicy, where: str) -> list[Refusal]:
    refusals: list[Refusal] = []
    gpus = tenant.resources.gpu * tenant.replicas
    if policy.max_gpus is not None and gpus > policy.max_gpus:
        refusals.append(
            Refusal(
                tenant.name,
                f"spec.tenants[{index}].resources.gpu",
                "maxGpus",
                f"spec.tenants[{index}].resources.gpu asks {gpus} GPUs "
                f"({tenant.resources.gpu} x {tenant.replicas} workers), more than "
                f"maxGpus {policy.max_gpus} at {where}",
            )
        )
    if policy.max_memory is not None:
        field = f"spec.tenants[{index}].resources.memory"
        memory = tenant.resources.memory
        if memory is None:
            refusals.append(
                Refusal(
                    tenant.name,
                    field,
                    "maxMemory",
                    f"{field} is not set, and {where} caps a job's memory at "
                    f"maxMemory {policy.max_memory}",
                )
            )
        elif memory_bytes(memory) * tenant.replicas > memory_bytes(policy.max_memory):
            refusals.append(
                Refusal(
                    tenant.name,
                    field,
                    "maxMemory",
                    f"{field} asks {memory} x {tenant.replicas} workers, more than "
                    f"maxMemory {policy.max_memory} at {where}",
                )
            )
    return refusals


def check_central(job: FederatedJob, allowed: tuple[str, ...]) -> list[Refusal]:
    """The central allowlist: the code the global aggregator imports and calls.

    The global aggregator builds the model (``spec.task`` or ``spec.model``)
    and evaluates it on the held-out split (the task's or ``spec.data``'s
    data, role ``test``).
    """
    where = "this operator (--allow-entrypoint)"
    found = [
        _entrypoint_refusal("", field, reference, allowed, where)
        for field, reference in job.spec.code_references()
    ]
    return [r for r in found if r is not None]


def refused_tenants(refusals: list[Refusal]) -> dict[str, str]:
    """Tenant -> every reason it is refused, joined (what conditions and Redis carry)."""
    by_tenant: dict[str, list[str]] = {}
    for refusal in refusals:
        by_tenant.setdefault(refusal.tenant, []).append(refusal.message)
    return {tenant: "; ".join(messages) for tenant, messages in by_tenant.items()}


def parse_policy(document: Any) -> SitePolicy:
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise PolicyError([("<root>", "a site policy must be a mapping")])
    check_tree(document, PolicyError)  # its data bindings go to the workers as JSON
    try:
        return SitePolicy.model_validate(document)
    except ValidationError as exc:
        raise PolicyError(
            [(_field_path(err["loc"]) or "<root>", err["msg"]) for err in exc.errors()]
        ) from None


def load_policy(path: str | Path) -> SitePolicy:
    """Read a policy file (YAML or JSON: the chart renders it into a ConfigMap)."""
    documents = read_yaml(path, PolicyError)
    if len(documents) > 1:
        raise PolicyError([("<root>", f"expected one policy in {path}, found {len(documents)}")])
    return parse_policy(documents[0] if documents else None)


def data_binding_document(binding: DataBinding) -> dict[str, Any]:
    """What the site operator hands its workers (``fedkube worker --data-binding``)."""
    return binding.model_dump(mode="json", by_alias=True, exclude_none=True)


def load_data_binding(path: str | Path) -> DataBinding:
    documents = read_yaml(path, PolicyError, "--data-binding")
    if len(documents) > 1:
        raise PolicyError([("--data-binding", f"{path} holds {len(documents)} documents, not one")])
    try:
        return DataBinding.model_validate(documents[0] if documents else {})
    except ValidationError as exc:
        raise PolicyError(
            [(_field_path(err["loc"]) or "<root>", err["msg"]) for err in exc.errors()]
        ) from None
