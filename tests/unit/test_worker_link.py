"""The worker's link to its combiner: what it sends, and what the combiner's answers mean.

A small aiohttp app on the loopback plays the combiner (in this process, in
milliseconds): the link's reading of each answer is the logic under test.
"""

import asyncio
import json

import numpy as np
import pytest

from fedkube.errors import FedkubeError
from fedkube.wire import codec
from fedkube.wire.failures import FailureReport
from fedkube.wire.protocol import H_CLIENT, H_JOB, H_ROUND, H_SIGNATURE, H_TENANT, H_WEIGHT
from fedkube.workers.link import RETRY_MIN_S, CombinerLink, Taken, answer_of, retry_after
from fedkube.workers.pipeline import LocalUpdate, Outgoing
from fedkube.workers.seat import Identity

IDENTITY = Identity("job", "a", "eu", "a-0", 1)


def outgoing() -> Outgoing:
    update = LocalUpdate(delta={"w": np.ones(3, np.float32)}, loss=0.0, steps=1, weight=5.0)
    body = codec.encode_parts(update.delta, {"fedkube.kind": "update"})
    return Outgoing(2, body, update, 5.0, 0.1, "c2lnbmF0dXJl")


async def test_the_poll_is_retried_while_the_combiner_fails_and_the_backoff_resets(combiner):
    fake, url = combiner
    fake.script("/v1/tasks", (500, "down"), (502, "down"), (200, {"status": "wait"}))
    async with CombinerLink(url, "token", IDENTITY) as link:
        answer = await asyncio.wait_for(link.tasks(["a-0"], 1, 0.5, asyncio.Event()), 10)
        assert answer == {"status": "wait"}
        assert link.backoff.delay == RETRY_MIN_S
    path, headers, body = fake.seen[-1]
    assert len(fake.seen) == 3 and path == "/v1/tasks"
    assert headers["Authorization"] == "Bearer token"
    assert headers[H_JOB] == "job" and headers[H_TENANT] == "a"
    assert json.loads(body) == {"clients": ["a-0"], "after": 1, "wait": 0.5}


async def test_a_poll_answer_that_is_not_a_task_list_is_asked_again(combiner):
    # prepare: JSON nested past the parser's limit, a list, then a real answer
    fake, url = combiner
    fake.script("/v1/tasks", (200, "[" * 100_000), (200, [1, 2]), (200, {"status": "wait"}))
    async with CombinerLink(url, "token", IDENTITY) as link:
        # execute
        answer = await asyncio.wait_for(link.tasks(["a-0"], 1, 0.5, asyncio.Event()), 10)
    # assert: neither broke the worker; the third answer is the one it acts on
    assert answer == {"status": "wait"} and len(fake.seen) == 3
    assert answer_of(500, "[" * 100_000)["error"] == "http 500"
    assert answer_of(200, "1" * 5000)["error"] == "http 200"  # past int's digit limit


async def test_refused_credentials_end_the_worker_and_a_stopped_one_stops_polling(combiner):
    fake, url = combiner
    fake.script("/v1/tasks", (401, "bad token"))
    async with CombinerLink(url, "token", IDENTITY) as link:
        with pytest.raises(FedkubeError, match="combiner refused client a-0: bad token"):
            await asyncio.wait_for(link.tasks(["a-0"], 0, 0.5, asyncio.Event()), 10)
        stopped = asyncio.Event()
        stopped.set()
        assert await link.tasks(["a-0"], 0, 0.5, stopped) is None


@pytest.mark.parametrize(
    ("status", "answer", "taken"),
    [
        (200, {"ok": True}, Taken.accepted),
        (409, {"error": "duplicate", "detail": "seen"}, Taken.accepted),
        (503, {"error": "unavailable", "detail": "redis"}, Taken.later),
        (503, {"error": "overloaded", "detail": "busy"}, Taken.refused),
        (400, {"error": "bad_signature", "detail": "no"}, Taken.refused),
        (500, "not json", Taken.refused),
    ],
)
async def test_an_updates_answer_says_whether_it_was_taken(combiner, status, answer, taken):
    fake, url = combiner
    fake.script("/v1/update", (status, answer))
    sent = outgoing()
    async with CombinerLink(url, "token", IDENTITY) as link:
        assert await link.send_update("a-0", 2, sent) is taken
    _path, headers, body = fake.seen[-1]
    assert headers[H_CLIENT] == "a-0" and headers[H_ROUND] == "2"
    assert headers[H_WEIGHT] == "5.0" and headers[H_SIGNATURE] == sent.signature
    assert body == sent.body.tobytes()


async def test_a_busy_combiner_gets_the_update_again_after_its_retry_after(combiner, monkeypatch):
    # prepare: the combiner is full (429, then 503 at its total) and says when to come back
    fake, url = combiner
    busy = {"error": "busy", "detail": "receiving all it can"}
    fake.script("/v1/update", (429, busy, {"Retry-After": "3"}), (503, busy, {"Retry-After": "1"}))
    slept: list[float] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)

    monkeypatch.setattr("fedkube.workers.link.asyncio.sleep", sleep)
    async with CombinerLink(url, "token", IDENTITY) as link:
        # execute: two tries, each followed by the runtime's pause
        first = await link.send_update("a-0", 2, outgoing())
        await link.pause()
        second = await link.send_update("a-0", 2, outgoing())
        await link.pause()
    # assert: kept to be sent again (not refused), each pause as long as the combiner asked
    assert first is Taken.later and second is Taken.later
    assert slept == [3.0, 1.0]


@pytest.mark.parametrize(
    ("header", "delay"),
    [("2", 2.0), ("0.5", 0.5), ("-4", 0.0), ("nan", 0.0), ("86400", 20.0), ("soon", 0.0)],
)
def test_a_retry_after_header_is_read_in_seconds_and_capped(header, delay):
    assert retry_after({"Retry-After": header}) == delay
    assert retry_after({}) == 0.0


async def test_secure_aggregation_messages_are_taken_refused_or_asked_again(combiner):
    fake, url = combiner
    fake.script("/v1/secagg/keys", (200, {}), (400, {"error": "late"}), (503, {"error": "x"}))
    async with CombinerLink(url, "token", IDENTITY) as link:
        results = [await link.post_secagg("keys", "a-0", 3, {"n": i}) for i in range(3)]
    assert results == [True, False, None]
    assert fake.seen[0][1][H_ROUND] == "3"


async def test_a_failure_report_that_does_not_arrive_is_only_logged(combiner, caplog):
    fake, url = combiner
    fake.script("/v1/failure", (400, "no such round"))
    async with CombinerLink(url, "token", IDENTITY) as link:
        await link.report_failure(FailureReport("a-0", 4, "train", "boom"))
    assert json.loads(fake.seen[-1][2]) == {
        "client": "a-0",
        "round": 4,
        "step": "train",
        "error": "boom",
    }
    assert "failure report refused (400): no such round" in caplog.text
    async with CombinerLink("http://127.0.0.1:9", "token", IDENTITY) as link:
        await link.report_failure(FailureReport("a-0", 4, "train", "boom"))
    assert "could not report the failure" in caplog.text


def test_an_answer_that_is_not_a_json_object_is_read_as_an_http_error():
    assert answer_of(502, "<html>") == {"error": "http 502", "detail": "<html>"}
    assert answer_of(500, "[1]") == {"error": "http 500", "detail": "[1]"}
    assert answer_of(400, '{"error": "x"}') == {"error": "x"}


def test_the_link_must_be_opened_before_use():
    with pytest.raises(RuntimeError, match="not open"):
        _ = CombinerLink("http://127.0.0.1:9", "token", IDENTITY).http
