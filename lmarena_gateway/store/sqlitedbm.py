"""A dbm-interface database in one SQLite file, crash-safe and shared between processes.

Python's ``dbm.dumb`` (the only dbm these Pythons have) rewrites its index in place and
takes no lock. This module keeps the ``dbm`` interface over SQLite in WAL mode with
``synchronous=FULL``: every write is committed to disk before it returns, a kill at any
moment leaves a file that opens, and several processes may share it. The table layout
is that of Python 3.13's ``dbm.sqlite3``, so ``dbm.open()`` there reads our files too.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import contextmanager
from typing import Iterator

BUSY_TIMEOUT_MS = 10_000


class error(OSError):
    """Raised, as by the other dbm modules, for a file that is not a database."""


def _bytes(value) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class _Database:
    def __init__(self, path: str, flag: str, mode: int) -> None:
        if flag not in ("r", "w", "c", "n"):
            raise ValueError(f"flag must be one of 'r', 'w', 'c', 'n', not {flag!r}")
        if flag in ("r", "w") and not os.path.exists(path):
            raise error(f"no database at {path!r}")
        if not os.path.exists(path) and flag in ("c", "n"):
            # Create the file with the requested mode before SQLite opens it.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, mode))
        uri = f"file:{os.path.abspath(path)}?mode={'ro' if flag == 'r' else 'rw'}"
        try:
            self._cx = sqlite3.connect(uri, uri=True, isolation_level=None,
                                       check_same_thread=False)
            self._cx.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if flag != "r":
                self._cx.execute("PRAGMA journal_mode = WAL")
                self._cx.execute("PRAGMA synchronous = FULL")
                self._cx.execute(
                    "CREATE TABLE IF NOT EXISTS Dict (key BLOB UNIQUE NOT NULL, value BLOB NOT NULL)"
                )
                if flag == "n":
                    self._cx.execute("DELETE FROM Dict")
            self._cx.execute("SELECT count(*) FROM Dict").fetchone()
        except sqlite3.DatabaseError as e:
            raise error(f"{path!r} is not a usable session database: {e}") from None
        self._readonly = flag == "r"

    def __getitem__(self, key) -> bytes:
        row = self._cx.execute("SELECT value FROM Dict WHERE key = ?", (_bytes(key),)).fetchone()
        if row is None:
            raise KeyError(key)
        return row[0]

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def __setitem__(self, key, value) -> None:
        self._cx.execute(
            "INSERT INTO Dict (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (_bytes(key), _bytes(value)),
        )

    def __delitem__(self, key) -> None:
        if not self._cx.execute("DELETE FROM Dict WHERE key = ?", (_bytes(key),)).rowcount:
            raise KeyError(key)

    def __contains__(self, key) -> bool:
        return self._cx.execute("SELECT 1 FROM Dict WHERE key = ?", (_bytes(key),)).fetchone() is not None

    def sql(self, statement: str, parameters=()) -> list[tuple]:
        """One statement of the caller's own, on this connection (tables beside Dict)."""
        return self._cx.execute(statement, parameters).fetchall()

    def keys(self) -> list[bytes]:
        return [row[0] for row in self._cx.execute("SELECT key FROM Dict")]

    def items(self) -> list[tuple[bytes, bytes]]:
        return self._cx.execute("SELECT key, value FROM Dict").fetchall()

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.keys())

    def __len__(self) -> int:
        return self._cx.execute("SELECT count(*) FROM Dict").fetchone()[0]

    @contextmanager
    def transaction(self):
        """Several reads and writes as one atomic, durable step, locked against other writers."""
        self._cx.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            # SQLite rolls back by itself on some errors (SQLITE_FULL among them): a
            # second ROLLBACK would fail and hide the error that matters.
            if self._cx.in_transaction:
                self._cx.execute("ROLLBACK")
            raise
        try:
            self._cx.execute("COMMIT")
        except BaseException:
            if self._cx.in_transaction:
                self._cx.execute("ROLLBACK")
            raise

    def problems(self) -> list[str]:
        """What SQLite's quick check finds wrong with the file; empty when it is sound."""
        try:
            rows = self._cx.execute("PRAGMA quick_check").fetchall()
        except sqlite3.DatabaseError as e:
            return [str(e)]
        found = [line for row in rows if row[0] != "ok" for line in str(row[0]).splitlines()]
        if not found:
            try:  # every value must be readable too, not only the b-tree sound
                self._cx.execute("SELECT sum(length(value)) FROM Dict").fetchone()
            except sqlite3.DatabaseError as e:
                found.append(str(e))
        return found

    def data_version(self) -> int:
        """Changes whenever another connection (another process) commits a change."""
        return self._cx.execute("PRAGMA data_version").fetchone()[0]

    def close(self) -> None:
        self._cx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open(path: str, flag: str = "c", mode: int = 0o666) -> _Database:  # noqa: A001 - dbm's name
    return _Database(os.fspath(path), flag, mode)
