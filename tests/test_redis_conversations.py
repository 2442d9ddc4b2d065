"""The Redis store's conversation map, against a real redis-server."""

from __future__ import annotations

import pytest_twisted

from lmarena_gateway.store.redis import RedisSessionStore
from lmarena_gateway.store.redis_commands import parse_address

from support.conversations import (
    DOMAIN,
    conversation,
    registration,
    the_map_is_bounded_per_session,
    the_map_survives_a_restart_and_goes_with_its_session,
    until,
)


def opener(redis_server, reactor):
    async def reopen(store, stop_only=False):
        if store is not None:
            await store.stopService()
        if stop_only:
            return None
        store = RedisSessionStore(parse_address(redis_server.url), reactor)
        store.startService()
        await until(lambda: store.health()["status"] == "ok", 10, "the store to connect")
        return store

    def raw() -> int:
        count = redis_server("ZCARD", "lmgw:conversations-used")
        hashes = redis_server("KEYS", "lmgw:conversations:*")
        assert sum(redis_server("HLEN", k) for k in hashes) == count  # the two agree
        return count

    return reopen, raw


@pytest_twisted.ensureDeferred
async def test_the_map_survives_a_restart_and_goes_with_its_session(redis_server, reactor):
    await the_map_survives_a_restart_and_goes_with_its_session(*opener(redis_server, reactor))
    # nothing is left of the deleted and pruned sessions' maps
    assert sorted(redis_server("KEYS", "lmgw:conversations:*")) == [f"lmgw:conversations:{DOMAIN}/a"]


@pytest_twisted.ensureDeferred
async def test_the_map_is_bounded_per_session(redis_server, reactor):
    await the_map_is_bounded_per_session(*opener(redis_server, reactor))


@pytest_twisted.ensureDeferred
async def test_a_session_deleted_by_another_instance_takes_its_map_everywhere(redis_server,
                                                                             reactor):
    reopen, raw = opener(redis_server, reactor)
    a, b = await reopen(None), await reopen(None)
    await a.register(registration("x"), 10_000.0)
    await until(lambda: b.get(DOMAIN, "x") is not None, 5, "the session at b")
    await b.remember_conversation(DOMAIN, "x", "d1", conversation("e1", 5000.0))
    assert await a.delete(DOMAIN, "x")
    await until(lambda: b.conversation(DOMAIN, "x", "d1") is None, 5, "the map gone at b")
    assert raw() == 0
    for store in (a, b):
        await reopen(store, stop_only=True)
