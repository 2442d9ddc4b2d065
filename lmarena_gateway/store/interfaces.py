"""The seams every storage backend fills: the store the daemon runs, the table the CLI uses."""

from __future__ import annotations

from typing import Iterable

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from ..sessions import Registration, SessionRecord
from .conversations import Conversation


class ISessionStore(IService):
    """What the gateway needs from a session store, whatever holds the data.

    It is a service: make_service starts it before the listeners and stops it after.
    """

    backend = Attribute("A short name for the backend, shown by stats and /health.")

    def get(domain: str, name: str) -> SessionRecord | None:
        """The session, from memory: never waits on disk or network."""

    def lookup(domain: str, name: str) -> Deferred:
        """The session from memory, else read from storage (another process may have
        registered it a moment ago): fires with it or None; fails with a 503 ApiError
        (STORAGE_UNAVAILABLE) when storage cannot be read. Never blocks the reactor."""

    def records(domain: str | None = None) -> list[SessionRecord]:
        """All sessions (of one domain), from memory."""

    def register(registration: Registration, now: float) -> Deferred:
        """Upsert; fires with the stored SessionRecord once it is durable."""

    def delete(domain: str, name: str) -> Deferred:
        """Fires with True once removed, False if there was no such session."""

    def touch(domain: str, name: str, now: float) -> None:
        """Note a use in memory; persisted later in batches."""

    def prune(cutoff: float) -> Deferred:
        """Remove sessions idle since before ``cutoff``; fires with {domain: count}."""

    def health() -> dict:
        """{"backend": ..., "status": "ok" | "degraded", ...} for /health."""

    def conversation(domain: str, name: str, digest: str) -> Conversation | None:
        """The evaluation a tab-mode history of the session continues, from memory."""

    def remember_conversation(domain: str, name: str, digest: str, conversation: Conversation,
                              replaces: str | None = None) -> Deferred:
        """Note an answered conversation (and drop ``replaces``, the history it grew from).

        In memory at once; fires with True once written beside the session, False when
        there is no such session or the write failed (it is not a client's write: the
        worst loss is a fresh evaluation). At most MAX_PER_SESSION per session, least
        recently used evicted; deleting or pruning the session removes them, and prune
        also removes those last used before its cutoff."""

    def forget_conversation(domain: str, name: str, digest: str) -> Deferred:
        """Drop one (its evaluation moved on without us); fires once done, never fails."""


class ISecretSource(Interface):
    """Where the registration tokens' secret and per-name generations are kept."""

    def read() -> tuple[bytes, dict[str, int]] | None:
        """(secret, generations) now if they can be read without waiting, else None."""

    def refresh() -> Deferred:
        """Fires with (secret, generations), or None when nothing changed."""

    def revoke(name: str) -> Deferred:
        """Fires with the name's new generation once it is stored."""


class ISessionTable(Interface):
    """The blocking face of a store, for the CLI: each call waits for its answer."""

    backend = Attribute("A short name for the backend, as ISessionStore.backend.")
    path = Attribute("Where the data is, for messages: a file, or a Redis address.")

    def load() -> tuple[dict[str, SessionRecord], list[str]]:
        """Every readable record by key, and the keys of those that could not be read."""

    def put(record: SessionRecord) -> None:
        """Store the record exactly as given (import)."""

    def delete(domain: str, name: str) -> bool:
        """True once removed, False if there was no such session."""

    def prune(cutoff: float, candidates: Iterable[SessionRecord]) -> list[SessionRecord]:
        """Remove those candidates still idle since before ``cutoff``; the removed ones."""

    def size() -> int:
        """Bytes the data takes."""

    def close() -> None:
        """Release the file or connection."""
