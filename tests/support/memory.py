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
