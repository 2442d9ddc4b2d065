"""A session store in memory: the unit tier's stand-in for the file and Redis stores.

It keeps sessions as every store does (``CachedSessions``) and acknowledges each write
at once, so a test through the routes needs neither a thread pool nor reactor time.
"""

from __future__ import annotations

from collections import Counter

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from lmarena_gateway.sessions import Registration, SessionRecord, session_key
from lmarena_gateway.store import ISessionStore
from lmarena_gateway.store.cache import CachedSessions
from lmarena_gateway.store.conversations import Conversation


@implementer(ISessionStore)
class MemoryStore(CachedSessions, Service):
    """Writes fire at once; ``status`` is what /health reports, for degraded-store tests."""

    backend = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.status = "ok"

    def health(self) -> dict:
        return {"backend": self.backend, "status": self.status, "sessions": len(self._cache)}

    def register(self, registration: Registration, now: float) -> Deferred:
        key = session_key(registration.domain, registration.session_name)
        record = registration.record(now, self._cache.get(key))
        self._cache[key] = self.with_pending_use(record)
        return succeed(record)

    def delete(self, domain: str, name: str) -> Deferred:
        key = session_key(domain, name)
        self._used.pop(key, None)
        self._conversations.drop_session(key)
        return succeed(self._cache.pop(key, None) is not None)

    def prune(self, cutoff: float) -> Deferred:
        idle: list[SessionRecord] = [r for r in self._cache.values() if r.last_activity < cutoff]
        for record in idle:
            del self._cache[record.key]
            self._used.pop(record.key, None)
            self._conversations.drop_session(record.key)
        self._conversations.prune(cutoff)
        return succeed(dict(Counter(record.domain for record in idle)))

    def remember_conversation(self, domain: str, name: str, digest: str,
                              conversation: Conversation, replaces: str | None = None) -> Deferred:
        key = session_key(domain, name)
        if key not in self._cache:
            return succeed(False)
        self._conversations.put(key, digest, conversation, replaces)
        return succeed(True)

    def forget_conversation(self, domain: str, name: str, digest: str) -> Deferred:
        self._conversations.remove(session_key(domain, name), digest)
        return succeed(None)


class Storage:
    """What several processes share (a file, a Redis): records by key, read with a delay."""

    def __init__(self, clock, latency: float = 0.01) -> None:
        self.clock = clock
        self.latency = latency
        self.records: dict[str, SessionRecord] = {}
        self.reads = 0
        self.down = False


@implementer(ISessionStore)
class ProcessStore(MemoryStore):
    """One process's store over shared ``Storage``: its memory hears nothing of the
    others' writes (as if their poll or pub/sub had not caught up), so only a lookup's
    read of the storage finds them. A read sees the storage as it was when it was sent,
    and answers ``latency`` later on the clock; while ``storage.down`` it fails with 503."""

    def __init__(self, storage: Storage) -> None:
        super().__init__()
        self.storage = storage

    def register(self, registration: Registration, now: float) -> Deferred:
        d = super().register(registration, now)
        key = session_key(registration.domain, registration.session_name)
        self.storage.records[key] = self._cache[key]
        return d

    def delete(self, domain: str, name: str) -> Deferred:
        self.storage.records.pop(session_key(domain, name), None)
        return super().delete(domain, name)

    def _read_stored(self, key: str) -> Deferred:
        from twisted.internet.task import deferLater

        from lmarena_gateway.errors import ApiError

        self.storage.reads += 1
        if self.storage.down:
            failure = ApiError(503, "STORAGE_UNAVAILABLE", "the test's storage is down",
                               "server_error")
            return deferLater(self.storage.clock, self.storage.latency, _raise, failure)
        seen = self.storage.records.get(key)
        return deferLater(self.storage.clock, self.storage.latency, lambda: seen)


def _raise(error: Exception):
    raise error
