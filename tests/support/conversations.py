"""One scenario for every store's conversation map, run against each real backend.

``reopen()`` stops the store it was given (if any) and starts a new one on the same
data, as a daemon restart does; ``raw()`` counts the conversations in storage itself.
"""

from __future__ import annotations

import time

from twisted.internet.task import deferLater

from lmarena_gateway.sessions import validate_registration
from lmarena_gateway.store.conversations import MAX_PER_SESSION, Conversation

from support.client import SESSION

DOMAIN = "lmarena.ai"


async def until(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    """Poll on the reactor every millisecond, with a deadline."""
    from twisted.internet import reactor

    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, 0.001, lambda: None)


def registration(name: str):
    return validate_registration(dict(SESSION, session_name=name, domain=DOMAIN), (DOMAIN,))


def conversation(eid: str, used: float, tab: str = "tab-1") -> Conversation:
    return Conversation(eid, tab, "model-1", created_at=used, last_used_at=used)


async def the_map_survives_a_restart_and_goes_with_its_session(reopen, raw) -> None:
    store = await reopen(None)
    for name in ("a", "b", "old"):
        await store.register(registration(name), 1000.0 if name == "old" else 10_000.0)
    assert await store.remember_conversation(DOMAIN, "a", "d1", conversation("e1", 5000.0))
    assert await store.remember_conversation(DOMAIN, "a", "d2", conversation("e2", 5000.0))
    assert await store.remember_conversation(DOMAIN, "a", "idle", conversation("e3", 100.0))
    assert await store.remember_conversation(DOMAIN, "b", "d1", conversation("e4", 5000.0))
    assert await store.remember_conversation(DOMAIN, "old", "d1", conversation("e5", 5000.0))
    # no session, no map: a conversation never outlives (or precedes) its session
    assert not await store.remember_conversation(DOMAIN, "nobody", "d1", conversation("x", 1.0))
    assert raw() == 5

    store = await reopen(store)
    assert store.conversation(DOMAIN, "a", "d1") == conversation("e1", 5000.0)
    assert store.conversation(DOMAIN, "b", "d1").evaluation_id == "e4"
    assert store.conversation("canary.lmarena.ai", "a", "d1") is None

    # a continuation replaces the history it grew from; a forgotten one is gone
    assert await store.remember_conversation(DOMAIN, "a", "d3", conversation("e2", 6000.0),
                                             replaces="d2")
    await store.forget_conversation(DOMAIN, "a", "d1")
    # deleting a session takes its conversations, and a new one of that name starts empty
    assert await store.delete(DOMAIN, "b")
    assert store.conversation(DOMAIN, "b", "d1") is None
    # pruning: the idle session with its map, and conversations idle in a live session
    pruned = await store.prune(3000.0)
    assert pruned == {DOMAIN: 1}
    assert store.conversation(DOMAIN, "old", "d1") is None
    assert store.conversation(DOMAIN, "a", "idle") is None
    assert raw() == 1

    store = await reopen(store)
    await store.register(registration("b"), 10_000.0)
    assert [store.conversation(DOMAIN, "a", d) for d in ("d1", "d2", "idle")] == [None] * 3
    assert store.conversation(DOMAIN, "a", "d3") == conversation("e2", 6000.0)
    assert store.conversation(DOMAIN, "b", "d1") is None
    await reopen(store, stop_only=True)


async def the_map_is_bounded_per_session(reopen, raw) -> None:
    store = await reopen(None)
    await store.register(registration("a"), 10_000.0)
    extra = 5
    for i in range(MAX_PER_SESSION + extra):
        await store.remember_conversation(DOMAIN, "a", f"d{i}", conversation(f"e{i}", 5000.0 + i))
    assert raw() == MAX_PER_SESSION
    store = await reopen(store)
    assert [store.conversation(DOMAIN, "a", f"d{i}") for i in range(extra)] == [None] * extra
    assert store.conversation(DOMAIN, "a", f"d{extra}").evaluation_id == f"e{extra}"
    last = MAX_PER_SESSION + extra - 1
    assert store.conversation(DOMAIN, "a", f"d{last}").evaluation_id == f"e{last}"
    await reopen(store, stop_only=True)
