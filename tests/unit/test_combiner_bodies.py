"""The combiner's receive buffers and its registration writes: what they keep, what they skip."""

from __future__ import annotations

import os
from pathlib import Path

from fedkube.aggregator.combiner.registrations import Registrations
from fedkube.service.bodies import BufferPool

MB = 1024 * 1024


def resident_bytes() -> int:
    """This process's resident memory, from the kernel (/proc/self/statm)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def test_the_pool_keeps_as_many_buffers_as_were_in_use_at_once_and_reuses_them():
    # prepare: a round with 20 uploads in flight together
    pool = BufferPool(max_idle_bytes=1 << 30)
    first = [pool.take(4_000_000) for _ in range(20)]
    for buffer in first:
        pool.give(buffer)
    # execute: the next round's 20 uploads
    second = [pool.take(4_000_000) for _ in range(20)]
    # assert: the same 20 buffers, none allocated anew
    assert {id(b) for b in second} == {id(b) for b in first}
    assert pool.high_water == 20 and pool.idle_bytes == 0


def test_the_pool_never_keeps_more_idle_bytes_than_its_budget():
    # prepare: 10 MB of idle buffers allowed, 20 uploads of 4 MB in flight
    pool = BufferPool(max_idle_bytes=10_000_000)
    taken = [pool.take(4_000_000) for _ in range(20)]
    # execute
    for buffer in taken:
        pool.give(buffer)
    # assert: two 4 MB buffers (rounded up to 64 KiB) fit in 10 MB, a third does not
    assert pool.idle_bytes <= 10_000_000
    assert pool.idle_bytes == 2 * len(taken[0])


def test_the_pool_hands_out_the_smallest_buffer_that_fits():
    pool = BufferPool()
    large, small = pool.take(8_000_000), pool.take(1_000_000)
    pool.give(large)
    pool.give(small)
    assert pool.take(500_000) is small
    assert pool.take(2_000_000) is large


def test_a_fresh_buffer_commits_memory_only_as_the_body_arrives():
    # prepare: a sender announces 512 MB (a pool with nothing idle to hand out)
    pool = BufferPool()
    before = resident_bytes()
    # execute: its buffer is taken, and 8 MB of its body arrive
    buffer = pool.take(512 * MB)
    announced = resident_bytes() - before
    buffer[: 8 * MB] = b"\x01" * (8 * MB)
    arrived = resident_bytes() - before
    # assert: the claim cost nothing resident, the bytes that came cost their size
    # (a bytearray of the announced size zero-fills, and so commits, all 512 MB)
    assert announced < 32 * MB, announced
    assert 8 * MB <= arrived < 64 * MB, arrived
    assert len(buffer) >= 512 * MB and buffer[8 * MB] == 0


def test_a_registration_is_written_once_per_quarter_of_the_ttl_per_client():
    # prepare: a TTL of 40 s, so a registration is rewritten after 10 s
    now = [100.0]
    registrations = Registrations(40.0, clock=lambda: now[0])
    # execute and assert: new clients are due, polled again at once they are not
    assert registrations.due(["a", "b"]) == ["a", "b"]
    registrations.written(["a", "b"])
    now[0] += 9.9
    assert registrations.due(["a", "b", "c"]) == ["c"]
    registrations.written(["c"])
    now[0] += 0.1
    assert registrations.due(["a", "b", "c"]) == ["a", "b"]


def test_a_registration_whose_write_failed_is_due_again():
    registrations = Registrations(40.0, clock=lambda: 5.0)
    assert registrations.due(["a"]) == ["a"]
    # nothing marked written (Redis refused): the next poll writes it again
    assert registrations.due(["a"]) == ["a"]
