"""The JSON bodies a tenant posts to its combiner, and the partials a region sends up.

A worker polls for tasks, reports an evaluation or a failed task, a site
refuses its tenant, and a client takes part in secure aggregation, each
with a small JSON body: whatever the body, the combiner answers with a
status below 500 and, for a refusal, ``{"error": <reason>, "detail": ...}``.
The pure checkers behind those routes, the protocol's header parsers and
the global tier's reading of a partial are fuzzed on their own too.

The routes run in a real aiohttp server (one per module) around a combiner
whose Redis is a stand-in that records nothing: parsing and checking are
what is under test, not the round.
"""

from __future__ import annotations

import asyncio
import json
import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st

from fedkube.aggregator.combiner.accumulators import RegionSum
from fedkube.aggregator.combiner.admission import Admission
from fedkube.aggregator.combiner.registrations import Registrations
from fedkube.aggregator.combiner.routes import make_app
from fedkube.aggregator.combiner.secure_intake import SecureIntake
from fedkube.aggregator.combiner.site_reports import SiteReports
from fedkube.aggregator.combiner.uplink import encode_partial
from fedkube.aggregator.global_aggregator.wire import decode_partial
from fedkube.errors import UpdateRejected
from fedkube.service.longpoll import Changes
from fedkube.service.metrics import Metrics
from fedkube.service.web import digest
from fedkube.spec import parse_job
from fedkube.training.evaluation import MAX_ERROR_CHARS, check_report
from fedkube.wire import protocol
from fedkube.wire.failures import MAX_MESSAGE_CHARS, check_failure
from fedkube.wire.protocol import H_CLIENT, H_TENANT
from tests.fuzz.properties import (
    REASONS,
    deep_json_text,
    json_values,
    mutated,
    outcome,
    refused_by_name,
    scaled,
    wrong_values,
)
from tests.support import small_job_dict, tenant_verify_keys

JOB = parse_job(
    small_job_dict(
        tenants=[{"name": t, "region": "eu", "replicas": 2} for t in ("a", "b")]
        + [{"name": t, "region": "us", "replicas": 2} for t in ("c", "d")],
        privacy={"secureAggregation": {}},
    )
)
CLIENTS = ["a-0", "a-1", "b-0", "b-1"]


def checked_or_refused(call) -> Any:
    try:
        result = call()
    except UpdateRejected as exc:
        refused_by_name(exc)
        return None
    outcome("accepted")
    return result


# -- the checkers behind the routes --------------------------------------------------------
REPORT = {
    "client": "a-0",
    "round": 3,
    "version": 3,
    "examples": 120,
    "metrics": {"accuracy": 0.9, "loss": 0.3},
}
FAILURE = {"client": "a-0", "round": 3, "step": "train", "error": "CUDA out of memory\nat ..."}
numbers = st.sampled_from([10**400, -(10**400), 1e308, float("inf"), float("nan"), 2**63, True])


@given(
    st.one_of(
        mutated(REPORT),
        mutated({**REPORT, "error": "boom"}),
        st.builds(lambda v: {**REPORT, "metrics": {"accuracy": v}}, numbers | wrong_values),
        st.builds(lambda n: {**REPORT, "metrics": {n: 1.0}}, st.text(max_size=70)),
        json_values,
    )
)
def test_an_evaluation_report_is_checked_or_refused_by_name(document):
    report = checked_or_refused(lambda: check_report(document))
    if report is not None:
        assert (report.client, report.round, report.version) == (
            document["client"],
            document["round"],
            document["version"],
        )
        assert all(math.isfinite(v) for v in report.metrics.values())
        assert all(name.isidentifier() and name == name.strip() for name in report.metrics)
        assert report.error is None or len(report.error) <= MAX_ERROR_CHARS


@given(st.one_of(mutated(FAILURE), json_values))
def test_a_failure_report_is_checked_or_refused_by_name(document):
    report = checked_or_refused(lambda: check_failure(document))
    if report is not None:
        assert (report.client, report.round) == (document["client"], document["round"])
        assert "\n" not in report.message and len(report.message) <= MAX_MESSAGE_CHARS


header_values = st.one_of(st.none(), st.text(max_size=12), st.sampled_from(["1e400", "nan", "-0"]))


@given(header_values, st.booleans())
def test_the_protocols_header_numbers_are_parsed_or_refused_by_name(value, required):
    for parse in (
        lambda: protocol.parse_int(value, "round"),
        lambda: protocol.parse_weight(value),
        lambda: protocol.parse_steps(value, required),
    ):
        result = checked_or_refused(parse)
        if result is not None:
            assert math.isfinite(result)


@given(json_values | numbers, st.integers(-5, 5), st.integers(-5, 5))
def test_a_messages_integer_field_is_in_range_or_refused_by_name(value, low, high):
    result = checked_or_refused(lambda: protocol.int_field({"n": value}, "n", low, high))
    if result is not None:
        assert type(result) is int and low <= result <= high


# -- a region's partial, as the global tier reads it ---------------------------------------
TEMPLATE = {"w": ((2, 3), np.dtype(np.float32)), "b": ((3,), np.dtype(np.float32))}


@st.composite
def partials(draw: st.DrawFn) -> bytes:
    tensors = {name: np.ones(shape, dtype) for name, (shape, dtype) in TEMPLATE.items()}
    result = RegionSum(tensors, draw(st.floats(0, 10)), draw(st.integers(0, 3)), 5.0)
    payload = encode_partial("small", 2, "eu", result).tobytes()
    (length,) = np.frombuffer(payload[:8], "<u8")
    header = json.loads(payload[8 : 8 + int(length)])
    meta = header["__metadata__"]
    for key in draw(st.lists(st.sampled_from(sorted(meta)), max_size=2)):
        meta[key] = draw(
            st.sampled_from(["nan", "inf", "-1", "1e400", "", "0", "2", "partial", "x"])
            | st.text(max_size=5)
        )
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + payload[8 + int(length) :]


@given(partials())
def test_a_partial_is_decoded_or_refused_by_name(payload):
    partial = checked_or_refused(lambda: decode_partial(payload, "small", 2, "eu", TEMPLATE))
    if partial is not None:
        assert partial.weight >= 0 and partial.count >= 0 and math.isfinite(partial.steps)
        assert math.isfinite(partial.weight)


# -- the routes, in a real server ------------------------------------------------------------
class Store:
    """Redis as the routes see it: every write taken, nothing kept."""

    async def register_clients(self, _clients: Any) -> None: ...

    async def record_refusal(self, _tenant: str, _message: str) -> None: ...

    async def record_task_failure(self, *_args: Any) -> None: ...

    async def record_evaluation(self, *_args: Any) -> bool:
        return True


def fake_combiner() -> SimpleNamespace:
    """A combiner with the real admission, site reports and secure intake, and no round open."""
    tokens = {t: digest(f"token-{t}") for t in ("a", "b")}
    admission = Admission(JOB, "eu", tokens, tenant_verify_keys(["a", "b"]))
    metrics, store = Metrics(), Store()
    state = SimpleNamespace(
        current=None,
        changes=Changes(),
        lock=asyncio.Lock(),
        count=lambda *_a, **_k: asyncio.sleep(0),
        schedule_flush=lambda _r: None,
    )
    combiner = SimpleNamespace(
        job=JOB,
        name=JOB.name,
        region="eu",
        admission=admission,
        metrics=metrics,
        store=store,
        state=state,
        registrations=Registrations(300.0),
        tasks_for=lambda _clients, _after: {"status": "wait", "round": 0},
        evaluations=SiteReports(store, JOB.name, "eu", admission.clients, metrics),
    )
    secure = JOB.spec.privacy.secure_aggregation
    combiner.intake = SecureIntake(JOB, secure, state, admission, None)
    return combiner


@pytest.fixture(scope="module")
def post():
    """``post(path, body, headers) -> (status, answer)`` against one combiner's routes."""
    loop = asyncio.new_event_loop()
    client = TestClient(TestServer(make_app(fake_combiner()), loop=loop), loop=loop)
    loop.run_until_complete(client.start_server())

    async def send(path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
        async with client.post(path, data=body, headers=headers) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text

    yield lambda *args: loop.run_until_complete(send(*args))
    loop.run_until_complete(client.close())
    loop.close()


POLL = {"clients": ["a-0", "a-1"], "after": 0, "wait": 0}
REFUSAL = {"message": "the site does not take part"}
SECAGG = {"client": "a-0", "round": 1, "weight": 10.0, "c": "x", "s": "y"}
ROUTES = {
    "/v1/tasks": POLL,
    "/v1/refusal": REFUSAL,
    "/v1/evaluation": REPORT,
    "/v1/failure": FAILURE,
    "/v1/secagg/keys": SECAGG,
    "/v1/secagg/shares": {**SECAGG, "shares": {"a-1": "AAAA"}},
    "/v1/secagg/unmask": {**SECAGG, "shares": {"a-1": {"kind": "b", "share": "", "round": "1"}}},
}


def json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    path = draw(st.sampled_from(sorted(ROUTES)))
    document = ROUTES[path]
    if path == "/v1/tasks":  # never a long poll: a wait of 0, or refused
        document = {**document, "wait": 0}
    body = draw(
        st.one_of(
            mutated(document).map(json_bytes),
            json_values.map(json_bytes),
            deep_json_text.map(str.encode),
            st.binary(max_size=40),
            st.just(b'{"clients": [' + b"1" * 5000 + b"]}"),
            st.just(json_bytes(document).replace(b'"a-0"', b'"a-\\udcff"')),
        )
    )
    if path == "/v1/tasks" and b'"wait"' in body:
        try:
            parsed = json.loads(body)
            if isinstance(parsed, dict) and not isinstance(parsed.get("wait", 0), str):
                parsed["wait"] = 0
                body = json_bytes(parsed)
        except (ValueError, RecursionError):
            pass
    headers = {"Authorization": "Bearer token-a", H_TENANT: "a"}
    headers[H_CLIENT] = draw(st.sampled_from(["a-0", "b-0", "c-0", "", "nobody"]))
    headers["Content-Type"] = draw(
        st.sampled_from(
            [
                "application/json",
                "application/json; charset=utf-8",
                "application/json; charset=latin-1",
                "application/json; charset=no-such-codec",
                "text/plain",
            ]
        )
    )
    return path, body, headers


@scaled(0.5)
@given(bodies())
def test_any_body_posted_to_a_json_route_is_answered_below_500_with_a_named_refusal(post, case):
    # prepare
    path, body, headers = case
    # execute
    status, answer = post(path, body, headers)
    # assert: no 500; a refusal is JSON naming a known reason
    assert status < 500, (status, answer)
    if status >= 400:
        assert isinstance(answer, dict) and answer.get("error") in REASONS, answer
        assert str(answer.get("detail", "")).strip(), answer
        outcome(f"refused: {answer['error']}")
    else:
        outcome("accepted")
