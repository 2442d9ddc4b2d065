"""A full disk under the SQLite store: 503 in the envelope, /health degraded, no lost use.

The disk fills for real as far as SQLite can tell: ``PRAGMA max_page_count`` caps the
file at the pages it has, and filler rows take the room left, so the next write that
needs a page fails with SQLITE_FULL, as on a full filesystem. Then the room comes back.
"""

import sqlite3

import pytest_twisted
from twisted.internet.task import deferLater

from support.client import SESSION, call

OTHER = dict(SESSION, session_name="team-beta")
CHAT_HEADERS = {"X-Session-Name": SESSION["session_name"]}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def fill_the_disk(cx) -> int:
    """Cap the file at its current size, then take every byte left in it."""
    pages = cx.execute("PRAGMA page_count").fetchone()[0]
    cx.execute(f"PRAGMA max_page_count = {pages}")
    added = 0
    for size in (4000, 500, 50, 1):  # big rows first, then ever smaller, to pack the pages
        for _ in range(100_000):  # bounded: a page holds only so many
            try:
                cx.execute("INSERT INTO Dict (key, value) VALUES (?, ?)",
                           (f"filler/{added}".encode(), b"x" * size))
                added += 1
            except sqlite3.OperationalError as e:
                assert "full" in str(e)
                break
    return added


def make_room(cx) -> None:
    cx.execute("PRAGMA max_page_count = 1073741823")
    cx.execute("DELETE FROM Dict WHERE key LIKE 'filler/%'")


async def poll(reactor, predicate, timeout=10.0, what="condition"):
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


@pytest_twisted.ensureDeferred
async def test_a_full_disk_is_a_503_and_health_says_degraded(gateway_factory):
    gw = await gateway_factory()
    assert (await call("POST", gw.url + "/session/register", SESSION))[0] == 200
    cx = gw.store._file.db._cx
    assert await gw.store._in_thread(fill_the_disk, cx) > 0
    status, _, body = await call("POST", gw.url + "/session/register", OTHER)
    assert (status, body["error"]["code"]) == (503, "STORAGE_FULL"), body
    assert body["error"]["type"] == "server_error"
    assert gw.store.get("lmarena.ai", "team-beta") is None  # and nothing changed
    status, _, health = await call("GET", gw.url + "/health")
    assert health["status"] == "degraded" and "full" in health["store"]["error"]
    await gw.store._in_thread(make_room, cx)
    assert (await call("POST", gw.url + "/session/register", OTHER))[0] == 200
    status, _, health = await call("GET", gw.url + "/health")
    assert health["status"] == "ok"


@pytest_twisted.ensureDeferred
async def test_the_save_loop_survives_a_full_disk_and_catches_up(gateway_factory, reactor):
    gw = await gateway_factory()
    store = gw.store
    assert (await call("POST", gw.url + "/session/register", SESSION))[0] == 200
    cx = store._file.db._cx
    await store._in_thread(fill_the_disk, cx)
    store.touch("lmarena.ai", "team-alpha", 1_900_000_000)
    # the loop's next passes, sooner than its minute: each fails, none stops it
    store._flush.stop()
    store._flush.start(0.05, now=False)
    await poll(reactor, lambda: store.write_failures >= 3, what="several failed saves")
    assert store._flush.running and store.health()["status"] == "degraded"
    await store._in_thread(make_room, cx)
    await poll(reactor, lambda: store.health()["status"] == "ok", what="the save to catch up")
    row = cx.execute("SELECT value FROM Dict WHERE key = ?", (b"lmarena.ai/team-alpha",)).fetchone()
    assert b"2030-03-17" in row[0]  # the use noted while the disk was full was saved
