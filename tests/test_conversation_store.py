"""The file store's conversation map: beside the sessions in the same SQLite file."""

from __future__ import annotations

import pytest_twisted

from lmarena_gateway.store.sqlite import DBMSessionStore, SessionFile

from support.conversations import (
    DOMAIN,
    conversation,
    registration,
    the_map_is_bounded_per_session,
    the_map_survives_a_restart_and_goes_with_its_session,
)


def opener(path, reactor):
    async def reopen(store, stop_only=False):
        if store is not None:
            await store.stopService()
        if stop_only:
            return None
        store = DBMSessionStore(path, reactor)
        store.startService()
        return store

    def raw() -> int:
        table = SessionFile(path)
        try:
            return table.db.sql("SELECT count(*) FROM Conversations")[0][0]
        finally:
            table.close()

    return reopen, raw


@pytest_twisted.ensureDeferred
async def test_the_map_survives_a_restart_and_goes_with_its_session(tmp_path, reactor):
    await the_map_survives_a_restart_and_goes_with_its_session(
        *opener(str(tmp_path / "s.sqlite3"), reactor))


@pytest_twisted.ensureDeferred
async def test_the_map_is_bounded_per_session(tmp_path, reactor):
    await the_map_is_bounded_per_session(*opener(str(tmp_path / "s.sqlite3"), reactor))


@pytest_twisted.ensureDeferred
async def test_the_sessions_stay_a_plain_dbm_and_the_cli_delete_takes_the_map(tmp_path, reactor):
    path = str(tmp_path / "s.sqlite3")
    reopen, raw = opener(path, reactor)
    store = await reopen(None)
    await store.register(registration("a"), 10_000.0)
    await store.remember_conversation(DOMAIN, "a", "d1", conversation("e1", 5000.0))
    await reopen(store, stop_only=True)
    table = SessionFile(path)
    try:
        records, broken = table.load()
        assert list(records) == [f"{DOMAIN}/a"] and broken == []  # the Dict table holds sessions
        assert table.delete(DOMAIN, "a")  # `lmgateway sessions delete`
    finally:
        table.close()
    assert raw() == 0


@pytest_twisted.ensureDeferred
async def test_an_unreadable_conversation_is_dropped_not_fatal(tmp_path, reactor):
    path = str(tmp_path / "s.sqlite3")
    reopen, raw = opener(path, reactor)
    store = await reopen(None)
    await store.register(registration("a"), 10_000.0)
    await store.remember_conversation(DOMAIN, "a", "d1", conversation("e1", 5000.0))
    await store.stopService()
    table = SessionFile(path)
    table.db.sql("INSERT INTO Conversations VALUES (?, 'bad', '{not json', 1)", (f"{DOMAIN}/a",))
    table.close()
    store = await reopen(None)
    assert store.conversation(DOMAIN, "a", "d1").evaluation_id == "e1"
    assert store.conversation(DOMAIN, "a", "bad") is None and raw() == 1
    await reopen(store, stop_only=True)


@pytest_twisted.ensureDeferred
async def test_a_stop_loses_no_conversation_still_being_written(tmp_path, reactor):
    # ThreadPool.stop runs what was queued before it stops: nothing is dropped at exit
    path = str(tmp_path / "s.sqlite3")
    reopen, raw = opener(path, reactor)
    store = await reopen(None)
    await store.register(registration("a"), 10_000.0)
    for i in range(20):  # not awaited, as the upstream does not wait for them
        store.remember_conversation(DOMAIN, "a", f"d{i}", conversation(f"e{i}", 5000.0 + i))
    await store.stopService()
    assert raw() == 20
