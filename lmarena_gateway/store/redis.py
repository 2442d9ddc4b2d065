"""The Redis session store: several gateway instances sharing their sessions.

Each instance answers lookups from memory, kept current by the change channel (see
redis_commands for the keys); after any lost subscription it reloads everything, since
messages sent meanwhile are gone for good. Writes are acknowledged only once Redis has
answered; while it cannot answer they fail with 503 and known sessions keep working.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import txredisapi
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from ..sessions import Registration, SessionRecord, session_key
from .cache import CachedSessions
from .conversations import Conversation
from .interfaces import ISessionStore
from .redis_commands import (
    RedisAddress,
    RedisSessions,
    connect,
    decode,
    parse_address,
    unavailable,
)

log = Logger()
BATCH = 500


class _ChangeListener(txredisapi.SubscriberProtocol):
    """The subscription; the store it serves is ``factory.store``."""

    def connectionMade(self):
        self.whenConnected().addCallback(lambda _: self.factory.store.subscriber_ready(self))
        return super().connectionMade()

    def messageReceived(self, pattern, channel, message):
        self.factory.store.changed(message)

    def connectionLost(self, why):
        super().connectionLost(why)
        self.factory.store.subscriber_lost(self)


@implementer(ISessionStore)
class RedisSessionStore(CachedSessions, Service):
    """Sessions in memory for lookups, written through to Redis shared by every instance."""

    backend = "redis"

    def __init__(self, address: RedisAddress, reactor, *, prefix: str = "lmgw:",
                 timeout: float = 5.0, heartbeat: float = 2.0,
                 flush_interval: float = 60.0) -> None:
        super().__init__()
        self.address = address
        self.prefix = prefix
        self.timeout = timeout
        self._reactor = reactor
        self._seen_rev = 0  # the newest change the channel has delivered
        self._subscriber = None
        self._in_sync = False
        self._syncing: list | None = None  # changes heard while a reload runs
        self._generation = 0  # bumped when the subscription drops: a reload then is stale
        self._reachable = False
        self._error = "not connected yet"
        self.reloads = 0
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = reactor
        self._heartbeat_interval = heartbeat
        self._flush = LoopingCall(self.flush)
        self._flush.clock = reactor
        self._flush_interval = flush_interval
        self.sessions: RedisSessions | None = None
        self._listener: Any = None  # the subscriber protocol's factory, once started

    @classmethod
    def from_url(cls, url: str, reactor, *, config=None, **options) -> RedisSessionStore:
        if config is not None:
            options.setdefault("prefix", getattr(config, "redis_prefix", "lmgw:"))
        return cls(parse_address(url), reactor, **options)

    # --- lifecycle ---

    def _live(self) -> RedisSessions:
        if self.sessions is None:
            raise RuntimeError("the Redis store is used before startService")
        return self.sessions

    def startService(self) -> None:
        super().startService()
        factory = connect(self.address, self._reactor, timeout=self.timeout)
        self.sessions = RedisSessions(factory, self.address, self.prefix, self.timeout,
                                      self._reactor)
        self._listener = connect(self.address, self._reactor, timeout=self.timeout,
                                 subscriber=_ChangeListener)
        self._listener.store = self
        log.info("session store {address} (prefix {prefix!r}): connecting",
                 address=self.address.display(), prefix=self.prefix)
        for loop, interval in ((self._heartbeat, self._heartbeat_interval),
                               (self._flush, self._flush_interval)):
            loop.start(interval, now=False).addErrback(
                lambda f: log.failure("session store: a timer stopped", f))

    @inlineCallbacks
    def stopService(self):
        super().stopService()
        for loop in (self._heartbeat, self._flush):
            if loop.running:
                loop.stop()
        yield self.flush()
        self._listener.store = _Ignore()
        yield self._listener.disconnect()
        yield self._live().factory.disconnect()

    # --- health ---

    def health(self) -> dict:
        connected = self.sessions is not None and self.sessions.connected and self._reachable
        changes = ("live" if self._in_sync else "reloading" if self._subscriber
                   else "disconnected")
        report = {"backend": self.backend,
                  "status": "ok" if connected and self._in_sync else "degraded",
                  "sessions": len(self._cache), "redis": self.address.display(),
                  "connected": connected, "changes": changes}
        if report["status"] != "ok":
            report["error"] = self._error
        return report

    # --- writes: acknowledged only once Redis has answered ---

    def register(self, registration: Registration, now: float) -> Deferred:
        def stored(reply):
            rev, record = reply
            return self._apply(rev, record.key, record, reply=True)

        return self._live().upsert(registration, now).addCallback(stored)

    def delete(self, domain: str, name: str) -> Deferred:
        key = session_key(domain, name)

        def deleted(rev: int) -> bool:
            self._used.pop(key, None)
            if rev:
                self._apply(rev, key, None, reply=True)
            return bool(rev)

        return self._live().delete(domain, name).addCallback(deleted)

    @inlineCallbacks
    def flush(self):
        """Persist the uses noted since the last flush; kept for the next one on failure."""
        if not self._used or self.sessions is None:
            return
        uses, self._used = self._used, {}
        items = list(uses.items())
        for start in range(0, len(items), BATCH // 3):
            try:
                yield self._live().touch(dict(items[start:start + BATCH // 3]))
            except Exception as e:
                for key, when in items[start:]:
                    self._used[key] = max(when, self._used.get(key, 0.0))
                log.warn("session store: last-use times not saved yet: {why}", why=e)
                return

    @inlineCallbacks
    def prune(self, cutoff: float):
        yield self._live().wait_connected()  # the first pass runs while still connecting
        yield self.flush()  # our own recent uses must count before anything is judged idle
        removed = yield self._live().prune(cutoff)
        pruned: Counter = Counter()
        for rev, record in removed:
            self._apply(rev, record.key, None, reply=True)
            pruned[record.domain] += 1
        self._conversations.prune(cutoff)
        yield self._live().prune_conversations(cutoff)
        return dict(pruned)

    # --- conversations: in memory at once, then in Redis beside the session ---

    def remember_conversation(self, domain: str, name: str, digest: str,
                              conversation: Conversation, replaces: str | None = None) -> Deferred:
        key = session_key(domain, name)
        if key not in self._cache or self.sessions is None:
            return succeed(False)
        evicted = self._conversations.put(key, digest, conversation, replaces)
        drop = [d for d in [replaces, *evicted] if d is not None and d != digest]
        return self.sessions.remember(key, digest, conversation, drop).addErrback(
            self._conversation_not_saved)

    def forget_conversation(self, domain: str, name: str, digest: str) -> Deferred:
        key = session_key(domain, name)
        if not self._conversations.remove(key, digest) or self.sessions is None:
            return succeed(None)
        return self.sessions.forget(key, digest).addErrback(self._conversation_not_saved)

    def _conversation_not_saved(self, failure) -> bool:
        # Kept in memory: this instance still continues it; after a restart the worst is
        # a fresh evaluation carrying the history.
        log.warn("session store: a conversation was not saved: {why}",
                 why=failure.getErrorMessage())
        return False

    # --- the memory copy ---

    def _apply(self, rev: int, key: str, record: SessionRecord | None, *, reply: bool = False):
        """One change into memory. A reply older than what the channel delivered is stale."""
        if reply and rev <= self._seen_rev:
            return self._cache.get(key, record)
        if record is None:
            self._cache.pop(key, None)
            self._conversations.drop_session(key)
            return None
        record = self._cache[key] = self.with_pending_use(record)
        return record

    # --- a lookup that missed in memory (CachedSessions.lookup) ---

    def _read_stored(self, key: str) -> Deferred:
        # Fails at once with a 503 while disconnected (RedisSessions._call).
        if self.sessions is None:
            return fail(unavailable("not started"))
        return self.sessions.read(key)

    def _found(self, key: str, stored) -> SessionRecord | None:
        """A read at ``rev`` the channel has already passed is older than memory: memory
        has every change up to it, so it says (a delete heard meanwhile wins). A newer
        one is remembered; the channel's messages for it follow and agree."""
        rev, record = stored
        if rev <= self._seen_rev or record is None:
            return self._cache.get(key)
        return self._apply(rev, key, record)

    # --- the change listener's callbacks: the subscriber protocol calls these ---

    def changed(self, message: str) -> None:
        try:
            rev, key, value = message.split("\n", 2)
            change = (int(rev), key, decode(value) if value else None)
        except (ValueError, KeyError, TypeError):
            log.warn("session store: unreadable change message {message!r}", message=message[:200])
            return
        self._seen_rev = max(self._seen_rev, change[0])
        if self._syncing is not None:
            self._syncing.append(change)
        self._apply(*change)

    def subscriber_ready(self, protocol) -> None:
        def subscribed(_):
            self._subscriber = protocol
            return self._reload()

        protocol.subscribe(self._live().channel).addCallback(subscribed).addErrback(
            lambda f: log.warn("session store: cannot subscribe: {why}", why=f.getErrorMessage()))

    def subscriber_lost(self, protocol) -> None:
        if protocol is self._subscriber:
            self._subscriber = None
            self._in_sync = False
            self._generation += 1
            self._error = "lost the change subscription; reconnecting"
            log.warn("session store: {error}", error=self._error)

    @inlineCallbacks
    def _reload(self):
        """Everything, read after subscribing, then the changes heard while reading."""
        if self._syncing is not None or self._subscriber is None:
            return
        generation, self._syncing = self._generation, []
        try:
            # The subscription may be back before the command connection is.
            yield self._live().wait_connected()
            # Every change up to this rev is in what load() reads; later ones are heard.
            rev = int((yield self._live().command("GET", self._live().keys.rev)) or 0)
            records, broken = yield self._live().load()
            conversations = yield self._live().load_conversations()
        except Exception as e:
            self._error = f"reload failed: {e}"
            log.warn("session store: {error}; retrying", error=self._error)
            return
        finally:
            changes, self._syncing = self._syncing, None
        for key in broken:
            log.warn("session store: unreadable record {key!r} ignored", key=key)
        self._cache = {}
        for key, record in records.items():
            self._apply(0, key, record)
        for change in changes:
            self._apply(*change)
        self._conversations.keep_sessions(())
        for session, digest, conversation in conversations:
            if session in self._cache:
                self._conversations.load(session, digest, conversation)
        # Reset rather than raised: a Redis that lost its data counts from 0 again.
        self._seen_rev = max([rev] + [change[0] for change in changes])
        if generation == self._generation and self._subscriber is not None:
            self._in_sync = True
            self._reachable = True
            self.reloads += 1
            log.info("session store {address}: {count} sessions loaded",
                     address=self.address.display(), count=len(self._cache))

    @inlineCallbacks
    def _beat(self):
        """Notice a dead server, and finish a reload that failed, without waiting for traffic."""
        try:
            yield self._live().command("PING")
            self._reachable = True
        except Exception as e:
            self._reachable = False
            self._error = str(e)
            return
        if self._subscriber is not None and not self._in_sync:
            yield self._reload()
        elif self._subscriber is not None:
            try:
                yield self._subscriber.ping()
            except Exception:
                pass  # the ping's timeout has already dropped the connection: it reconnects


class _Ignore:
    """Stands in for the store once it has stopped, so late callbacks do nothing."""

    def __getattr__(self, name):
        return lambda *args: None
