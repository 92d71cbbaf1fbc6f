"""Secure aggregation beside the same job in the clear, in one run: round time and uploads.

Both jobs are ``fedkube run`` on the same generated manifest (the machinery
of ``vs_flower.py``: real redis-server, global aggregator, two combiners and
worker processes; each client does one SGD step on one sample of
``bench_models``' dense layer), once as is and once with
``spec.privacy.secureAggregation: {}`` (defaults: SecAgg+ degree
``2⌈log2 n⌉ + 2``, threshold 2/3, clipRange 8). All clients take part in
every round; 2 tenants (one per region), each one worker process of virtual
clients.

Reported, per case:

* round time: median span of rounds 2.. (round 1 warms up) over all runs of
  the job (``--repeats``, clear and secure alternating), from the global
  tier opening the round to its close, read from ``logs/global.log``; the
  secure round includes the three extra exchanges (shares, masked update,
  unmasking shares) and the masking on both sides. Goal: secure ≤ 5× clear.
* upload per client and round: the update's bytes (``bytes_up`` / reported:
  the float32 update in the clear, the uint32 masked update when secure),
  and apart, secure aggregation's key material (``secagg_bytes``: the keys,
  sealed shares and revealed shares each client POSTs). Goal: the masked
  update ≤ 1.05× the float32 update.

``python benchmarks/secagg.py`` (100 clients x 1M parameters, 4 rounds);
``--quick`` is a smoke test of the machinery (12 clients x 10k, 3 rounds).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from vs_flower import cli_manifest, fedkube_cli_case, machine, params_of  # noqa: E402

GOAL_TIME = 5.0
GOAL_UPLOAD = 1.05


def per_client(result: dict[str, Any], history_key: str) -> float | None:
    """Median over rounds 2.. of a round's ``history_key`` bytes per reporting client."""
    values = [
        r[history_key] / r["reported"]
        for r in result["history"]
        if r.get("reported") and history_key in r
    ]
    return statistics.median(values) if values else None


def run_case(manifest: dict[str, Any], clients: int) -> dict[str, Any]:
    result = fedkube_cli_case(manifest, clients)
    if not result["complete"]:
        raise RuntimeError(f"a round missed clients: {result['rounds']}")
    return result


def measure(clients: int, n: int, rounds: int, repeats: int) -> dict[str, Any]:
    """Clear and secure runs alternated ``repeats`` times: a busy spell hits both."""
    half = clients // 2
    clear = cli_manifest("secagg-bench", rounds, 2, half, n, clients_per_worker=half)
    secure = copy.deepcopy(clear)
    secure["spec"]["privacy"] = {"secureAggregation": {}}
    runs: dict[str, list[dict[str, Any]]] = {"clear": [], "secure": []}
    for _ in range(repeats):
        runs["clear"].append(run_case(clear, clients))
        runs["secure"].append(run_case(secure, clients))
    cases = {}
    for name, results in runs.items():
        spans = [s for r in results for s in r["spans_s"]]
        cases[name] = {
            "median_span_s": statistics.median(spans),
            "spans_s": spans,
            "history": [h for r in results for h in r["history"][1:]],
            "peak_pss_bytes": max(r["peak_pss_bytes"] or 0 for r in results),
        }
    return {
        "clients": clients,
        "params": params_of(n),
        "rounds": rounds,
        "repeats": repeats,
        "machine": machine(),
        "cases": cases,
    }


def print_report(raw: dict[str, Any]) -> None:
    clear, secure = raw["cases"]["clear"], raw["cases"]["secure"]
    fp32 = 4 * raw["params"]
    up_clear = per_client(clear, "bytes_up")
    up_secure = per_client(secure, "bytes_up")
    keys = per_client(secure, "secagg_bytes")
    ratio = secure["median_span_s"] / clear["median_span_s"]
    print(
        f"\nsecure aggregation, {raw['clients']} clients x {raw['params']:,} parameters, "
        f"all per round, {raw['rounds']} rounds (round 1 is the warm-up), each job "
        f"{raw['repeats']} times, alternating\n"
    )
    print("| measure | clear | secure | ratio | goal | met |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(
        f"| round time (median) | {clear['median_span_s']:.2f} s | "
        f"{secure['median_span_s']:.2f} s | {ratio:.2f}x | <= {GOAL_TIME:g}x | "
        f"{'yes' if ratio <= GOAL_TIME else 'no'} |"
    )
    if up_clear and up_secure:
        up_ratio = up_secure / fp32
        print(
            f"| update upload per client | {up_clear / 1e6:.3f} MB | {up_secure / 1e6:.3f} MB | "
            f"{up_ratio:.4f}x fp32 | <= {GOAL_UPLOAD:g}x | "
            f"{'yes' if up_ratio <= GOAL_UPLOAD else 'no'} |"
        )
    if keys is not None:
        print(f"| key material per client | - | {keys / 1e3:.1f} KB | - | reported apart | - |")
    print(
        f"| peak memory (PSS, all processes) | {clear['peak_pss_bytes'] / 1e9:.2f} GB | "
        f"{secure['peak_pss_bytes'] / 1e9:.2f} GB | - | - | - |"
    )
    print(f"\nfp32 update: {fp32 / 1e6:.3f} MB; machine: {raw['machine']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--n", type=int, default=1000, help="dense layer n x n (+ n)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each job, alternating")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.n, args.rounds, args.repeats = 12, 100, 3, 1
    raw = measure(args.clients, args.n, args.rounds, args.repeats)
    print_report(raw)
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2, default=str))


if __name__ == "__main__":
    main()
