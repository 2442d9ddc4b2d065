"""Which LMArena evaluation continues which conversation: digests and ids, never text.

A tab-mode answer that completes is remembered as ``digest -> Conversation`` under its
session: the digest is :func:`arena.history_digest` of the conversation as the client
will send it back (docs/tab-mode.rst, "Conversations that continue"). Every store keeps
them in memory for lookups that never wait (:class:`ConversationCache`) and writes them
beside the session, so they survive a restart and go when the session goes.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Iterable

from attrs import evolve, frozen

# A client could otherwise grow a session's share of the store without limit, one
# edited history at a time; the least recently used go first.
MAX_PER_SESSION = 200


@frozen
class Conversation:
    """One evaluation this gateway created and answered, and the tab that holds it."""

    evaluation_id: str
    tab_id: str
    model_id: str
    created_at: float
    last_used_at: float

    def used(self, now: float) -> Conversation:
        return evolve(self, last_used_at=now)


def encode_conversation(conversation: Conversation) -> str:
    return json.dumps({"evaluation_id": conversation.evaluation_id,
                       "tab_id": conversation.tab_id, "model_id": conversation.model_id,
                       "created_at": conversation.created_at,
                       "last_used_at": conversation.last_used_at}, separators=(",", ":"))


def decode_conversation(value: str | bytes) -> Conversation:
    """ValueError (or KeyError, TypeError) for anything that is not one."""
    data = json.loads(value)
    fields = {name: data[name] for name in ("evaluation_id", "tab_id", "model_id")}
    if not all(isinstance(v, str) for v in fields.values()):
        raise ValueError("conversation ids must be strings")
    return Conversation(**fields, created_at=float(data["created_at"]),
                        last_used_at=float(data["last_used_at"]))


class ConversationCache:
    """Per session key, digest -> Conversation, least recently used first."""

    def __init__(self, limit: int = MAX_PER_SESSION) -> None:
        self.limit = limit
        self._sessions: dict[str, OrderedDict[str, Conversation]] = {}

    def get(self, session: str, digest: str) -> Conversation | None:
        held = self._sessions.get(session)
        return held.get(digest) if held is not None else None

    def put(self, session: str, digest: str, conversation: Conversation,
            replaces: str | None = None) -> list[str]:
        """Remember one; the digests that went to make room (the store deletes them too)."""
        held = self._sessions.setdefault(session, OrderedDict())
        if replaces is not None:
            held.pop(replaces, None)
        held[digest] = conversation
        held.move_to_end(digest)
        evicted = []
        while len(held) > self.limit:
            evicted.append(held.popitem(last=False)[0])
        return evicted

    def load(self, session: str, digest: str, conversation: Conversation) -> None:
        """One read from storage; the caller sorts them by last use first."""
        self._sessions.setdefault(session, OrderedDict())[digest] = conversation

    def remove(self, session: str, digest: str) -> bool:
        held = self._sessions.get(session)
        if held is None or held.pop(digest, None) is None:
            return False
        if not held:
            del self._sessions[session]
        return True

    def drop_session(self, session: str) -> None:
        self._sessions.pop(session, None)

    def keep_sessions(self, sessions: Iterable[str]) -> None:
        """Forget the conversations of every session not listed (deleted elsewhere)."""
        keep = set(sessions)
        for session in [s for s in self._sessions if s not in keep]:
            del self._sessions[session]

    def idle(self, cutoff: float) -> list[tuple[str, str]]:
        """(session, digest) of every conversation last used before ``cutoff``."""
        return [(session, digest) for session, held in self._sessions.items()
                for digest, c in held.items() if c.last_used_at < cutoff]

    def prune(self, cutoff: float) -> int:
        gone = self.idle(cutoff)
        for session, digest in gone:
            self.remove(session, digest)
        return len(gone)

    def count(self, session: str | None = None) -> int:
        if session is not None:
            return len(self._sessions.get(session, {}))
        return sum(map(len, self._sessions.values()))
