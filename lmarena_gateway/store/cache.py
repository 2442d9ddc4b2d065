"""What every backend keeps in memory, and the views of it the CLI and /health print."""

from __future__ import annotations

import gc
from collections import Counter
from typing import Iterable

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

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


class _Read:
    """One store read for a key, and the callers waiting for what it finds."""

    def __init__(self) -> None:
        self.waiting: list[Deferred] = []
        self.after: list[Deferred] = []  # arrived once the read was sent: it may be too old

    def wait(self, queue: list[Deferred]) -> Deferred:
        d: Deferred = Deferred()
        queue.append(d)
        return d


class CachedSessions:
    """What every store keeps in memory: the sessions, for lookups that never wait, and
    the uses not yet saved (``touch`` notes them; the store saves them in batches).

    Memory learns of other processes' writes late (the file store's poll, Redis pub/sub),
    so a lookup that misses asks the store itself (:meth:`lookup`): a registration
    acknowledged anywhere is found by the next request everywhere.
    """

    def __init__(self) -> None:
        self._cache: dict[str, SessionRecord] = {}
        self._used: dict[str, float] = {}
        self._conversations = ConversationCache()
        self._reads: dict[str, _Read] = {}
        self.store_reads = 0  # reads sent to the store by lookup(): tests count them

    def lookup(self, domain: str, name: str) -> Deferred:
        """The session from memory, else from the store itself: fires with the record or
        None, or fails with a 503 ApiError when the store cannot be read.

        Misses for one key share reads, without ever answering from a read sent before
        the caller arrived: a registration acknowledged then may be missing from that
        read. So a caller joins the read in flight; if it finds nothing, those who came
        after it was sent get one new read between them. There is no negative cache,
        for the same reason: at most one read per key is in flight, however many wait.
        """
        record = self.get(domain, name)
        if record is not None:
            return succeed(record)
        key = session_key(domain, name)
        read = self._reads.get(key)
        if read is not None:
            return read.wait(read.after)
        read = self._reads[key] = _Read()
        waiter = read.wait(read.waiting)
        self._send_read(key, read)
        return waiter

    def _send_read(self, key: str, read: _Read) -> None:
        self.store_reads += 1

        def found(stored) -> None:
            try:
                record = self._found(key, stored)
            except Exception:
                return failed(Failure())
            waiting, read.waiting = read.waiting, []
            if record is None and read.after:
                read.waiting, read.after = read.after, []
                self._send_read(key, read)
            else:
                waiting += read.after
                read.after = []
                del self._reads[key]
            for d in waiting:
                d.callback(record)

        def failed(failure) -> None:
            # Everyone waiting has the same answer: the store cannot say, now.
            self._reads.pop(key, None)
            waiting, read.waiting, read.after = read.waiting + read.after, [], []
            for d in waiting:
                d.errback(failure)

        self._read_stored(key).addCallbacks(found, failed)

    def _read_stored(self, key: str) -> Deferred:
        """The backend's read of one record from storage, off the reactor; fires with
        what :meth:`_found` takes (here: the record or None), or a 503 ApiError."""
        return succeed(None)

    def _found(self, key: str, stored) -> SessionRecord | None:
        """What a store read means once back on the reactor: memory may have moved on
        meanwhile. The default: a record memory does not have is remembered."""
        known = self._cache.get(key)
        if known is not None or stored is None:
            return known
        record = self._cache[key] = self.with_pending_use(stored)
        return record

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
