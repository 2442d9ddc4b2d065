"""The embedded backend: sessions in memory, written through to a SQLite-dbm file.

Callers on the reactor read sessions from memory only; every disk operation runs in a
one-thread pool, one at a time, and a write is acknowledged only once committed.
"""

from __future__ import annotations

import gc
import os
import sqlite3
from collections import Counter
from typing import Iterable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from ..errors import ApiError
from ..sessions import Registration, SessionRecord, decode_record, encode_record, session_key
from . import sqlitedbm
from .cache import CachedSessions, idle_since, settle_for_the_collector
from .conversations import Conversation, decode_conversation, encode_conversation
from .interfaces import ISessionStore, ISessionTable

PRUNE_BATCH = 1000
# Conversations live beside the sessions in the same file, in a table of their own, so
# the Dict table stays a plain dbm (dbm.sqlite3 reads it) and one transaction covers
# a session and its conversations.
CONVERSATIONS = ("CREATE TABLE IF NOT EXISTS Conversations (session TEXT NOT NULL, "
                 "digest TEXT NOT NULL, value TEXT NOT NULL, last_used REAL NOT NULL, "
                 "PRIMARY KEY (session, digest))")


def open_file(path: str, *, create: bool = False) -> SessionFile:
    """The CLI's table: an existing store file, unless ``create`` (import) asks for one."""
    if create:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    elif not os.path.exists(path):
        raise FileNotFoundError(f"no session store at {path!r} (set --storage or STORAGE_PATH)")
    return SessionFile(path, "c" if create else "w")


@implementer(ISessionTable)
class SessionFile:
    """Synchronous operations on one store file: run in the store's thread, or by the CLI."""

    backend = "sqlite-dbm"

    def __init__(self, path: str, flag: str = "c") -> None:
        self.path = path
        self.db = sqlitedbm.open(path, flag)
        if flag != "r":
            self.db.sql(CONVERSATIONS)

    def close(self) -> None:
        self.db.close()

    def _get(self, key: str) -> SessionRecord | None:
        value = self.db.get(key)
        return None if value is None else decode_record(value)

    def read(self, key: str) -> SessionRecord | None:
        """One record as stored now, None if absent or unreadable (as load() skips it)."""
        try:
            return self._get(key)
        except (ValueError, KeyError, TypeError):
            return None

    def write(self, record: SessionRecord) -> None:
        key, value = encode_record(record)
        self.db[key] = value.encode()

    def load(self) -> tuple[dict[str, SessionRecord], list[str]]:
        """Every readable record, and the keys of those that could not be read."""
        records, broken = {}, []
        for key, value in self.db.items():
            try:
                record = decode_record(value)
            except (ValueError, KeyError, TypeError):
                broken.append(key.decode(errors="replace"))
                continue
            records[record.key] = record
        return records, broken

    def data_version(self) -> int:
        return self.db.data_version()

    def upsert(self, registration: Registration, now: float) -> SessionRecord:
        with self.db.transaction():
            key = session_key(registration.domain, registration.session_name)
            record = registration.record(now, self._get(key))
            self.write(record)
        return record

    def put(self, record: SessionRecord) -> None:
        with self.db.transaction():
            self.write(record)

    def delete(self, domain: str, name: str) -> bool:
        key = session_key(domain, name)
        with self.db.transaction():
            self.db.sql("DELETE FROM Conversations WHERE session = ?", (key,))
            try:
                del self.db[key]
            except KeyError:
                return False
        return True

    def prune(self, cutoff: float, candidates: Iterable[SessionRecord]) -> list[SessionRecord]:
        """Delete the candidates still idle since before ``cutoff`` on disk too."""
        removed = []
        with self.db.transaction():
            for seen in candidates:
                stored = self._get(seen.key)
                if stored is None:
                    continue
                if max(stored.last_activity, seen.last_activity) < cutoff:
                    del self.db[seen.key]
                    self.db.sql("DELETE FROM Conversations WHERE session = ?", (seen.key,))
                    removed.append(stored)
        return removed

    # --- conversations (store.conversations) ---

    def load_conversations(self) -> tuple[list[tuple[str, str, Conversation]], int]:
        """(session, digest, conversation), least recently used first; and how many
        rows could not be read (they are deleted)."""
        found, broken = [], []
        for session, digest, value in self.db.sql(
                "SELECT session, digest, value FROM Conversations ORDER BY last_used"):
            try:
                found.append((session, digest, decode_conversation(value)))
            except (ValueError, KeyError, TypeError):
                broken.append((session, digest))
        if broken:
            with self.db.transaction():
                for row in broken:
                    self.db.sql("DELETE FROM Conversations WHERE session = ? AND digest = ?", row)
        return found, len(broken)

    def remember(self, session: str, digest: str, conversation: Conversation,
                 drop: list[str]) -> bool:
        """Write one (and delete ``drop``) if its session is still there."""
        with self.db.transaction():
            if session.encode() not in self.db:
                return False
            for old in drop:
                self.db.sql("DELETE FROM Conversations WHERE session = ? AND digest = ?",
                            (session, old))
            self.db.sql("INSERT INTO Conversations (session, digest, value, last_used) "
                        "VALUES (?, ?, ?, ?) ON CONFLICT (session, digest) DO UPDATE SET "
                        "value = excluded.value, last_used = excluded.last_used",
                        (session, digest, encode_conversation(conversation),
                         conversation.last_used_at))
        return True

    def forget(self, session: str, digest: str) -> None:
        with self.db.transaction():
            self.db.sql("DELETE FROM Conversations WHERE session = ? AND digest = ?",
                        (session, digest))

    def prune_conversations(self, cutoff: float) -> int:
        """Those last used before ``cutoff``, and any whose session is gone."""
        with self.db.transaction():
            idle = self.db.sql("DELETE FROM Conversations WHERE last_used < ? RETURNING 1",
                               (cutoff,))
            orphans = self.db.sql("DELETE FROM Conversations WHERE CAST(session AS BLOB) "
                                  "NOT IN (SELECT key FROM Dict) RETURNING 1")
        return len(idle) + len(orphans)

    def save_last_used(self, uses: dict[str, float]) -> None:
        with self.db.transaction():
            for key, when in uses.items():
                stored = self._get(key)
                if stored is not None and (stored.last_used_at or 0) < when:
                    self.write(stored.touched(when))

    def size(self) -> int:
        return sum(
            os.path.getsize(self.path + suffix)
            for suffix in ("", "-wal", "-shm")
            if os.path.exists(self.path + suffix)
        )


@implementer(ISessionStore)
class DBMSessionStore(CachedSessions, Service):
    """Sessions in memory for lookups, written through to a SQLite-dbm file."""

    backend = "sqlite-dbm"
    log = Logger()

    def __init__(self, path: str, reactor, *, poll_interval: float = 0.5,
                 flush_interval: float = 60.0) -> None:
        super().__init__()
        self.path = path
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="session-store")
        self._poll = LoopingCall(self._check_for_changes)
        self._poll.clock = reactor
        self._poll_interval = poll_interval
        self._flush = LoopingCall(self.flush)
        self._flush.clock = reactor
        self._flush_interval = flush_interval
        self._file: SessionFile | None = None
        self._version: int | None = None

    def _opened(self) -> SessionFile:
        if self._file is None:
            raise RuntimeError("the session store is used before startService")
        return self._file

    # --- lifecycle ---

    def startService(self) -> None:
        # Runs once at startup, before anything is served: loading here is not blocking anyone.
        self._file = table = SessionFile(self.path)
        self._cache, broken = table.load()
        conversations, unreadable = table.load_conversations()
        for session, digest, conversation in conversations:
            if session in self._cache:
                self._conversations.load(session, digest, conversation)
        if unreadable:
            self.log.warn("session store: {n} unreadable conversations dropped", n=unreadable)
        self._version = table.data_version()
        settle_for_the_collector()
        for key in broken:
            self.log.warn("session store: unreadable record {key!r} ignored", key=key)
        self.log.info("session store {path}: {count} sessions", path=self.path, count=len(self._cache))
        self._pool.start()
        self._poll.start(self._poll_interval, now=False).addErrback(self._loop_died, "poll")
        self._flush.start(self._flush_interval, now=False).addErrback(self._loop_died, "flush")
        super().startService()

    @inlineCallbacks
    def stopService(self):
        super().stopService()
        for loop in (self._poll, self._flush):
            if loop.running:
                loop.stop()
        yield self.flush()
        self._pool.stop()
        self._opened().close()

    def _loop_died(self, failure, which):
        self.log.failure("session store {which} loop stopped", failure, which=which)

    def _in_thread(self, function, *args) -> Deferred:
        return deferToThreadPool(self._reactor, self._pool, function, *args)

    def health(self) -> dict:
        health = {"backend": self.backend, "status": "ok", "sessions": len(self._cache)}
        if self._write_error is not None:
            health.update(status="degraded", error=self._write_error)
        return health

    # --- writes, in the store's thread ---

    _write_error: str | None = None  # why the last write failed, until one succeeds
    write_failures = 0

    def _write(self, function, *args) -> Deferred:
        """A write in the store's thread; a failing disk is a 503 in the envelope.

        While writes fail, /health says degraded; the first write that succeeds clears it.
        """
        def succeeded(result):
            if self._write_error is not None:
                self.log.info("session store {path}: writes succeed again", path=self.path)
                self._write_error = None
            return result

        def failed(failure):
            failure.trap(sqlite3.Error, OSError)
            full = "full" in str(failure.value).lower() or \
                getattr(failure.value, "sqlite_errorname", "") == "SQLITE_FULL"
            why = f"{'the disk is full' if full else 'a write failed'}: {failure.value}"
            if self._write_error is None:
                self.log.error("session store {path}: {why}", path=self.path, why=why)
            self._write_error = why
            self.write_failures += 1
            raise ApiError(503, "STORAGE_FULL" if full else "STORAGE_UNAVAILABLE",
                           f"the session store cannot write ({why}); nothing was changed",
                           "server_error")

        return self._in_thread(function, *args).addCallbacks(succeeded, failed)

    def register(self, registration: Registration, now: float) -> Deferred:
        def stored(record: SessionRecord) -> SessionRecord:
            self._remember(record)
            return record

        return self._write(self._opened().upsert, registration, now).addCallback(stored)

    def delete(self, domain: str, name: str) -> Deferred:
        def deleted(existed: bool) -> bool:
            key = session_key(domain, name)
            self._cache.pop(key, None)
            self._used.pop(key, None)
            self._conversations.drop_session(key)
            return existed

        return self._write(self._opened().delete, domain, name).addCallback(deleted)

    def flush(self) -> Deferred:
        """Persist the uses noted since the last flush, in one transaction.

        It never fails: uses it could not save go back to be saved at the next flush
        (newer ones noted meanwhile win), so the loop catches up once the disk has room.
        """
        if not self._used or self._file is None:
            return succeed(None)
        uses, self._used = self._used, {}

        def keep_for_later(failure):
            failure.trap(ApiError)
            for key, when in uses.items():
                self._used[key] = max(when, self._used.get(key, 0.0))

        return self._write(self._opened().save_last_used, uses).addErrback(keep_for_later)

    @inlineCallbacks
    def prune(self, cutoff: float):
        # A snapshot of immutable records; the filtering and the disk work run in the
        # thread, in batches, so neither the reactor nor queued registrations wait long.
        candidates = yield self._in_thread(idle_since, list(self._cache.values()), cutoff)
        pruned: Counter = Counter()
        while candidates:
            # Let go of each batch as it is done: 100 000 records freed at once at the
            # end would be one long stall on the reactor.
            batch, candidates[:PRUNE_BATCH] = candidates[:PRUNE_BATCH], []
            removed = yield self._in_thread(self._opened().prune, cutoff, batch)
            for record in removed:
                self._cache.pop(record.key, None)
                self._used.pop(record.key, None)
                self._conversations.drop_session(record.key)
                pruned[record.domain] += 1
            del batch, removed
        self._conversations.prune(cutoff)
        try:
            yield self._write(self._opened().prune_conversations, cutoff)
        except ApiError:
            pass  # logged by _write; the next pass removes them
        return dict(pruned)

    # --- conversations: in memory at once, written in the store's thread ---

    def remember_conversation(self, domain: str, name: str, digest: str,
                              conversation: Conversation, replaces: str | None = None) -> Deferred:
        key = session_key(domain, name)
        if key not in self._cache or self._file is None:
            return succeed(False)
        evicted = self._conversations.put(key, digest, conversation, replaces)
        drop = [d for d in [replaces, *evicted] if d is not None and d != digest]
        return self._write(self._file.remember, key, digest, conversation, drop).addErrback(
            self._conversation_not_saved)

    def forget_conversation(self, domain: str, name: str, digest: str) -> Deferred:
        key = session_key(domain, name)
        if not self._conversations.remove(key, digest) or self._file is None:
            return succeed(None)
        return self._write(self._file.forget, key, digest).addErrback(
            self._conversation_not_saved)

    def _conversation_not_saved(self, failure) -> bool:
        # Kept in memory: this process still continues it; after a restart the worst is
        # a fresh evaluation carrying the history. The write error is on /health already.
        failure.trap(ApiError)
        return False

    def _remember(self, record: SessionRecord) -> None:
        self._cache[record.key] = self.with_pending_use(record)

    # --- a lookup that missed in memory (CachedSessions.lookup) ---

    def _read_stored(self, key: str) -> Deferred:
        # In the store's thread like every other read, so queued after writes this process
        # made, and its answer comes back before any later poll's (callbacks keep order).
        def failed(failure):
            failure.trap(sqlite3.Error, OSError)
            raise ApiError(503, "STORAGE_UNAVAILABLE",
                           f"the session store cannot be read: {failure.value}", "server_error")

        if self._file is None:
            return fail(ApiError(503, "STORAGE_UNAVAILABLE", "the session store is not open",
                                 "server_error"))
        return self._in_thread(self._file.read, key).addErrback(failed)

    # --- changes made by other processes (the CLI, another daemon) ---

    def _check_for_changes(self) -> Deferred | None:
        def read():
            version = self._opened().data_version()
            if version == self._version:
                return None
            # Built here, off the reactor; unchanged sessions keep the objects already in
            # memory, so swapping the dicts frees only what really changed.
            current = self._cache
            records = {}
            for key, record in self._opened().load()[0].items():
                known = current.get(key)
                records[key] = known if known == record else record
            return version, records

        def apply(result):
            if result is None:
                return
            self._version, records = result
            for key in list(self._used):
                if key in records:
                    records[key] = self.with_pending_use(records[key])
            self._cache = records
            self._conversations.keep_sessions(records)  # sessions deleted by the CLI
            gc.freeze()  # as at startup, without a collection on the reactor

        return self._in_thread(read).addCallback(apply).addErrback(
            lambda f: self.log.failure("session store: reload failed", f)
        )
