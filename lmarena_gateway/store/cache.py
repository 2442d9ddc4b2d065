"""What every backend keeps in memory, and the views of it the CLI and /health print."""

from __future__ import annotations

import gc
from collections import Counter
from typing import Iterable

from ..sessions import SessionRecord, iso, session_key
from .conversations import Conversation, ConversationCache


def stats_of(records: Iterable[SessionRecord]) -> dict:
    per_domain = Counter(record.domain for record in records)
    return {"domains": dict(sorted(per_domain.items())), "total": sum(per_domain.values())}


def export_of(records: Iterable[SessionRecord], now: float) -> dict:
    """The PHP gateway's sessions.json shape, so backups and moves are one pipe."""
    domains: dict[str, dict] = {}
    for record in sorted(records, key=lambda r: r.key):
        domains.setdefault(record.domain, {})[record.session_name] = record.to_json()
    return {"domains": domains, "created_at": iso(now)}


def settle_for_the_collector() -> None:
    """Move what is loaded out of the garbage collector's sight.

    A full collection walks every tracked object while holding the interpreter lock;
    with 100 000 sessions in memory that is a stall of 100 ms or more, wherever it
    happens to start (the store's thread included). Frozen objects are not walked.
    """
    gc.collect()
    gc.freeze()


def idle_since(records: list[SessionRecord], cutoff: float) -> list[SessionRecord]:
    return [r for r in records if r.last_activity < cutoff]


class CachedSessions:
    """What every store keeps in memory: the sessions, for lookups that never wait, and
    the uses not yet saved (``touch`` notes them; the store saves them in batches)."""

    def __init__(self) -> None:
        self._cache: dict[str, SessionRecord] = {}
        self._used: dict[str, float] = {}
        self._conversations = ConversationCache()

    def conversation(self, domain: str, name: str, digest: str) -> Conversation | None:
        return self._conversations.get(session_key(domain, name), digest)

    def get(self, domain: str, name: str) -> SessionRecord | None:
        return self._cache.get(session_key(domain, name))

    def records(self, domain: str | None = None) -> list[SessionRecord]:
        return [r for r in self._cache.values() if domain is None or r.domain == domain]

    def touch(self, domain: str, name: str, now: float) -> None:
        key = session_key(domain, name)
        record = self._cache.get(key)
        if record is not None:
            self._cache[key] = record.touched(now)
            self._used[key] = float(int(now))

    def with_pending_use(self, record: SessionRecord) -> SessionRecord:
        """``record`` as read from storage, plus a use noted here and not saved yet."""
        used = self._used.get(record.key)
        if used is not None and (record.last_used_at or 0) < used:
            return record.touched(used)
        return record
