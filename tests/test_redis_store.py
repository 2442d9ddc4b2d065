"""The Redis store against a real redis-server: durability, sharing, pruning, outages.

Each test starts its own redis-server on a free loopback port (appendfsync always, in a
tmp dir) and drives RedisSessionStore instances on the real reactor.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import pytest_twisted
from attrs import evolve
from twisted.internet.task import deferLater

from lmarena_gateway.config import ConfigError, build_config
from lmarena_gateway.errors import ApiError
from lmarena_gateway.sessions import validate_registration
from lmarena_gateway.store.redis import RedisSessionStore
from lmarena_gateway.store.redis_commands import connect, encode, parse_address

from support.client import SESSION
from support.processes import free_port
from support.redis import RedisServer

DOMAINS = ("lmarena.ai", "canary.lmarena.ai")


async def until(predicate, timeout: float = 5.0, what: str = "condition"):
    """Poll on the reactor every millisecond, with a deadline; returns seconds waited."""
    from twisted.internet import reactor

    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, 0.001, lambda: None)
    return time.monotonic() - started


@pytest_twisted.async_yield_fixture
async def stores(redis_server, reactor):
    """``await stores(**options)``: a started store on the test's Redis, stopped afterwards."""
    started = []

    async def make(**options) -> RedisSessionStore:
        store = RedisSessionStore(parse_address(redis_server.url), reactor, **options)
        store.startService()
        started.append(store)
        await until(lambda: store.health()["status"] == "ok", 10, "the store to connect")
        return store

    yield make
    for store in started:
        if store.running:
            await store.stopService()


def registration(name: str = "team-alpha", **fields):
    return validate_registration(dict(SESSION, session_name=name, **fields), DOMAINS)


def stored(redis_server, name: str, domain: str = "lmarena.ai", prefix: str = "lmgw:"):
    value = redis_server("HGET", prefix + "sessions", f"{domain}/{name}")
    return None if value is None else json.loads(value)


# --- addresses and settings ---


def test_redis_urls_parse_into_addresses():
    address = parse_address("redis://user:p%40ss@cache.example:6380/3")
    assert (address.host, address.port, address.db) == ("cache.example", 6380, 3)
    assert (address.username, address.password) == ("user", "p@ss")
    assert "p@ss" not in repr(address) and address.display() == "redis://cache.example:6380/3"
    assert parse_address("redis://:secret@localhost").password == "secret"
    assert parse_address("redis://localhost").username is None
    unix = parse_address("unix:///run/redis/redis.sock?db=2")
    assert (unix.path, unix.db, unix.host) == ("/run/redis/redis.sock", 2, None)
    assert parse_address("rediss://h/0").scheme == "rediss"


@pytest.mark.parametrize("url, problem", [
    ("redis://", "names no host"),
    ("redis://h:99999/0", "invalid port"),
    ("redis://h/zero", "must be a number"),
    ("redis://h/0?timeout=3", "query parameters a redis:// URL takes are: db"),
    ("redis://h/0?ca=/etc/hostname", "query parameters a redis:// URL takes are: db"),
    ("rediss://h/0?ca=/nonexistent.pem", "is not a file"),
    ("unix://relative.sock", "absolute socket path"),
])
def test_bad_redis_urls_are_one_line_config_errors(url, problem):
    with pytest.raises(ConfigError, match=f"^--storage: .*{problem}"):
        build_config({"storage": url}, {})


def test_redis_prefix_setting():
    assert build_config({}, {}).redis_prefix == "lmgw:"
    assert build_config({}, {"GATEWAY_REDIS_PREFIX": "gw2:"}).redis_prefix == "gw2:"
    assert build_config({"redis-prefix": "a:"}, {"GATEWAY_REDIS_PREFIX": "b:"}).redis_prefix == "a:"
    with pytest.raises(ConfigError, match="^GATEWAY_REDIS_PREFIX: "):
        build_config({}, {"GATEWAY_REDIS_PREFIX": "has space"})


# --- the store ---


@pytest_twisted.ensureDeferred
async def test_registration_is_in_redis_before_it_is_acknowledged(stores, redis_server):
    store = await stores()
    record = await store.register(registration(models={"fast": "gpt-4o"}), 1_700_000_000.7)
    # the same JSON the file store writes, under the documented key
    assert stored(redis_server, "team-alpha") == json.loads(encode(record)[1])
    assert record.created_at == record.updated_at == 1_700_000_000.0
    assert store.get("lmarena.ai", "team-alpha") == record
    assert redis_server("ZSCORE", "lmgw:activity", "lmarena.ai/team-alpha") == "1700000000"


@pytest_twisted.ensureDeferred
async def test_upsert_keeps_created_at_and_last_use(stores, redis_server):
    store = await stores(flush_interval=3600)
    await store.register(registration(), 1000.0)
    store.touch("lmarena.ai", "team-alpha", 1500.0)
    await store.flush()
    again = await store.register(registration(models={"m": "x"}), 2000.0)
    assert (again.created_at, again.updated_at, again.last_used_at) == (1000.0, 2000.0, 1500.0)
    assert stored(redis_server, "team-alpha")["created_at"] == "1970-01-01T00:16:40Z"
    assert stored(redis_server, "team-alpha")["models"] == {"m": "x"}


@pytest_twisted.ensureDeferred
async def test_a_userscript_registration_keeps_the_admins_bridge_key_and_aliases(stores):
    store = await stores()
    await store.register(registration(bridge_base_url="http://bridge-a:5102",
                                      bridge_api_key="k-a", models={"m": "x"}), 1000.0)
    renewed = await store.register(
        evolve(registration(session_id="aaaaaaaa-1234-1234-1234-123456789abc"),
               keep_bridge=True), 2000.0)
    assert (renewed.bridge_base_url, renewed.bridge_api_key, renewed.models) == (
        "http://bridge-a:5102", "k-a", {"m": "x"})
    assert renewed.session_id.startswith("aaaaaaaa") and renewed.updated_at == 2000.0
    # what any instance would load is the same record
    assert (await store.sessions.load())[0]["lmarena.ai/team-alpha"] == renewed
    # an admin's registration replaces them
    replaced = await store.register(registration(), 3000.0)
    assert (replaced.bridge_base_url, replaced.bridge_api_key, replaced.models) == (None, None, {})


@pytest_twisted.ensureDeferred
async def test_concurrent_upserts_from_two_instances_agree_on_created_at(stores):
    a, b = await stores(), await stores()
    results = await _gather([(a if i % 2 else b).register(registration(), 1000.0 + i)
                             for i in range(100)])
    assert len({r.created_at for r in results}) == 1


async def _gather(deferreds):
    from twisted.internet.defer import gatherResults

    return await gatherResults(deferreds, consumeErrors=True)


@pytest_twisted.ensureDeferred
async def test_changes_reach_every_instance(stores):
    """A write on one instance shows on the other, each way (bench/redis_invalidation.py
    measures how fast: a few milliseconds)."""
    a, b = await stores(), await stores()
    for i in range(10):
        name = f"s{i}"
        await a.register(registration(name), 1000.0)
        await until(lambda name=name: b.get("lmarena.ai", name) is not None, 10, "the registration on B")
        assert await b.delete("lmarena.ai", name) is True
        await until(lambda name=name: a.get("lmarena.ai", name) is None, 10, "the deletion on A")


@pytest_twisted.ensureDeferred
async def test_uses_are_saved_in_batches_and_shared(stores, redis_server):
    a, b = await stores(flush_interval=3600), await stores()
    await a.register(registration(), 1000.0)
    for when in (1100.0, 1200.0, 1300.0):
        a.touch("lmarena.ai", "team-alpha", when)
    assert a.get("lmarena.ai", "team-alpha").last_used_at == 1300.0
    assert stored(redis_server, "team-alpha")["last_used_at"] is None  # memory only, so far
    await a.flush()
    assert stored(redis_server, "team-alpha")["last_used_at"] == "1970-01-01T00:21:40Z"
    # B may not have seen the registration yet either: wait for the record, then the use
    await until(lambda: getattr(b.get("lmarena.ai", "team-alpha"), "last_used_at", None) == 1300.0,
                10, "the saved use on B")
    # an older use noted elsewhere never moves it back
    b.touch("lmarena.ai", "team-alpha", 1250.0)
    await b.flush()
    assert stored(redis_server, "team-alpha")["last_used_at"] == "1970-01-01T00:21:40Z"


@pytest_twisted.ensureDeferred
async def test_every_instance_may_prune_at_once_and_each_session_goes_once(stores, redis_server):
    a, b = await stores(), await stores()
    await _gather([a.register(registration(f"old{i}", domain="lmarena.ai" if i % 3 else
                                           "canary.lmarena.ai"), 1000.0) for i in range(60)])
    await a.register(registration("fresh"), 5000.0)
    await a.register(registration("used"), 1000.0)
    a.touch("lmarena.ai", "used", 4000.0)  # only in A's memory: A's prune saves it first
    first, second = await _gather([a.prune(3000.0), b.prune(3000.0)])
    total = {d: first.get(d, 0) + second.get(d, 0) for d in set(first) | set(second)}
    assert total == {"lmarena.ai": 40, "canary.lmarena.ai": 20}
    assert await a.prune(3000.0) == {} and await b.prune(3000.0) == {}
    assert sorted(redis_server("HKEYS", "lmgw:sessions")) == ["lmarena.ai/fresh", "lmarena.ai/used"]
    assert redis_server("ZCARD", "lmgw:activity") == 2
    for store in (a, b):
        await until(lambda store=store: len(store.records()) == 2, 1.0, "pruned sessions gone everywhere")


@pytest_twisted.ensureDeferred
async def test_prefixes_keep_fleets_apart(stores, redis_server):
    one, other = await stores(prefix="one:"), await stores(prefix="two:")
    await one.register(registration(), 1000.0)
    await other.register(registration("elsewhere"), 1000.0)
    assert stored(redis_server, "team-alpha", prefix="one:") is not None
    assert stored(redis_server, "team-alpha", prefix="two:") is None
    assert [r.session_name for r in other.records()] == ["elsewhere"]
    assert [r.session_name for r in one.records()] == ["team-alpha"]


@pytest_twisted.ensureDeferred
async def test_a_new_instance_loads_everything_and_skips_unreadable_records(stores, redis_server):
    a = await stores()
    # more than one HSCAN batch; written at once, as many clients would
    await _gather([a.register(registration(f"s{i}"), 1000.0) for i in range(1200)])
    redis_server("HSET", "lmgw:sessions", "lmarena.ai/broken", "{not json")
    b = await stores()
    assert len(b.records()) == 1200 and b.get("lmarena.ai", "broken") is None
    assert b.get("lmarena.ai", "s1199") == a.get("lmarena.ai", "s1199")
    # pruning removes it like any idle session, without tripping over it
    redis_server("ZADD", "lmgw:activity", 1, "lmarena.ai/broken")
    assert await b.prune(500.0) == {}
    assert redis_server("HEXISTS", "lmgw:sessions", "lmarena.ai/broken") == 0


@pytest_twisted.ensureDeferred
async def test_redis_down_known_sessions_stay_writes_fail_503_then_it_recovers(
        stores, redis_server, reactor):
    store = await stores(heartbeat=0.1, timeout=60)
    await store.register(registration("known"), 1000.0)
    redis_server.kill()
    await until(lambda: store.health()["status"] == "degraded", 30, "the store to notice")
    assert store.get("lmarena.ai", "known") is not None  # chat keeps working from memory
    for attempt in (lambda: store.register(registration("new"), 2000.0),
                    lambda: store.delete("lmarena.ai", "known")):
        with pytest.raises(ApiError) as refused:  # at once: long before the 60 s timeout
            await attempt().addTimeout(10, reactor)
        assert (refused.value.status, refused.value.code) == (503, "STORAGE_UNAVAILABLE")
    store.touch("lmarena.ai", "known", 3000.0)
    await store.flush()  # fails quietly and keeps the use for later
    health = store.health()
    assert health["status"] == "degraded" and health["connected"] is False and health["error"]

    redis_server.start()
    await until(lambda: store.health()["status"] == "ok", 30, "the store to reconnect")
    assert stored(redis_server, "known")["last_used_at"] is None
    await store.flush()
    assert stored(redis_server, "known")["last_used_at"] == "1970-01-01T00:50:00Z"
    assert stored(redis_server, "new") is None  # refused, so not there
    await store.register(registration("new"), 4000.0)
    assert stored(redis_server, "new") is not None


@pytest_twisted.ensureDeferred
async def test_a_hung_redis_is_a_503_within_the_timeout_not_a_hang(stores, redis_server, reactor):
    store = await stores(timeout=0.5, heartbeat=0.1)
    await store.register(registration("known"), 1000.0)
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(ApiError) as refused:  # the 0.5 s timeout, not a hang
            await store.register(registration("new"), 2000.0).addTimeout(10, reactor)
        assert refused.value.code == "STORAGE_UNAVAILABLE"
        await until(lambda: store.health()["status"] == "degraded", 30, "the heartbeat to notice")
        assert store.get("lmarena.ai", "known") is not None
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    await until(lambda: store.health()["status"] == "ok", 30, "the store to recover")
    await store.register(registration("after"), 3000.0)
    assert stored(redis_server, "after") is not None


@pytest_twisted.ensureDeferred
async def test_changes_missed_while_unsubscribed_arrive_by_reloading(stores, redis_server):
    a, b = await stores(), await stores()
    await a.register(registration("stays"), 1000.0)
    await a.register(registration("goes"), 1000.0)
    reloads = b.reloads
    b._listener.initialDelay = 1.0  # B stays away long enough for the writes below
    redis_server("CLIENT", "KILL", "TYPE", "pubsub")
    await until(lambda: b.health()["changes"] != "live", 5, "B to lose its subscription")
    await a.register(registration("arrives"), 1000.0)
    await a.delete("lmarena.ai", "goes")
    assert b.health()["changes"] != "live"  # so B cannot have heard these
    await until(lambda: b.health()["status"] == "ok", 10, "B to resubscribe")
    assert b.reloads == reloads + 1
    assert sorted(r.session_name for r in b.records()) == ["arrives", "stays"]


def make_certificates(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA of our own and a certificate it signed for localhost: (ca, cert, key) PEM files."""
    from datetime import datetime, timedelta, timezone
    from ipaddress import ip_address

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(timezone.utc)

    def certificate(subject, key, issuer, issuer_key, extensions):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(minutes=5))
                   .not_valid_after(now + timedelta(days=1)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca = certificate(ca_name, ca_key, ca_name, ca_key,
                     [(x509.BasicConstraints(ca=True, path_length=None), True)])
    server = certificate(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), server_key, ca_name,
        ca_key, [(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                               x509.IPAddress(ip_address("127.0.0.1"))]), False)])
    paths = [directory / f"{name}-{part}.pem" for part in ("ca", "cert", "key")]
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return paths[0], paths[1], paths[2]


@pytest_twisted.ensureDeferred
async def test_rediss_checks_the_server_against_the_given_ca(tmp_path, reactor):
    ca, cert, key = make_certificates(tmp_path, "ours")
    stranger, _, _ = make_certificates(tmp_path, "stranger")
    tls_port = free_port()
    server = RedisServer(tmp_path, ["--tls-port", str(tls_port), "--tls-cert-file", str(cert),
                                    "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                                    "--tls-auth-clients", "no"]).start()
    store = RedisSessionStore.from_url(f"rediss://localhost:{tls_port}/0?ca={ca}", reactor)
    store.startService()
    try:
        await until(lambda: store.health()["status"] == "ok", 10, "a TLS connection")
        await store.register(registration(), 1000.0)
        assert stored(server, "team-alpha") is not None
        # a server whose certificate our CA did not sign is refused
        doubted = connect(parse_address(f"rediss://localhost:{tls_port}/0?ca={stranger}"),
                          reactor, timeout=2, reconnect=False)
        with pytest.raises(ValueError, match="could not"):
            await doubted.deferred
    finally:
        await store.stopService()
        server.kill()


@pytest_twisted.ensureDeferred
async def test_a_unix_socket_and_a_database_number(tmp_path, reactor):
    socket_path = tmp_path / "redis.sock"
    server = RedisServer(tmp_path, ["--unixsocket", str(socket_path)]).start()
    store = RedisSessionStore.from_url(f"unix://{socket_path}?db=3", reactor)
    store.startService()
    try:
        await until(lambda: store.health()["status"] == "ok", 10, "the store to connect")
        await store.register(registration(), 1000.0)
        assert server("HLEN", "lmgw:sessions") == 0  # db 0 stays empty; db 3 has it
        assert server("EVAL", "redis.call('SELECT', 3) return redis.call('HLEN', KEYS[1])",
                      1, "lmgw:sessions") == 1
        assert store.health()["redis"] == f"unix://{socket_path}/3"
    finally:
        await store.stopService()
        server.kill()


@pytest_twisted.ensureDeferred
async def test_health_reports_the_backend(stores):
    health = (await stores()).health()
    assert health["backend"] == "redis" and health["status"] == "ok"
    assert health["changes"] == "live" and health["redis"].startswith("redis://127.0.0.1:")
