"""The embedded store: dbm interface, durability under kill -9, sharing with the CLI, pruning."""

import json
import sqlite3
import subprocess
import threading

import pytest
import pytest_twisted
from twisted.application.internet import TimerService
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from lmarena_gateway.service import DAY, Pruner
from lmarena_gateway.sessions import validate_registration
from lmarena_gateway.store import sqlitedbm
from lmarena_gateway.store.sqlite import DBMSessionStore, SessionFile

from support.client import SESSION
from support.processes import bin_path, http, wait_for

DOMAINS = ("lmarena.ai", "canary.lmarena.ai")


def test_dbm_interface(tmp_path):
    path = str(tmp_path / "x.db")
    db = sqlitedbm.open(path, "c")
    db["a"] = "1"
    db[b"b"] = b"2"
    assert db["a"] == b"1" and db.get("zz") is None
    assert sorted(db.keys()) == [b"a", b"b"] and len(db) == 2 and "b" in db
    del db["a"]
    with pytest.raises(KeyError):
        del db["a"]
    db.close()
    # the layout of Python 3.13's dbm.sqlite3, readable by plain sqlite3
    rows = sqlite3.connect(path).execute("SELECT key, value FROM Dict").fetchall()
    assert rows == [(b"b", b"2")]
    assert sqlitedbm.open(path, "r")["b"] == b"2"
    with pytest.raises(sqlitedbm.error):
        sqlitedbm.open(str(tmp_path / "missing.db"), "r")


def test_not_a_database_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(sqlitedbm.error, match="not a usable session database"):
        sqlitedbm.open(str(junk), "w")


def test_transaction_rolls_back_on_error(tmp_path):
    db = sqlitedbm.open(str(tmp_path / "x.db"))
    db["keep"] = "1"
    with pytest.raises(RuntimeError):
        with db.transaction():
            db["keep"] = "2"
            raise RuntimeError()
    assert db["keep"] == b"1"


def registration(name, domain="lmarena.ai"):
    return validate_registration(dict(SESSION, session_name=name, domain=domain), DOMAINS)


@pytest_twisted.ensureDeferred
async def test_uses_are_kept_in_memory_and_flushed_in_batches(tmp_path, reactor):
    path = str(tmp_path / "s.db")
    store = DBMSessionStore(path, reactor)
    store.startService()
    try:
        await store.register(registration("a"), 1000.0)
        for second in range(100):
            store.touch("lmarena.ai", "a", 2000.0 + second)
        assert store.get("lmarena.ai", "a").last_used_at == 2099.0
        on_disk = SessionFile(path).load()[0]["lmarena.ai/a"]
        assert on_disk.last_used_at is None  # not one disk write per use
        await store.flush()
        assert SessionFile(path).load()[0]["lmarena.ai/a"].last_used_at == 2099.0
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_stop_flushes_pending_uses(tmp_path, reactor):
    path = str(tmp_path / "s.db")
    store = DBMSessionStore(path, reactor)
    store.startService()
    await store.register(registration("a"), 1000.0)
    store.touch("lmarena.ai", "a", 5000.0)
    await store.stopService()
    assert SessionFile(path).load()[0]["lmarena.ai/a"].last_used_at == 5000.0


@pytest_twisted.ensureDeferred
async def test_pruning_on_a_clock(tmp_path, reactor):
    """The TimerService prunes by latest activity, per --cleanup-days, on its interval."""
    clock = Clock()
    clock.advance(100 * DAY)
    store = DBMSessionStore(str(tmp_path / "s.db"), reactor)
    store.startService()
    try:
        now = clock.seconds()
        await store.register(registration("old"), now - 40 * DAY)
        await store.register(registration("old-but-used"), now - 40 * DAY)
        store.touch("lmarena.ai", "old-but-used", now - 1 * DAY)
        await store.register(registration("recent", "canary.lmarena.ai"), now - 10 * DAY)
        await store.register(registration("old-canary", "canary.lmarena.ai"), now - 31 * DAY)
        pruner = Pruner(store, clock, days=30)
        timer = TimerService(3600, pruner)
        timer.clock = clock
        timer.startService()  # runs once at start
        assert pruner.running is not None
        pruned = await pruner.running
        assert pruned == {"lmarena.ai": 1, "canary.lmarena.ai": 1}
        names = sorted(r.key for r in store.records())
        assert names == ["canary.lmarena.ai/recent", "lmarena.ai/old-but-used"]
        assert sorted(SessionFile(store.path).load()[0]) == names
        # 21 days later "recent" (last active 10 days ago) is 31 days idle
        clock.advance(21 * DAY)
        assert pruner.running is not None
        assert await pruner.running == {"canary.lmarena.ai": 1}
        assert [r.key for r in store.records()] == ["lmarena.ai/old-but-used"]
        timer.stopService()
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_pruning_failure_does_not_stop_the_timer(tmp_path):
    class Broken:
        calls = 0

        def prune(self, cutoff):
            self.calls += 1
            raise RuntimeError("disk on fire")

    clock = Clock()
    broken = Broken()
    pruner = Pruner(broken, clock, days=1)
    timer = TimerService(60, pruner)
    timer.clock = clock
    timer.startService()
    clock.advance(60)
    clock.advance(60)
    assert broken.calls == 3
    assert timer.running and timer._loop.running
    timer.stopService()


def test_zero_days_turns_pruning_off():
    asked = []

    class Store:
        def prune(self, cutoff):
            asked.append(cutoff)  # the pruner catches what prune raises: record instead
            return succeed({})

    pruner = Pruner(Store(), Clock(), days=0)
    pruner()
    assert asked == []
    assert pruner.running is None


def register_http(url, name, sid=None):
    body = dict(SESSION, session_name=name)
    if sid:
        body["session_id"] = sid
    return http("POST", url + "/session/register", body, timeout=5)


def test_kill_9_loses_no_acknowledged_write(daemon_factory):
    """Concurrent registrations, kill -9 mid-load, restart: every acknowledged session is there."""
    daemon = daemon_factory()
    acknowledged, lock, stop = [], threading.Lock(), threading.Event()

    def worker(w):
        for i in range(1000):
            if stop.is_set():
                return
            name = f"w{w}-{i}"
            try:
                status = register_http(daemon.url, name)[0]
            except OSError:
                return
            if status == 200:
                with lock:
                    acknowledged.append(name)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(10)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(acknowledged) >= 150, 30, what="150 acknowledged registrations")
    daemon.kill()
    stop.set()
    for thread in threads:
        thread.join(10)
    assert daemon.process.returncode == -9
    restarted = daemon_factory(port=daemon.port, env={"STORAGE_PATH": daemon.storage})
    _, _, listing = http("GET", restarted.url + "/session/list?domain=lmarena.ai")
    stored = set(listing["domains"]["lmarena.ai"])
    missing = set(acknowledged) - stored
    assert not missing, f"{len(missing)} acknowledged registrations lost"


def cli(*args, storage):
    return subprocess.run([bin_path("lmgateway"), *args, "--storage", storage],
                          capture_output=True, text=True, timeout=30)


def test_cli_and_daemon_share_the_store(daemon_factory, tmp_path):
    daemon = daemon_factory()
    assert register_http(daemon.url, "from-api")[0] == 200
    exported = cli("export", storage=daemon.storage)
    assert exported.returncode == 0
    assert "from-api" in json.loads(exported.stdout)["domains"]["lmarena.ai"]

    # a change made by the CLI is seen by the daemon within 1 s
    data = json.loads(exported.stdout)
    data["domains"]["lmarena.ai"]["from-cli"] = dict(data["domains"]["lmarena.ai"]["from-api"])
    source = tmp_path / "import.json"
    source.write_text(json.dumps(data))
    assert cli("import", str(source), storage=daemon.storage).returncode == 0

    def seen():
        _, _, listing = http("GET", daemon.url + "/session/list?domain=lmarena.ai")
        return "from-cli" in listing["domains"]["lmarena.ai"]

    wait_for(seen, 10, interval=0.02, what="the daemon to see the CLI's import")

    # and the daemon's change is seen by the CLI at once
    assert http("DELETE", daemon.url + "/session/lmarena.ai/from-api")[0] == 200
    again = json.loads(cli("export", storage=daemon.storage).stdout)
    assert set(again["domains"]["lmarena.ai"]) == {"from-cli"}
