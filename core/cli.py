"""The ``fedkube`` command line.

User commands: ``run`` (the embedded runtime, or Ray), ``compare`` (federated
vs centralised vs each tenant alone, or strategies or compressions side by
side), ``validate``, ``export`` (a LoRA job's merged model). Service commands (what
the pods and the local runtime execute): ``aggregator``, ``combiner``,
``worker``. Secrets come from the environment (``FEDKUBE_TOKEN`` and
``FEDKUBE_SIGNING_KEY``: a worker's tenant's, or a combiner's region's;
``FEDKUBE_AGGREGATOR_TOKEN``: a combiner's token to the global tier) or files,
never from arguments that ``ps`` would show.

Exit codes: 0 success, 1 the job failed, 2 invalid input, 3 lease lost,
130 interrupted.

Over 400 lines on purpose: one parser, so that every command's flags, help and
checks read as ``fedkube --help`` shows them; each command's work is a call
into the package that does it (``fedkube.local``, ``fedkube.tools``, the
services).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedkube.errors import FedkubeError, SpecError
from fedkube.spec import load_job

if TYPE_CHECKING:
    from fedkube.service.tls import Tls
    from fedkube.spec import FederatedJob

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_LEASE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise FedkubeError(f"environment variable {name} is not set")
    return value


def _redis_url(url: str) -> str:
    """``--redis-url`` with the password from ``FEDKUBE_REDIS_PASSWORD`` (a Secret) set."""
    from fedkube.state.roundstate import REDIS_PASSWORD_ENV, redis_url_with_password

    try:
        return redis_url_with_password(url, os.environ.get(REDIS_PASSWORD_ENV))
    except ValueError as exc:
        raise SpecError([("--redis-url", str(exc))]) from None


def _redis_url_without_password(url: str) -> str:
    """``--redis-url`` checked; a password must come from ``FEDKUBE_REDIS_PASSWORD``."""
    from urllib.parse import urlsplit

    from fedkube.state.roundstate import redis_url_with_password

    try:
        redis_url_with_password(url, None)  # checks the scheme
    except ValueError as exc:
        raise SpecError([("--redis-url", str(exc))]) from None
    if urlsplit(url).password:
        raise SpecError(
            [("--redis-url", "put the password in $FEDKUBE_REDIS_PASSWORD, not in the URL")]
        )
    return url


def cmd_validate(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    clients = job.clients()
    if args.policy:
        from fedkube.errors import PolicyRefused
        from fedkube.operator.config import DEFAULT_IMAGE
        from fedkube.policy import check, load_policy

        refusals = check(job, load_policy(args.policy), args.site, args.image or DEFAULT_IMAGE)
        if refusals:
            raise PolicyRefused([(r.field, r.describe()) for r in refusals])
    print(
        f"{args.job}: valid FederatedJob {job.name!r}: {len(job.spec.tenants)} tenants, "
        f"{len(clients)} clients, {len(job.spec.regions)} regions, {job.spec.rounds} rounds"
    )
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from fedkube.local.runner import RunOptions, run_job

    options = RunOptions(
        job_path=Path(args.job),
        out_dir=Path(args.out) if args.out else None,
        resume=args.resume,
        runtime=args.runtime,
        ray_address=args.ray_address,
        redis_url=args.redis_url,
        quiet=args.quiet,
        history_format=args.history_format,
        policy_path=Path(args.policy) if args.policy else None,
    )
    result = run_job(options)
    return EXIT_OK if result.status == "succeeded" else EXIT_FAILED


def cmd_compare(args: argparse.Namespace) -> int:
    from fedkube.tools.baselines import compare, compare_strategies

    out = Path(args.out) if args.out else None
    given = [a for a in (args.strategies, args.compression, args.dp) if a is not None]
    if len(given) > 1:
        raise FedkubeError("compare: give one of --strategies, --compression and --dp")
    variants, axis = args.strategies, "strategy"
    if args.compression is not None:
        variants, axis = args.compression, "compression"
    if args.dp is not None:
        variants, axis = ["none", *(e for e in args.dp if e != "none")], "dp"
    if variants is None:
        if args.seeds is not None or args.target is not None:
            raise FedkubeError(
                "compare: --seeds and --target only apply with --strategies, --compression or --dp"
            )
        report = compare(Path(args.job), out, quiet=args.quiet)
        print(report.table())
        return EXIT_OK if report.federated_status == "succeeded" else EXIT_FAILED
    comparison = compare_strategies(
        Path(args.job),
        variants,
        seeds=args.seeds or 1,
        out_dir=out,
        target=args.target,
        quiet=args.quiet,
        axis=axis,
    )
    print(comparison.table())
    return EXIT_OK if comparison.all_succeeded else EXIT_FAILED


def _strategy_list(text: str) -> list[str]:
    """``--strategies fedavg,scaffold``: valid names, in order, each once.

    Each name is checked by the spec's own ``Strategy`` model, so the flag
    accepts exactly what ``spec.strategy.name`` accepts.
    """
    from pydantic import ValidationError

    from fedkube.spec import Strategy

    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise argparse.ArgumentTypeError("give at least one strategy, e.g. fedavg,scaffold")
    for name in names:
        try:
            Strategy.model_validate({"name": name})
        except ValidationError as exc:
            reason = "; ".join(error["msg"] for error in exc.errors())
            raise argparse.ArgumentTypeError(f"strategy {name!r}: {reason}") from None
    return names


def _compression_list(text: str) -> list[str]:
    """``--compression none,int8,topk:0.01``: valid upload compressions, in order, each once."""
    from pydantic import ValidationError

    from fedkube.tools.baselines import compression_setting

    labels = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not labels:
        raise argparse.ArgumentTypeError("give at least one compression, e.g. none,int8,topk:0.01")
    for label in labels:
        try:
            compression_setting(label)
        except (ValueError, ValidationError) as exc:
            raise argparse.ArgumentTypeError(f"compression {label!r}: {exc}") from None
    return labels


def _epsilon_list(text: str) -> list[str]:
    """``--dp 1,4,8``: target epsilons (and ``none``), in order, each once."""
    labels = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not labels:
        raise argparse.ArgumentTypeError("give at least one target epsilon, e.g. 1,4,8")
    for label in labels:
        try:
            if label != "none" and not float(label) > 0:
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--dp {label!r}: a target epsilon is a positive number (or none)"
            ) from None
    return labels


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not at least 1")
    return value


def _accuracy(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not an accuracy in (0, 1]")
    return value


def _tls(job: FederatedJob, args: argparse.Namespace) -> Tls | None:
    """The service's TLS for ``spec.transport.tls`` (None: disabled), its files checked."""
    from fedkube.service.tls import TlsError, configured

    try:
        return configured(job.spec.transport.tls.mode, args.tls_dir)
    except TlsError as exc:
        raise SpecError([("--tls-dir", str(exc))]) from None


def cmd_aggregator(args: argparse.Namespace) -> int:
    from fedkube.aggregator.global_aggregator import GlobalConfig, run_global
    from fedkube.service.logs import configure
    from fedkube.service.web import load_digests, port_file_write, stop_on_signals
    from fedkube.wire.signing import load_verify_keys

    configure("global", args.log_level)
    job = load_job(args.job)
    config = GlobalConfig(
        job=job,
        redis_url=_redis_url(args.redis_url),
        checkpoint_dir=Path(args.checkpoint_dir),
        region_digests=load_digests(args.region_tokens),
        region_keys=load_verify_keys(args.region_keys, "--region-keys", "region"),
        host=args.host,
        port=args.port,
        resume=args.resume,
        tls=_tls(job, args),
    )

    async def main() -> str:
        stop = asyncio.Event()
        stop_on_signals(stop)
        return await run_global(
            config, stop, on_ready=lambda port: port_file_write(args.port_file, port)
        )

    status = asyncio.run(main())
    return {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "lease-lost": EXIT_LEASE}.get(
        status, EXIT_INTERRUPTED
    )


def cmd_combiner(args: argparse.Namespace) -> int:
    from fedkube.aggregator.combiner import CombinerConfig, run_combiner
    from fedkube.service.logs import configure
    from fedkube.service.web import (
        AGGREGATOR_TOKEN_ENV,
        load_digests,
        port_file_write,
        stop_on_signals,
    )
    from fedkube.wire.signing import SIGNING_KEY_ENV, load_signing_key, load_verify_keys

    configure("combiner", args.log_level)
    job = load_job(args.job)
    if args.region not in job.region_names():
        raise SpecError([("--region", f"{args.region!r} is not a region of job {job.name!r}")])
    config = CombinerConfig(
        job=job,
        region=args.region,
        redis_url=_redis_url(args.redis_url),
        global_url=args.global_url,
        tenant_digests=load_digests(args.tenant_tokens),
        tenant_keys=load_verify_keys(args.tenant_keys),
        aggregator_token=_env(AGGREGATOR_TOKEN_ENV),
        signing_key=load_signing_key(os.environ.get(SIGNING_KEY_ENV), f"${SIGNING_KEY_ENV}"),
        host=args.host,
        port=args.port,
        tls=_tls(job, args),
    )

    async def main() -> None:
        stop = asyncio.Event()
        stop_on_signals(stop)
        await run_combiner(
            config, stop, on_ready=lambda port: port_file_write(args.port_file, port)
        )

    asyncio.run(main())
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    from fedkube.policy import load_data_binding
    from fedkube.service.logs import configure
    from fedkube.service.web import TOKEN_ENV, port_file_write, stop_on_signals
    from fedkube.wire.signing import SIGNING_KEY_ENV, load_signing_key
    from fedkube.workers.runtime import Worker, WorkerConfig, pick_device, serve_metrics

    configure("worker", args.log_level)
    job = load_job(args.job)
    flag, wanted = ("--group", args.group) if args.group else ("--client", args.client)
    groups = {g.name: g for g in job.worker_groups()}
    if wanted not in groups:
        names = sorted(groups)
        shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
        what = "worker group" if job.spec.simulation else "client"
        raise SpecError(
            [(flag, f"{wanted!r} is not a {what} of job {job.name!r} ({what}s: {shown})")]
        )
    group = groups[wanted]
    tenant = next(t for t in job.spec.tenants if t.name == group.tenant)
    config = WorkerConfig(
        job=job,
        clients=group.clients,
        name=group.name,
        combiner_url=args.combiner_url,
        token=_env(TOKEN_ENV),
        signing_key=load_signing_key(
            os.environ.get(SIGNING_KEY_ENV),
            f"environment variable {SIGNING_KEY_ENV} (tenant {tenant.name!r})",
        ),
        device=pick_device(tenant.resources.gpu),
        state_dir=Path(args.state_dir) if args.state_dir else None,
        data_binding=load_data_binding(args.data_binding) if args.data_binding else None,
        tls=_tls(job, args),
    )
    worker = Worker(config)
    if args.metrics_port is not None:
        port = serve_metrics(worker.metrics, args.host, args.metrics_port)
        port_file_write(args.port_file, port)

    async def main() -> str:
        stop = asyncio.Event()
        stop_on_signals(stop)
        return await worker.run(stop)

    status = asyncio.run(main())
    return EXIT_OK if status in ("succeeded", "stopped") else EXIT_FAILED


def cmd_export(args: argparse.Namespace) -> int:
    from fedkube.tools.export import export_merged

    job = load_job(args.job)
    directory = Path(args.checkpoint_dir or Path("runs") / job.name / "checkpoints")
    done = export_merged(job, directory, Path(args.out))
    print(
        f"fedkube export {job.name}: round {done.round}'s {done.adapter_tensors} adapter "
        f"tensors ({done.adapter_bytes:,} bytes) merged into the base: {done.path} "
        f"({done.model_tensors} tensors, {done.model_bytes:,} bytes)"
    )
    return EXIT_OK


def cmd_operator(args: argparse.Namespace) -> int:
    from fedkube.operator.config import DEFAULT_IMAGE, DEFAULT_SLIM_IMAGE, OperatorConfig
    from fedkube.operator.leader import Election
    from fedkube.operator.main import Runtime, run
    from fedkube.policy import DEFAULT_ENTRYPOINTS, SitePolicy, load_policy
    from fedkube.service.logs import configure
    from fedkube.state.roundstate import REDIS_PASSWORD_ENV

    configure("operator", args.log_level)
    config = OperatorConfig(
        image=args.image or DEFAULT_IMAGE,
        slim_image=args.slim_image or DEFAULT_SLIM_IMAGE,
        image_pull_policy=args.image_pull_policy,
        # The URL goes into the pods' args: it must not carry the password,
        # which reaches them through a Secret instead.
        redis_url=_redis_url_without_password(args.redis_url) if args.redis_url else None,
        redis_password=os.environ.get(REDIS_PASSWORD_ENV) or None,
        gpu_resource=args.gpu_resource,
        site=args.site,
        central_address=args.central_address,
        namespaces=tuple(args.namespace),
        status_interval_s=args.status_interval,
        aggregator_cpu=args.aggregator_cpu,
        aggregator_memory=args.aggregator_memory,
        combiner_cpu=args.combiner_cpu,
        combiner_memory=args.combiner_memory,
        policy=load_policy(args.policy) if args.policy else SitePolicy(),
        allow_entrypoints=tuple(args.allow_entrypoint) or DEFAULT_ENTRYPOINTS,
    )
    runtime = Runtime(
        kubeconfig=args.kubeconfig,
        metrics_port=args.metrics_port,
        health_port=args.health_port or None,
        peering=args.peering,
        election=(
            Election(
                namespace=args.lease_namespace,
                name=args.lease_name,
                identity=os.environ.get("POD_NAME") or socket.gethostname(),
            )
            if args.leader_election
            else None
        ),
    )
    run(config, runtime)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedkube", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a FederatedJob manifest on this machine (or Ray)")
    p.add_argument("job", help="FederatedJob manifest (YAML)")
    p.add_argument("--out", help="run directory (default runs/<job name>)")
    p.add_argument(
        "--resume", action="store_true", help="continue a killed run from its last closed round"
    )
    p.add_argument("--runtime", choices=["process", "ray"], default="process")
    p.add_argument("--ray-address", help="existing Ray cluster (implies --runtime ray)")
    p.add_argument("--redis-url", help="use this Redis instead of starting redis-server")
    p.add_argument("--history-format", choices=["jsonl", "csv"], default="jsonl")
    p.add_argument("--quiet", action="store_true", help="no per-round progress lines")
    p.add_argument(
        "--policy",
        help="a site policy (YAML) for this machine: refused tenants take no part, "
        "data bindings replace the manifest's",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="federated vs centralised vs each tenant alone")
    p.add_argument("job")
    p.add_argument("--out")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--strategies",
        type=_strategy_list,
        help="comma-separated strategies to run the job with, e.g. fedavg,fedprox,scaffold; "
        "one table row each (default: the manifest's strategy, the plain comparison)",
    )
    p.add_argument(
        "--compression",
        type=_compression_list,
        help="comma-separated upload compressions to run the job with: none, fp16, int8, "
        "int8:<block size>, topk:<fraction>, e.g. none,int8,topk:0.01; one table row each",
    )
    p.add_argument(
        "--dp",
        type=_epsilon_list,
        help="comma-separated target epsilons, e.g. 1,4,8: the job (which must set "
        "spec.privacy.dp) once per epsilon and once without privacy; one table row each",
    )
    p.add_argument(
        "--seeds",
        type=_positive_int,
        help="with --strategies, --compression or --dp: seeds per row, spec.seed, "
        "spec.seed+1, ... "
        "(default 1)",
    )
    p.add_argument(
        "--target",
        type=_accuracy,
        help="with --strategies: accuracy (0-1] for the rounds-to-target column "
        "(default 90%% of the centralised accuracy)",
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("validate", help="check a manifest and say what is wrong")
    p.add_argument("job")
    p.add_argument("--policy", help="also check it against this site policy (YAML)")
    p.add_argument("--site", help="with --policy: the tenants of this site (default: every tenant)")
    p.add_argument(
        "--image", help="with --policy: the site operator's --image (default: fedkube's)"
    )
    p.set_defaults(func=cmd_validate)

    def service(name: str, helptext: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--job", required=True, help="FederatedJob manifest (the ConfigMap)")
        s.add_argument("--host", default="127.0.0.1")
        s.add_argument("--port-file", help="write the bound port here (for --port 0)")
        s.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)
        s.add_argument(
            "--tls-dir",
            help="with spec.transport.tls: the folder of ca.crt, tls.crt and tls.key (default "
            "$FEDKUBE_TLS_DIR)",
        )
        return s

    p = service("aggregator", "global aggregator service")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--checkpoint-dir", required=True)
    p.add_argument(
        "--region-tokens", required=True, help="JSON file: region -> its combiner's token digest"
    )
    p.add_argument(
        "--region-keys",
        required=True,
        help="JSON file: region -> base64 Ed25519 public key (its partials' signatures)",
    )
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_aggregator)

    p = service("combiner", "regional combiner service")
    p.add_argument("--region", required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--global-url", required=True)
    p.add_argument("--tenant-tokens", required=True, help="JSON file: tenant -> sha256 digest")
    p.add_argument(
        "--tenant-keys",
        required=True,
        help="JSON file: tenant -> base64 Ed25519 public key (its updates' signatures)",
    )
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_combiner)

    p = service("worker", "the training loop of one client, or of a group of virtual clients")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--client", help="client id, <tenant>-<replica>")
    who.add_argument(
        "--group", help="under spec.simulation: worker group <tenant>-v<k> (its virtual clients)"
    )
    p.add_argument("--combiner-url", required=True)
    p.add_argument(
        "--state-dir",
        help="where each client keeps its durable state (SCAFFOLD's c_i, top-k residuals), in "
        "<state-dir>/<client> (default: $FEDKUBE_STATE_DIR/<job>, else under the temp dir)",
    )
    p.add_argument("--metrics-port", type=int, help="serve /metrics here (0: any free port)")
    p.add_argument(
        "--data-binding",
        help="the site's own data entrypoint and kwargs (JSON/YAML), over the manifest's",
    )
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser(
        "export", help="a LoRA job's result as one model: base and adapters merged, safetensors"
    )
    p.add_argument("job", help="FederatedJob manifest (YAML) with spec.training.peft")
    p.add_argument(
        "--checkpoint-dir",
        help="the global aggregator's checkpoints (default runs/<job name>/checkpoints)",
    )
    p.add_argument("--out", required=True, help="the merged model's .safetensors file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("operator", help="reconcile FederatedJobs on a Kubernetes cluster")
    p.add_argument("--kubeconfig", help="default: in-cluster, else $KUBECONFIG")
    p.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="watch only this namespace (repeatable; default: every namespace)",
    )
    p.add_argument("--redis-url", help="Redis for jobs that set no spec.state.redisUrl")
    p.add_argument("--image", default=None, help="image of the workers and the global aggregator")
    p.add_argument(
        "--slim-image", default=None, help="image of the combiners (no torch: fedkube-slim)"
    )
    p.add_argument("--image-pull-policy", default="IfNotPresent")
    p.add_argument("--gpu-resource", default="nvidia.com/gpu", help="extended resource of a GPU")
    p.add_argument("--site", help="site mode: run only the tenants of this site")
    p.add_argument(
        "--policy",
        help="site mode: the site's policy (YAML): entrypoints, images, resources, "
        "data bindings (default: only fedkube's examples and loaders)",
    )
    p.add_argument(
        "--allow-entrypoint",
        action="append",
        default=[],
        help="central mode: a model/data entrypoint (or a module prefix ending with '.' or "
        "':') the aggregator tier may run (repeatable; default: fedkube's examples and loaders)",
    )
    p.add_argument(
        "--central-address",
        help="site mode: URL template of a region's combiner, with {job}, {namespace}, {region}",
    )
    p.add_argument("--status-interval", type=float, default=2.0, help="seconds between passes")
    p.add_argument("--aggregator-cpu", default="500m", help="global aggregator's CPU request")
    p.add_argument(
        "--aggregator-memory", default="2Gi", help="global aggregator's memory (request = limit)"
    )
    p.add_argument("--combiner-cpu", default="250m", help="each combiner's CPU request")
    p.add_argument(
        "--combiner-memory", default="512Mi", help="each combiner's memory (request = limit)"
    )
    p.add_argument("--metrics-port", type=int, default=8000)
    p.add_argument("--health-port", type=int, default=8081, help="0: no liveness endpoint")
    p.add_argument("--peering", help="kopf peering name (several replicas, one active)")
    p.add_argument(
        "--leader-election",
        action="store_true",
        help="run only while holding a coordination.k8s.io Lease (several replicas, one active)",
    )
    p.add_argument(
        "--lease-namespace",
        default=os.environ.get("POD_NAMESPACE", "default"),
        help="namespace of the Lease (default: $POD_NAMESPACE, else default)",
    )
    p.add_argument("--lease-name", default="fedkube-operator", help="name of the Lease")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)
    p.set_defaults(func=cmd_operator)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "ray_address", None):
        args.runtime = "ray"
    try:
        return int(args.func(args))
    except SpecError as exc:
        print(f"fedkube: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except FedkubeError as exc:
        print(f"fedkube: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        logging.getLogger("fedkube").warning("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
