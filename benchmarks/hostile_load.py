"""A compromised tenant hammering a combiner while honest clients train: what it costs.

The services run in this process (``round_overhead.running_services``: a
``redis-server``, the global aggregator and a combiner per region, loopback
HTTP), the honest clients in a second process (``round_overhead``'s clients
that train for zero seconds and send zero deltas, signed, retrying when the
combiner says busy, as a Worker does). In the scenario under attack, a third
process holds tenant ``mallory``'s credentials (its token and signing key) and
plays its one client. Each round it first sends one valid update (zeros, as
the honest ones: a compromised tenant can always send a well-formed update;
poisoning is the robust rules' business, not this benchmark's), then, until
the round closes, without pause:

* 8 uploads at a time that announce ``maxUpdateBytes`` and trickle 1 KB
  (a slowloris: the in-flight budget admits what mallory's share holds, the
  rest is told 429 busy; the admitted ones are cut off as too slow);
* signed bodies of 64 KB of random bytes, and signed payloads whose header
  nests 100,000 lists deep;
* a poll whose JSON nests 100,000 deep, and a Content-Length over the limit;
* its previous round's update, replayed;
* and, as a stranger, connections that write random bytes and hang up.

In the baseline the same client (``mallory-0``) is honest. Both scenarios
check that every round closed with every client and that the final model is
bit-identical to the first (every honest delta is zero, so any hostile byte
that got into a sum would show). The table gives the round time, the
services' peak resident memory above their start, the largest in-flight
bytes a combiner admitted, and the attacker's requests by outcome.

Run:  .venv/bin/python benchmarks/hostile_load.py   (``make bench``)

``--quick`` (10 clients, a 10,100-parameter model, 3 rounds, 64 MB updates at
most) is the smoke test in tests/integration/test_benchmarks.py.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # round_overhead, bench_models

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
from round_overhead import (  # noqa: E402
    BENCH_DATA,
    BENCH_MODEL,
    QUICK_DATA,
    QUICK_MODEL,
    last_json_line,
    manifest,
    running_services,
    start_child,
)

from fedkube.service.bodies import read_response  # noqa: E402
from fedkube.spec import parse_job  # noqa: E402
from fedkube.wire import codec, signing  # noqa: E402
from fedkube.wire.protocol import (  # noqa: E402
    H_CLIENT,
    H_CODEC,
    H_JOB,
    H_ROUND,
    H_SIGNATURE,
    H_TENANT,
    H_WEIGHT,
    Envelope,
)

MALLORY = "mallory"
SLOW_UPLOADS = 8
SCENARIO_TIMEOUT_S = 600.0
MB = 1024 * 1024


def job_manifest(quick: bool, rounds: int) -> dict[str, Any]:
    """Honest tenants (2 x 5 clients quick, 10 x 10 full) plus mallory's one client in eu.

    A body may lag the minimum upload rate by 3 s (not the default 30 s), so that
    mallory's slow bodies are cut off, and a round can close, within seconds.
    """
    tenants, replicas = (2, 5) if quick else (10, 10)
    model, data = (QUICK_MODEL, QUICK_DATA) if quick else (BENCH_MODEL, BENCH_DATA)
    document = manifest("bench-hostile", rounds, tenants, replicas, model, data)
    spec = document["spec"]
    spec["tenants"].append({"name": MALLORY, "region": "eu", "replicas": 1})
    spec["participation"]["minFraction"] = 1.0  # every client, every round
    spec["transport"] = {"bodyTimeoutSeconds": 3}
    if quick:
        spec["transport"].update(maxUpdateBytes=64 * MB, maxInflightBytes=256 * MB)
    return document


# -- the attacker ---------------------------------------------------------------------
class Attacker:
    """Mallory's client: one valid update per round, then abuse until the round closes."""

    def __init__(self, config: dict[str, Any]):
        self.job = parse_job(config["manifest"])
        self.url: str = config["url"]
        self.port = int(self.url.rsplit(":", 1)[1])
        self.token: str = config["token"]
        self.key = signing.load_signing_key(config["signing_key"], "mallory's key")
        self.client = f"{MALLORY}-0"
        self.limit = self.job.spec.transport.max_update_bytes
        self.round = 0
        self.captured: tuple[bytes, str] | None = None  # the previous round's update
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.stop_abuse = asyncio.Event()
        self.rng = np.random.default_rng(11)

    def identity(self) -> dict[str, str]:
        """What every request of mallory's client carries: its token and names."""
        return {
            "Authorization": f"Bearer {self.token}",
            H_JOB: self.job.name,
            H_TENANT: MALLORY,
            H_CLIENT: self.client,
        }

    def headers(self, number: int, signature: str) -> dict[str, str]:
        """An update's headers: the identity, the round, the weight and the signature."""
        return {
            **self.identity(),
            H_ROUND: str(number),
            H_WEIGHT: "64.0",
            H_CODEC: codec.CODEC,
            H_SIGNATURE: signature,
        }

    def sign(self, number: int, body: bytes) -> str:
        digest = signing.payload_digest([body])
        return signing.sign(self.key, self.job.name, number, self.client, digest)

    def count(self, status: int, answer: Any) -> None:
        reason = answer.get("error", "?") if isinstance(answer, dict) else "?"
        self.outcomes[f"{status} {reason}"] += 1

    async def run(self) -> None:
        """Each round: abuse for the grace of a slow body and a second more, then report."""
        window = self.job.spec.transport.body_timeout_seconds + 1
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            last = 0
            while True:
                poll = {"clients": [self.client], "after": last, "wait": 20}
                async with http.post(
                    f"{self.url}/v1/tasks", json=poll, headers=self.identity()
                ) as r:
                    answer = await r.json()
                if answer["status"] == "done":
                    break
                tasks = [t for t in answer.get("tasks", []) if t["status"] == "train"]
                if not tasks:
                    continue
                number, version = int(tasks[0]["round"]), int(tasks[0]["version"])
                self.round = last = number
                # Abuse while mallory-0 is a selected client that has not reported (after
                # that, every upload of it is refused as a duplicate before its body).
                self.stop_abuse.clear()
                abuse = [
                    *(asyncio.create_task(self.slowloris()) for _ in range(SLOW_UPLOADS)),
                    asyncio.create_task(self.malformed(http)),
                    asyncio.create_task(self.flood()),
                ]
                await asyncio.sleep(window)
                self.stop_abuse.set()
                await asyncio.gather(*abuse)
                await self.send_valid(http, number, version)

    async def send_valid(self, http: aiohttp.ClientSession, number: int, version: int) -> None:
        async with http.get(f"{self.url}/v1/model/{version}", headers=self.identity()) as response:
            response.raise_for_status()
            tensors, _meta = codec.decode(await read_response(response))
        delta = {name: np.zeros(a.shape, np.float32) for name, a in tensors.items()}
        envelope = Envelope(self.job.name, number, self.client, MALLORY, 64.0)
        body = codec.encode(delta, envelope.metadata("update"))
        signature = self.sign(number, body)
        while True:
            async with http.post(
                f"{self.url}/v1/update", data=body, headers=self.headers(number, signature)
            ) as response:
                answer = await response.json(content_type=None)
            if answer.get("error") != "busy":
                break
            await asyncio.sleep(0.2)
        if response.status != 200 and answer.get("error") != "duplicate":
            raise RuntimeError(f"mallory's valid update refused: {answer}")
        self.captured = body, signature

    async def raw_update(self, number: int, announced: int) -> None:
        """An upload written on a socket: the headers, ``announced`` bytes claimed, 1 KB sent."""
        signature = self.sign(number, b"x")
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = {**self.headers(number, signature), "Content-Length": str(announced)}
        text = "POST /v1/update HTTP/1.1\r\nHost: bench\r\n"
        text += "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n"
        try:
            writer.write(text.encode() + b"\0" * 1024)
            await writer.drain()
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.outcomes["connection reset"] += 1
            return
        finally:
            writer.close()
        self.count(int(status_line.split()[1]), json.loads(body or b"{}"))

    async def slowloris(self) -> None:
        """Uploads that announce the largest body and send 1 KB of it, one after another."""
        while not self.stop_abuse.is_set():
            await self.raw_update(self.round, self.limit)

    async def malformed(self, http: aiohttp.ClientSession) -> None:
        """Junk and nested payloads under a valid signature, deep polls, oversize, replays."""
        nested = b"[" * 100_000 + b"]" * 100_000
        nested_payload = struct.pack("<Q", len(nested)) + nested
        while not self.stop_abuse.is_set():
            number = self.round
            junk = self.rng.bytes(64 * 1024)
            for body in (junk, nested_payload):
                await self.post_update(http, number, body, self.sign(number, body))
            if self.captured is not None:
                await self.post_update(http, number, *self.captured)
            await self.raw_update(number, self.limit + 1)
            async with http.post(
                f"{self.url}/v1/tasks", data=nested, headers=self.identity()
            ) as response:
                self.count(response.status, await response.json(content_type=None))

    async def post_update(
        self, http: aiohttp.ClientSession, number: int, body: bytes, signature: str
    ) -> None:
        async with http.post(
            f"{self.url}/v1/update", data=body, headers=self.headers(number, signature)
        ) as response:
            self.count(response.status, await response.json(content_type=None))

    async def flood(self) -> None:
        """A stranger's random bytes, connection after connection."""
        while not self.stop_abuse.is_set():
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            writer.write(self.rng.bytes(int(self.rng.integers(1, 4096))))
            writer.write_eof()
            answer = await reader.read()
            writer.close()
            status = answer[9:12].decode("ascii", "replace") or "closed"
            self.outcomes[f"{status} garbage"] += 1


def attacker_child_main() -> None:
    """``--attacker-child``: read the config from stdin, print READY, then the outcomes."""
    config = json.loads(sys.stdin.read())
    attacker = Attacker(config)

    async def main() -> None:
        print("READY", flush=True)
        started = time.perf_counter()
        await attacker.run()
        print(
            json.dumps({"outcomes": attacker.outcomes, "seconds": time.perf_counter() - started}),
            flush=True,
        )

    asyncio.run(main())


# -- one scenario ---------------------------------------------------------------------
@dataclass
class Result:
    label: str
    clients: int
    status: str
    round_walls: list[float] = field(default_factory=list)  # measured rounds
    honest_done: list[float] = field(default_factory=list)  # last honest update taken, s
    all_reported: bool = False
    exact: bool = False
    peak_rss_mb: float = 0.0
    budget_high_water_mb: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    attack_s: float = 0.0


def resident_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


async def run_scenario(label: str, document: dict[str, Any], attack: bool) -> Result:
    job = parse_job(document)
    async with running_services(job) as services:
        agg = services.agg
        start_weights = {k: v.copy() for k, v in agg.weights.items()}
        before = resident_bytes()
        peak = 0
        config = services.client_config(document, "sim")
        children = []
        if attack:
            config["skip_tenants"] = [MALLORY]
            eu = next(c for c in services.combiners if c.region == "eu")
            children.append(
                await start_child(
                    HERE / "hostile_load.py",
                    "--attacker-child",
                    {
                        "manifest": document,
                        "url": f"http://127.0.0.1:{eu.port}",
                        "token": services.tokens[MALLORY],
                        "signing_key": services.signing_keys[MALLORY],
                    },
                )
            )
        children.insert(0, await start_child(HERE / "round_overhead.py", "--client-child", config))

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, resident_bytes() - before)
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        try:
            status = await asyncio.wait_for(agg.run(), SCENARIO_TIMEOUT_S)
            reports = [await last_json_line(child) for child in children]
        finally:
            sampler.cancel()
            for child in children:
                if child.returncode is None:
                    child.kill()
                    await child.wait()
        history = await agg.store.history()
        hashes = [
            await agg.store.redis.hgetall(agg.store.key("round", r["round"])) for r in history
        ]
        result = Result(label, len(job.clients()), status)
        marks = reports[0]["marks"]
        for record, info in list(zip(history, hashes, strict=True))[1:]:  # 1 is the warm-up
            opened = float(info["opened_at"])
            result.round_walls.append(float(info["closed_at"]) - opened)
            result.honest_done.append(max(marks[str(record["round"])]["done"]) - opened)
        result.all_reported = all(
            r["reported"] == r["selected"] == len(job.clients()) for r in history
        )
        result.exact = all(np.array_equal(agg.weights[k], v) for k, v in start_weights.items())
        result.peak_rss_mb = peak / MB
        result.budget_high_water_mb = max(c.inflight.high_water for c in services.combiners) / MB
        if attack:
            result.outcomes = dict(reports[1]["outcomes"])
            result.attack_s = float(reports[1]["seconds"])
    return result


def print_table(results: list[Result], rounds: int, limit: int) -> None:
    print(
        f"\n{rounds} rounds per scenario (round 1 a warm-up, not in the times); updates up to "
        f"{limit / MB:.0f} MB; services in this process, clients and attacker in their own; "
        "2 cores here. 'honest clients done' = the last honest update taken, after the round "
        "opened; under attack the round closes once mallory has reported, after its "
        "abuse window (a slow body's grace + 1 s)\n"
    )
    print(
        "| scenario | clients | status | honest clients done, s (median) | (max) | round s "
        "(median) | every client every round | model exact | peak RSS above start | "
        "in-flight high water |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r.label} | {r.clients} | {r.status} | {statistics.median(r.honest_done):.2f} | "
            f"{max(r.honest_done):.2f} | {statistics.median(r.round_walls):.2f} | "
            f"{'yes' if r.all_reported else 'NO'} | "
            f"{'yes' if r.exact else 'NO'} | {r.peak_rss_mb:.0f} MB | "
            f"{r.budget_high_water_mb:.0f} MB |"
        )
    attacked = [r for r in results if r.outcomes]
    for r in attacked:
        total = sum(r.outcomes.values())
        print(
            f"\nattacker's requests in '{r.label}': {total} in {r.attack_s:.0f} s "
            f"({total / max(r.attack_s, 1e-9):.0f}/s), by answer:"
        )
        for outcome, count in sorted(r.outcomes.items(), key=lambda kv: -kv[1]):
            print(f"  {outcome:<28} {count}")
        server_errors = sum(
            n for o, n in r.outcomes.items() if o.startswith("5") and not o.endswith("busy")
        )
        print(f"  5xx other than busy: {server_errors}")


SCENARIOS = {"baseline": ("baseline (mallory honest)", False), "attack": ("under attack", True)}


def scenario_main(args: argparse.Namespace) -> None:
    """``--scenario NAME``: run one scenario in this (fresh) process; its result as JSON."""
    label, attack = SCENARIOS[args.scenario]
    document = job_manifest(args.quick, args.rounds)
    result = asyncio.run(run_scenario(label, document, attack))
    print(json.dumps(asdict(result)), flush=True)


def main_all(args: argparse.Namespace) -> None:
    """Each scenario in a process of its own, so that one's memory is not the other's start."""
    rounds = args.rounds or (3 if args.quick else 6)
    results = []
    for name, (label, _attack) in SCENARIOS.items():
        print(f"running: {label} ...", file=sys.stderr, flush=True)
        command = [sys.executable, __file__, "--scenario", name, "--rounds", str(rounds)]
        done = subprocess.run(
            command + (["--quick"] if args.quick else []),
            stdout=subprocess.PIPE,
            text=True,
            timeout=SCENARIO_TIMEOUT_S + 120,
            check=True,
        )
        results.append(Result(**json.loads(done.stdout.strip().splitlines()[-1])))
    limit = parse_job(job_manifest(args.quick, rounds)).spec.transport.max_update_bytes
    print_table(results, rounds, limit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="rounds per scenario (default 6, quick 3)")
    parser.add_argument("--quick", action="store_true", help="10 clients, small: a smoke test")
    parser.add_argument("--attacker-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    if args.attacker_child:
        attacker_child_main()
        return
    if args.rounds is not None and args.rounds < 2:
        parser.error("--rounds must be at least 2: round 1 is a warm-up")
    if args.scenario:
        scenario_main(args)
    else:
        main_all(args)


if __name__ == "__main__":
    main()
