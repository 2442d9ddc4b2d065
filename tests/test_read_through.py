"""A lookup that misses in memory reads the store (CachedSessions.lookup), on doubles.

Two ProcessStores over one Storage stand for two workers (or instances) whose memory has
not heard of each other's writes yet; the Clock decides when a store read answers.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from lmarena_gateway.errors import ApiError
from lmarena_gateway.sessions import session_key, validate_registration
from lmarena_gateway.store.redis import RedisSessionStore
from lmarena_gateway.store.redis_commands import parse_address
from lmarena_gateway.store.sqlite import DBMSessionStore

from support.client import SESSION
from support.memory import ProcessStore, Storage
from support.stub import StubGateway, result_of

DOMAINS = ("lmarena.ai", "canary.lmarena.ai")
KEY = session_key("lmarena.ai", "team-alpha")


def registration(name: str = "team-alpha"):
    return validate_registration(dict(SESSION, session_name=name), DOMAINS)


def pair(latency: float = 0.01):
    clock = Clock()
    storage = Storage(clock, latency)
    return clock, storage, ProcessStore(storage), ProcessStore(storage)


def fired(d) -> list:
    results: list = []
    d.addBoth(results.append)
    return results


def test_a_miss_reads_the_store_and_remembers_what_it_found():
    clock, storage, a, b = pair()
    result_of(a.register(registration(), 1.0))
    assert b.get("lmarena.ai", "team-alpha") is None  # b's memory has not heard
    found = fired(b.lookup("lmarena.ai", "team-alpha"))
    assert found == []  # the read is off the reactor: nothing is answered from nowhere
    clock.advance(0.01)
    assert found[0].session_id == SESSION["session_id"]
    assert b.get("lmarena.ai", "team-alpha") == found[0]
    # the next lookup is a hit: no second read
    assert result_of(b.lookup("lmarena.ai", "team-alpha")) == found[0]
    assert storage.reads == 1


def test_concurrent_misses_for_one_key_share_one_read():
    clock, storage, a, b = pair()
    result_of(a.register(registration(), 1.0))
    waiting = [fired(b.lookup("lmarena.ai", "team-alpha")) for _ in range(500)]
    clock.advance(0.01)
    assert storage.reads == 1
    assert all(w and w[0] is not None and w[0].key == KEY for w in waiting)


def test_misses_for_an_absent_session_read_one_at_a_time():
    # A miss storm on a name nobody registered: one read in flight per key, each for
    # everyone who arrived while the one before it was out.
    clock, storage, _, b = pair()
    first = [fired(b.lookup("lmarena.ai", "nobody")) for _ in range(100)]
    assert storage.reads == 1
    clock.advance(0.01)
    assert storage.reads == 2  # the 99 that came after the first read was sent
    assert first[0] == [None] and all(w == [] for w in first[1:])
    clock.advance(0.01)
    assert all(w == [None] for w in first) and storage.reads == 2
    assert b.store_reads == 2 and b._reads == {}


def test_a_read_sent_before_a_registration_never_answers_a_request_after_it():
    # No negative cache, and no sharing of a read sent before the caller arrived: the
    # user who got 200 from the other process must not get the older "absent".
    clock, storage, a, b = pair()
    early = fired(b.lookup("lmarena.ai", "team-alpha"))
    result_of(a.register(registration(), 1.0))  # acknowledged while that read is out
    late = fired(b.lookup("lmarena.ai", "team-alpha"))
    clock.advance(0.01)
    assert early == [None]  # it asked before the registration: absent was true then
    assert late == []  # ...so the later caller waits for a read of its own
    clock.advance(0.01)
    assert late[0] is not None and late[0].key == KEY
    assert storage.reads == 2


def test_a_miss_while_the_store_is_down_is_a_503_for_every_waiter_then_reads_again():
    clock, storage, a, b = pair()
    result_of(a.register(registration(), 1.0))
    storage.down = True
    waiting = [fired(b.lookup("lmarena.ai", "team-alpha")) for _ in range(3)]
    clock.advance(0.01)
    for w in waiting:
        assert w[0].check(ApiError)
        assert (w[0].value.status, w[0].value.code) == (503, "STORAGE_UNAVAILABLE")
    storage.down = False
    assert result_of_later(clock, b.lookup("lmarena.ai", "team-alpha")).key == KEY


def result_of_later(clock, d):
    clock.advance(1)
    return result_of(d)


def gateways():
    clock = Clock()
    clock.advance(1_700_000_000.0)
    storage = Storage(clock, 0.01)
    a = StubGateway(clock=clock, store=ProcessStore(storage))
    b = StubGateway(clock=clock, store=ProcessStore(storage))
    return clock, storage, a, b


def chat(gateway, clock, name: str = "team-alpha"):
    """A chat through ``gateway``, its store reads answered by the clock: (status, body)."""
    d = gateway.send("POST", "/v1/chat/completions",
                     {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
                     {"X-Session-Name": name})
    for _ in range(10):
        clock.advance(0.01)
        gateway.settle()
    clock.advance(10)  # the fake bridge's chunks
    gateway.settle()
    response = result_of(d)
    body = result_of(gateway.client.content(response))
    return response.code, json.loads(body)


def test_a_registration_through_one_gateway_is_served_by_the_other_at_once():
    clock, _, a, b = gateways()
    answer = a.call("POST", "/session/register", SESSION)
    assert answer.status == 200, answer.body
    assert b.store.get("lmarena.ai", "team-alpha") is None
    status, body = chat(b, clock)
    assert status == 200, body
    status, body = chat(b, clock, "nobody")
    assert (status, body["error"]["code"]) == (404, "SESSION_NOT_FOUND")


def test_an_unknown_session_while_the_store_is_down_is_a_503_envelope_not_a_404():
    clock, storage, a, b = gateways()
    assert a.call("POST", "/session/register", SESSION).status == 200
    storage.down = True
    status, body = chat(b, clock)
    assert status == 503
    assert body["error"]["code"] == "STORAGE_UNAVAILABLE" and body["error"]["type"]
    # a session already in memory is served while the store is down
    status, body = chat(a, clock)
    assert status == 200, body


def test_known_sessions_never_wait_for_the_store():
    clock, storage, a, _ = gateways()
    assert a.call("POST", "/session/register", SESSION).status == 200
    reads = storage.reads
    answer = a.call("GET", "/v1/models", headers={"X-Session-Name": "team-alpha"})
    assert answer.status == 200 and storage.reads == reads


# --- Redis: a read is ordered against the change channel by its rev ---

def redis_store():
    return RedisSessionStore(parse_address("redis://127.0.0.1:1/0"), Clock())


def test_a_redis_read_newer_than_the_channel_is_remembered():
    store = redis_store()
    store._seen_rev = 4
    record = registration().record(1.0, None)
    assert store._found(record.key, (5, record)) == record
    assert store.get("lmarena.ai", "team-alpha") == record


def test_a_redis_read_the_channel_has_passed_gives_way_to_memory():
    # The read saw the session at rev 5; the channel has since delivered its deletion
    # (rev 6). Remembering the read would bring a deleted session back for good.
    store = redis_store()
    record = registration().record(1.0, None)
    store.changed(f"6\n{record.key}\n")
    assert store._found(record.key, (5, record)) is None
    assert store.get("lmarena.ai", "team-alpha") is None


@pytest.mark.parametrize("rev", [0, 7])
def test_a_redis_read_that_found_nothing_changes_nothing(rev):
    store = redis_store()
    store._seen_rev = 3
    assert store._found(KEY, (rev, None)) is None
    assert store._cache == {}


# --- the file store: the read goes through the store's own thread ---

@pytest_twisted.ensureDeferred
async def test_two_file_stores_on_one_file_read_through(tmp_path, reactor):
    path = str(tmp_path / "s.db")
    # Polls far apart: only the read-through can find the other's registration.
    a, b = (DBMSessionStore(path, reactor, poll_interval=3600) for _ in range(2))
    for store in (a, b):
        store.startService()
    try:
        await a.register(registration(), 1.0)
        assert b.get("lmarena.ai", "team-alpha") is None
        found = await b.lookup("lmarena.ai", "team-alpha")
        assert found is not None and found.session_id == SESSION["session_id"]
        assert b.get("lmarena.ai", "team-alpha") == found
        assert await b.lookup("lmarena.ai", "nobody") is None
        # deleted through a: b keeps it until its poll (the documented bounded staleness)
        assert await a.delete("lmarena.ai", "team-alpha")
        assert b.get("lmarena.ai", "team-alpha") is not None
    finally:
        for store in (a, b):
            await store.stopService()


@pytest_twisted.ensureDeferred
async def test_a_file_store_that_cannot_read_answers_503(tmp_path, reactor):
    store = DBMSessionStore(str(tmp_path / "s.db"), reactor, poll_interval=3600)
    store.startService()
    table = store._opened()
    broken = table.db
    try:
        table.db = _Unreadable()
        with pytest.raises(ApiError) as raised:
            await store.lookup("lmarena.ai", "team-alpha")
        assert (raised.value.status, raised.value.code) == (503, "STORAGE_UNAVAILABLE")
    finally:
        table.db = broken
        await store.stopService()


class _Unreadable:
    """A database handle whose reads fail as a vanished or broken file's do."""

    def get(self, key, default=None):
        import sqlite3

        raise sqlite3.OperationalError("disk I/O error")
