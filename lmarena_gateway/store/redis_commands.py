"""Redis for the session store: the address, the key layout, the Lua scripts, the commands.

Keys under the prefix (default ``lmgw:``); README "Several instances" explains them:

- ``{prefix}sessions``: hash, ``domain/name`` -> the record's JSON (the file store's JSON);
- ``{prefix}activity``: sorted set, ``domain/name`` scored by last activity (pruning);
- ``{prefix}rev``: a counter every change increments, so changes have an order;
- ``{prefix}changes:{db}``: pub/sub channel, one ``rev\\nkey\\nJSON`` message per change
  (empty JSON: deleted). Channels ignore db numbers, hence the db in the name;
- ``{prefix}conversations:{domain/name}``: hash, a session's conversations, history
  digest -> JSON of ids and times (store.conversations; never message text);
- ``{prefix}conversations-used``: sorted set, ``domain/name\\ndigest`` scored by last use,
  for pruning idle conversations across sessions;
- ``{prefix}token-secret`` and ``{prefix}token-generations``: the registration token
  secret and per-name generations (see tokens.RedisSecrets).

Every change is one Lua script: atomic, and announced in the same step. The daemon's
store (store.redis) and the CLI (:class:`RedisSessionFile`) share these commands.
"""

from __future__ import annotations

import os
import threading
from importlib.resources import files
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from attrs import field, frozen
from twisted.internet.defer import CancelledError, Deferred, fail, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.error import TimeoutError as TwistedTimeout
from zope.interface import implementer

from ..errors import ApiError, retry_after
from ..sessions import (
    Registration,
    SessionRecord,
    decode_record,
    encode_record,
    iso,
    record_is_valid,
    session_key,
)
from . import REDIS, backend_of
from .conversations import MAX_PER_SESSION, Conversation, decode_conversation, encode_conversation
from .interfaces import ISessionTable

BATCH = 500
REDIS_ERRORS = (txredisapi.RedisError, CancelledError, TwistedTimeout, ConnectionError)



def _lua(name: str) -> str:
    """A script from lmarena_gateway/store/lua/, each prefixed with the shared announce.lua."""
    folder = files("lmarena_gateway.store").joinpath("lua")
    return folder.joinpath("announce.lua").read_text() + folder.joinpath(f"{name}.lua").read_text()


# Every change is one atomic script that announces itself on the channel.
UPSERT, PUT, DELETE, TOUCH, PRUNE = (_lua(n) for n in ("upsert", "put", "delete", "touch", "prune"))
# Conversation changes are not announced: tabs, and so conversations, are per instance.
CONVERSATION_PUT, CONVERSATION_PRUNE, READ = (
    files("lmarena_gateway.store").joinpath("lua", f"{n}.lua").read_text()
    for n in ("conversation_put", "conversation_prune", "read"))


@frozen
class RedisKeys:
    """The three keys every script gets, in the order they name them (KEYS[1..3])."""

    sessions: str  # hash: domain/session_name -> record JSON
    activity: str  # zset: domain/session_name scored by its latest activity
    rev: str  # counter: the number of the latest change

    @classmethod
    def under(cls, prefix: str) -> RedisKeys:
        return cls(prefix + "sessions", prefix + "activity", prefix + "rev")

    def __iter__(self):
        return iter((self.sessions, self.activity, self.rev))


@frozen
class RedisAddress:
    """Where the Redis server is: ``redis://``, ``rediss://`` (TLS) or ``unix://``."""

    scheme: str
    host: str | None = None
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca: str | None = None  # rediss://: PEM file of the CA to trust instead of the system's

    def display(self) -> str:
        """The address without the password, for logs, stats and /health."""
        where = self.path if self.path else f"{self.host}:{self.port}"
        return f"{self.scheme}://{where}/{self.db}"

    def endpoint(self, reactor, timeout: float):
        if self.path:
            return UNIXClientEndpoint(reactor, self.path, timeout=timeout)
        assert self.host is not None  # parse_address gives a host or a path
        endpoint: Any = HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)
        if self.scheme == "rediss":
            from twisted.internet.ssl import Certificate, optionsForClientTLS

            trust = None
            if self.ca:  # read once, when the store starts and before anything is served
                with open(self.ca, "rb") as pem:
                    trust = Certificate.loadPEM(pem.read())
            endpoint = wrapClientTLS(optionsForClientTLS(self.host, trustRoot=trust), endpoint)
        return endpoint


def parse_address(url: str) -> RedisAddress:
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://...[?ca=PEM]``,
    ``unix://[...@]/path[?db=N]``."""
    parts = urlsplit(url)
    if backend_of(url) != REDIS:
        raise ValueError(f"{url!r} is not a redis://, rediss:// or unix:// URL")
    query = parse_qs(parts.query, keep_blank_values=True)
    allowed = {"db", "ca"} if parts.scheme == "rediss" else {"db"}
    if set(query) - allowed or parts.fragment:
        raise ValueError(f"the query parameters a {parts.scheme}:// URL takes are: "
                         f"{', '.join(sorted(allowed))}")
    db = query.get("db", [""])[-1]
    ca = query.get("ca", [None])[-1]
    if ca is not None and not os.path.isfile(ca):
        raise ValueError(f"ca={ca!r} is not a file")
    common: dict[str, Any] = {"username": unquote(parts.username) if parts.username else None,
              "password": unquote(parts.password) if parts.password else None, "ca": ca}
    if parts.scheme == "unix":
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ValueError("a unix:// URL needs an absolute socket path: unix:///run/redis.sock")
        address: dict[str, Any] = {"path": path}
    else:
        if not parts.hostname:
            raise ValueError(f"{url!r} names no host")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"{url!r} has an invalid port") from None
        address = {"host": parts.hostname, "port": port}  # typed at the unix:// branch
        db = parts.path.strip("/") or db
    if not (db or "0").isdigit():
        raise ValueError(f"the Redis database must be a number, not {db!r}")
    return RedisAddress(parts.scheme, db=int(db or 0), **address, **common)


encode = encode_record  # (field, JSON): what the file store writes, too
decode = decode_record


RECONNECT_MAX_DELAY = 2.0


def unavailable(why: str) -> ApiError:
    """Reconnection is tried at least this often, so that is the delay we can promise."""
    return ApiError(503, "STORAGE_UNAVAILABLE",
                    f"the session store (Redis) is unavailable: {why}", "server_error",
                    headers=retry_after(RECONNECT_MAX_DELAY))


class RedisSessions:
    """The store's commands over one txredisapi connection pool, for the daemon and the CLI."""

    def __init__(self, factory, address: RedisAddress, prefix: str, timeout: float,
                 clock) -> None:
        self.factory = factory
        self.redis = factory.handler
        self.timeout = timeout
        self.clock = clock
        self.prefix = prefix
        self.keys = RedisKeys.under(prefix)
        self.channel = f"{prefix}changes:{address.db}"
        self.conversations = prefix + "conversations:"  # + domain/name: a session's hash
        self.conversations_used = prefix + "conversations-used"

    @property
    def connected(self) -> bool:
        return self.factory.size > 0

    def wait_connected(self) -> Deferred:
        """Fires once a connection is up, or fails after the timeout: for background work
        (reloads, pruning) that may wait for a reconnection, unlike a client's request."""
        from twisted.internet.task import deferLater

        d = self.factory.getConnection(peek=True).addTimeout(self.timeout, self.clock)

        def failed(failure):
            failure.trap(*REDIS_ERRORS)
            raise unavailable(f"no connection within {self.timeout:g} s")

        # The pool hands the connection out before it counts it: let it finish first.
        return d.addCallbacks(lambda _: deferLater(self.clock, 0, lambda: None), failed)

    def _call(self, method: str, *args) -> Deferred:
        """Fails at once while disconnected: a caller must never wait on a reconnection."""
        if not self.connected:
            return fail(unavailable("not connected"))
        d = getattr(self.redis, method)(*args)
        d.addTimeout(self.timeout + 1, self.clock)

        def failed(failure):
            failure.trap(*REDIS_ERRORS)
            raise unavailable(failure.getErrorMessage() or failure.type.__name__)

        return d.addErrback(failed)

    def command(self, *args) -> Deferred:
        return self._call("execute_command", *args)

    def script(self, source: str, *args) -> Deferred:
        return self._call("eval", source, list(self.keys), [self.channel, *args])

    def upsert(self, registration: Registration, now: float) -> Deferred:
        record = registration.record(now, None)
        key, value = encode(record)
        keep = "1" if getattr(registration, "keep_bridge", False) else "0"
        return self.script(UPSERT, key, value, repr(record.last_activity), keep).addCallback(
            lambda reply: (int(reply[0]), decode(reply[1])))

    def read(self, key: str) -> Deferred:
        """Fires with (rev, record or None): the record as of change ``rev``, so the
        caller can tell it from what the channel has delivered since. Unreadable: None."""
        def parsed(reply):
            rev, value = reply
            try:
                record = decode(value) if value else None
            except (ValueError, KeyError, TypeError):
                record = None
            return int(rev or 0), record

        return self.script(READ, key).addCallback(parsed)

    def put(self, record: SessionRecord) -> Deferred:
        key, value = encode(record)
        return self.script(PUT, key, value, repr(record.last_activity))

    def delete(self, domain: str, name: str) -> Deferred:
        return self.script(DELETE, session_key(domain, name), self.conversations,
                           self.conversations_used).addCallback(int)

    def touch(self, uses: dict[str, float]) -> Deferred:
        args = []
        for key, when in uses.items():
            args += [key, iso(when), repr(float(when))]
        return self.script(TOUCH, *args)

    @inlineCallbacks
    def prune(self, cutoff: float, keys: list[str] | None = None):
        """[(rev, record)] removed; ``keys`` None: every session idle since before ``cutoff``."""
        removed = []
        for start in range(0, 1 << 30, BATCH):  # bounded: each round shrinks the candidates
            if keys is None:
                batch = yield self.command("ZRANGEBYSCORE", self.keys.activity, "-inf",
                                           f"({cutoff!r}", "LIMIT", 0, BATCH)
            else:
                batch = keys[start:start + BATCH]
            if not batch:
                break
            reply = yield self.script(PRUNE, repr(cutoff), self.conversations,
                                      self.conversations_used, *batch)
            for rev, value in zip(reply[::2], reply[1::2], strict=True):
                try:
                    removed.append((int(rev), decode(value)))
                except (ValueError, KeyError, TypeError):
                    pass  # an unreadable record is gone too; there is nothing to report of it
        return removed

    # --- conversations ---

    def remember(self, session: str, digest: str, conversation: Conversation,
                 drop: list[str]) -> Deferred:
        """Fires True once written, False when the session is gone."""
        return self._call("eval", CONVERSATION_PUT,
                          [self.keys.sessions, self.conversations + session,
                           self.conversations_used],
                          [session, digest, encode_conversation(conversation),
                           repr(conversation.last_used_at), str(MAX_PER_SESSION), *drop]
                          ).addCallback(lambda reply: bool(int(reply)))

    def forget(self, session: str, digest: str) -> Deferred:
        return self._call("execute_command", "HDEL", self.conversations + session,
                          digest).addCallback(lambda _: self.command(
                              "ZREM", self.conversations_used, f"{session}\n{digest}"))

    @inlineCallbacks
    def prune_conversations(self, cutoff: float):
        """How many conversations last used before ``cutoff`` were removed."""
        total = 0
        for _ in range(1 << 30):  # bounded: each round removes what it read
            count = int((yield self._call("eval", CONVERSATION_PRUNE, [self.conversations_used],
                                          [self.conversations, repr(cutoff), str(BATCH)])))
            total += count
            if count < BATCH:
                break
        return total

    @inlineCallbacks
    def load_conversations(self):
        """[(session, digest, conversation)], least recently used first; unreadable skipped."""
        members = yield self.command("ZRANGE", self.conversations_used, 0, -1)
        per_session: dict[str, list[str]] = {}
        for member in members:
            session, _, digest = member.partition("\n")
            if digest:
                per_session.setdefault(session, []).append(digest)
        found = []
        for session, digests in per_session.items():
            values = yield self.command("HMGET", self.conversations + session, *digests)
            for digest, value in zip(digests, values, strict=True):
                try:
                    found.append((session, digest, decode_conversation(value)))
                except (ValueError, KeyError, TypeError):
                    pass
        found.sort(key=lambda row: row[2].last_used_at)
        return found

    @inlineCallbacks
    def load(self):
        """({key: record}, [unreadable keys]), read a batch at a time with HSCAN."""
        records, broken, cursor = {}, [], "0"
        for _ in range(1 << 30):  # HSCAN ends with cursor 0; bounded all the same
            cursor, flat = yield self.command("HSCAN", self.keys.sessions, cursor, "COUNT", BATCH)
            for key, value in zip(flat[::2], flat[1::2], strict=True):
                try:
                    records[key] = decode(value)
                except (ValueError, KeyError, TypeError):
                    broken.append(key)
            if str(cursor) == "0":
                break
        return records, broken

    @inlineCallbacks
    def size(self):
        total = 0
        for key in (self.keys.sessions, self.keys.activity):
            total += (yield self.command("MEMORY", "USAGE", key)) or 0
        return total


def connect(address: RedisAddress, reactor, *, timeout: float, subscriber=None,
            reconnect: bool = True):
    """A txredisapi factory already connecting (and reconnecting) to ``address``.

    ``subscriber``: a SubscriberProtocol subclass, for a pub/sub connection.
    """
    if subscriber is not None:
        factory = txredisapi.SubscriberFactory(isLazy=True)
        factory.protocol = subscriber
        factory.password, factory.username = address.password, address.username
        factory.replyTimeout, factory.convertNumbers = timeout, False
    else:
        factory = txredisapi.RedisFactory(
            address.display(), address.db, 1, isLazy=reconnect, password=address.password,
            username=address.username, replyTimeout=timeout, convertNumbers=False)
    factory.reconnect = reconnect
    # Retry soon after a drop (a restart takes seconds), then every 2 s at most.
    factory.initialDelay, factory.maxDelay = 0.25, RECONNECT_MAX_DELAY
    factory.startConnecting(address.endpoint(reactor, timeout))
    return factory




@implementer(ISessionTable)
class RedisSessionFile:
    """SessionFile's synchronous face over Redis, for the CLI commands.

    The reactor runs in a thread of its own and each call waits for its answer, so the
    CLI uses the daemon's very commands (and scripts) instead of a second client.
    """

    backend = "redis"

    def __init__(self, url: str, *, prefix: str, domains, timeout: float = 5.0) -> None:
        from twisted.internet import reactor

        self.address = parse_address(url)
        self.path = self.address.display()
        self.domains = domains
        self._reactor = cast(Any, reactor)  # the global reactor, run in a thread of our own
        self._thread = threading.Thread(target=self._reactor.run, daemon=True,
                                        kwargs={"installSignalHandlers": False})
        self._thread.start()
        self.sessions: RedisSessions | None = None
        try:
            self.sessions = self._call(self._connect, prefix, timeout)
        except SystemExit:
            self.close()
            raise

    def _connect(self, prefix: str, timeout: float) -> Deferred:
        factory = connect(self.address, self._reactor, timeout=timeout, reconnect=False)
        ready = factory.deferred.addTimeout(timeout, self._reactor)

        def failed(failure):
            factory.disconnect()
            raise unavailable(f"cannot reach {self.path}: {failure.getErrorMessage()}")

        return ready.addCallbacks(
            lambda _: RedisSessions(factory, self.address, prefix, timeout, self._reactor), failed)

    def _live(self) -> RedisSessions:
        if self.sessions is None:
            raise RuntimeError("not connected to Redis")
        return self.sessions

    def _call(self, function, *args):
        from twisted.internet.threads import blockingCallFromThread

        try:
            return blockingCallFromThread(self._reactor, function, *args)
        except ApiError as e:
            raise SystemExit(f"lmgateway: {e.message}") from None

    def load(self):
        return self._call(self._live().load)

    def put(self, record: SessionRecord) -> None:
        if not record_is_valid(record, self.domains):
            raise ValueError(f"{record.key}: not a valid session")
        self._call(self._live().put, record)

    def delete(self, domain: str, name: str) -> bool:
        return bool(self._call(self._live().delete, domain, name))

    def revoke_tokens(self, name: str) -> int:
        """Bump ``name``'s registration token generation (see tokens.RedisSecrets)."""
        return int(self._call(self._live().command, "HINCRBY",
                              f"{self._live().prefix}token-generations", name, 1))

    def prune(self, cutoff: float, candidates) -> list[SessionRecord]:
        removed = self._call(self._live().prune, cutoff, [r.key for r in candidates])
        return [record for _, record in removed]

    def size(self) -> int:
        return self._call(self._live().size)

    def close(self) -> None:
        if self.sessions is not None:
            self._call(self._live().factory.disconnect)
        self._reactor.callFromThread(self._reactor.stop)
        self._thread.join(10)
