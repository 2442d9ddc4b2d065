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
        return succeed(self._cache.pop(key, None) is not None)

    def prune(self, cutoff: float) -> Deferred:
        idle: list[SessionRecord] = [r for r in self._cache.values() if r.last_activity < cutoff]
        for record in idle:
            del self._cache[record.key]
            self._used.pop(record.key, None)
        return succeed(dict(Counter(record.domain for record in idle)))
