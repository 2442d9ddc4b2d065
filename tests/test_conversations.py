"""Conversations that continue, in memory: the digest rule, the map, and the upstream's
choice between post-to-evaluation and a fresh evaluation (with its one fallback).

The tabs here are the registry's own objects driven by hand (poll, push) and the arena
is a few lines of Python below; tests/test_conversations_browser.py does the same in
real Chromium against ``lmgateway fake-arena``.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from lmarena_gateway import arena
from lmarena_gateway.arena import ArenaModel, Turn
from lmarena_gateway.config import GatewayConfig
from lmarena_gateway.errors import ApiError
from lmarena_gateway.metrics import Metrics
from lmarena_gateway.sessions import validate_registration
from lmarena_gateway.store.conversations import (
    Conversation,
    ConversationCache,
    decode_conversation,
    encode_conversation,
)
from lmarena_gateway.tabs import TabRegistry
from lmarena_gateway.tabupstream import TabUpstream

from support.memory import MemoryStore

MODELS = [ArenaModel("m-chat", "fake-chat", ("text",)), ArenaModel("m-other", "other", ("text",)),
          ArenaModel("m-search", "search", ("search",))]
DOMAIN, NAME = "arena.ai", "alpha"


# --- the digest rule ---


def digest(*pairs):
    return arena.history_digest([Turn(role, text) for role, text in pairs])


BASE = (("system", "Be brief."), ("user", "What is 2+2?"), ("assistant", "4"))


def test_the_same_history_gives_the_same_digest():
    assert digest(*BASE) == digest(*BASE)
    assert len(digest(*BASE)) == 64 and all(c in "0123456789abcdef" for c in digest(*BASE))


@pytest.mark.parametrize("changed", [
    (("developer", "Be brief."), BASE[1], BASE[2]),  # a role
    (BASE[0], ("user", "What is 2+3?"), BASE[2]),  # content
    (BASE[0], BASE[1], ("assistant", "4 ")),  # content, by one space
    (BASE[1], BASE[0], BASE[2]),  # order
    (BASE[0], BASE[1]),  # a turn left out
    (*BASE, ("user", "")),  # a turn added, even an empty one
    (BASE[0], ("user", "What is 2+2?\nassistant: 4")),  # two turns run into one
], ids=["role", "content", "whitespace", "order", "fewer", "more", "merged"])
def test_any_change_of_role_content_or_order_gives_a_new_digest(changed):
    assert digest(*changed) != digest(*BASE)


def test_the_digest_is_of_what_the_client_sends_back_text_only():
    # Clients send back the assistant's content; fields beside it (reasoning_content,
    # name, refusal) are not part of the digest, and text parts read as their text.
    plain = arena.turns_of([{"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "hello"}])
    decorated = arena.turns_of([
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "hello", "reasoning_content": "thinking...",
         "name": "bot"}])
    assert arena.history_digest(plain) == arena.history_digest(decorated)


# --- the map in memory ---


def conversation(eid="e1", tab="t1", used=100.0):
    return Conversation(eid, tab, "m-chat", created_at=50.0, last_used_at=used)


def test_the_map_keeps_ids_only_and_reads_back_what_it_wrote():
    stored = encode_conversation(conversation())
    assert set(json.loads(stored)) == {"evaluation_id", "tab_id", "model_id", "created_at",
                                       "last_used_at"}
    assert decode_conversation(stored) == conversation()
    for bad in ('{"evaluation_id": 1}', "[]", "not json"):
        with pytest.raises((ValueError, KeyError, TypeError)):
            decode_conversation(bad)


def test_the_map_is_bounded_per_session_least_recently_used_first():
    cache = ConversationCache(limit=3)
    for i in range(3):
        assert cache.put("s", f"d{i}", conversation(f"e{i}", used=i)) == []
    cache.put("s", "d0", conversation("e0", used=10))  # used again: now the newest
    assert cache.put("s", "d3", conversation("e3", used=11)) == ["d1"]
    assert cache.get("s", "d1") is None and cache.get("s", "d0").evaluation_id == "e0"
    assert cache.put("other", "d9", conversation()) == []  # another session's own room
    assert cache.count("s") == 3 and cache.count() == 4


def test_a_continued_conversation_replaces_the_history_it_grew_from():
    cache = ConversationCache()
    cache.put("s", "d1", conversation())
    cache.put("s", "d2", conversation(used=200.0), replaces="d1")
    assert cache.get("s", "d1") is None and cache.get("s", "d2") is not None


def test_idle_conversations_and_those_of_gone_sessions_are_pruned():
    cache = ConversationCache()
    cache.put("s", "old", conversation(used=10.0))
    cache.put("s", "new", conversation(used=500.0))
    cache.put("gone", "d", conversation(used=500.0))
    assert cache.prune(100.0) == 1
    cache.keep_sessions(["s"])
    assert (cache.get("s", "old"), cache.get("gone", "d")) == (None, None)
    assert cache.get("s", "new") is not None


def test_the_memory_store_keeps_conversations_with_their_session():
    store = MemoryStore()
    assert not _fired(store.remember_conversation(DOMAIN, NAME, "d", conversation()))
    register(store, NAME)
    assert _fired(store.remember_conversation(DOMAIN, NAME, "d", conversation()))
    assert store.conversation(DOMAIN, NAME, "d") == conversation()
    assert store.conversation("lmarena.ai", NAME, "d") is None  # domains apart
    _fired(store.delete(DOMAIN, NAME))
    register(store, NAME)
    assert store.conversation(DOMAIN, NAME, "d") is None  # a new session, a new map


# --- the upstream: continue, start afresh, fall back once, keep to the tab ---


def _fired(d):
    box = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


def register(store, name):
    _fired(store.register(validate_registration(
        {"domain": DOMAIN, "session_name": name}, (DOMAIN,), ids_optional=True), 1000.0))


class MiniArena:
    """Enough of LMArena for the upstream: evaluations owned by accounts, and refusals."""

    def __init__(self) -> None:
        self.evaluations: dict[str, dict] = {}
        self.calls: list[dict] = []
        self.refuse: list[tuple[int, str]] = []

    def answer(self, account: str, payload: dict) -> dict:
        body = json.loads(payload["body"])
        followup = "post-to-evaluation" in payload["url"]
        call = {"account": account, "followup": followup, "id": body["id"],
                "content": body["userMessage"]["content"], "model": body["modelAId"],
                "url": payload["url"]}
        self.calls.append(call)
        if self.refuse:
            status, text = self.refuse.pop(0)
            return {"status": status, "text": text, "done": True}
        if followup:
            owned = self.evaluations.get(body["id"])
            if owned is None or owned["account"] != account:
                return {"status": 401, "done": True, "text": json.dumps(
                    {"error": f"User {account} does not have access to evaluation session "
                              f"{body['id']}"})}
        evaluation = self.evaluations.setdefault(body["id"], {"account": account, "turns": 0})
        evaluation["turns"] += 1
        text = f"[{account}] turn {evaluation['turns']} of {body['id']}"
        lines = f"a0:{json.dumps(text)}\n"
        if body["modelAId"] == "m-search":  # its citations end the answer the client gets
            lines += "ac:" + json.dumps({"toolCallId": "s1", "argsTextDelta": json.dumps(
                {"sources": [{"url": "https://example.org/a", "title": "A"}]})}) + "\n"
        return {"status": 200, "done": True,
                "text": lines + f"ad:{json.dumps({'finishReason': 'stop'})}\n"}


class Harness:
    def __init__(self) -> None:
        self.clock = Clock()
        self.registry = TabRegistry(self.clock, queue_limit=4, poll_timeout=25)
        self.store = MemoryStore()
        register(self.store, NAME)
        self.metrics = Metrics()
        self.upstream = TabUpstream(self.registry, GatewayConfig(), self.clock, self.metrics,
                                    store=self.store)
        self.arena = MiniArena()
        self.accounts: dict[str, str] = {}
        self.polls: dict[str, object] = {}

    def connect(self, tab_id: str, account: str):
        self.accounts[tab_id] = account
        tab = self.registry.connect(DOMAIN, NAME, tab_id, MODELS)
        self.poll(tab_id)
        return tab

    def poll(self, tab_id: str):
        tab = self.registry.tab(DOMAIN, NAME, tab_id)
        self.polls[tab_id] = self.registry.poll(tab, 25)

    def run(self, tab_id: str):
        """The tab runs the job its poll got, then polls again; the arena's call."""
        job = _fired(self.polls.pop(tab_id))
        assert job is not None, f"{tab_id} got no job"
        tab = self.registry.tab(DOMAIN, NAME, tab_id)
        message = self.arena.answer(self.accounts[tab_id], job.payload)
        self.registry.push(tab, job.job_id, message)
        self.poll(tab_id)
        return self.arena.calls[-1]

    def send(self, messages, model="fake-chat"):
        """(request, finished) of a non-streamed chat request, not yet run by a tab."""
        request = DummyRequest([b"v1", b"chat", b"completions"])
        route = type("Route", (), {"tabs": self.registry.session(DOMAIN, NAME), "record": None})
        finished = self.upstream.chat(request, route, {"model": model, "messages": messages})
        return request, finished

    def ask(self, messages, tab_id="t1", model="fake-chat"):
        """The answer's content, with the arena call it made."""
        request, finished = self.send(messages, model)
        call = self.run(tab_id)
        result = _fired(finished)
        if result is not None:  # an error body
            return json.loads(result), call
        return json.loads(b"".join(request.written))["choices"][0]["message"]["content"], call

    def count(self, name: str, label: str) -> float:
        return self.metrics.registry.get_sample_value(f"{name}_total", label) or 0.0


@pytest.fixture
def h():
    harness = Harness()
    harness.connect("t1", "alice")
    return harness


def test_a_follow_up_continues_the_evaluation_with_only_the_new_message(h):
    first, call1 = h.ask([{"role": "user", "content": "Hi"}])
    assert not call1["followup"] and call1["content"] == "Hi"
    second, call2 = h.ask([{"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": first},
                           {"role": "user", "content": "And then?"}])
    assert call2["followup"] and call2["id"] == call1["id"]
    assert call2["url"] == arena.FOLLOW_UP_PATH.format(id=call1["id"])
    assert call2["content"] == "And then?"  # the arena holds the rest
    assert second == f"[alice] turn 2 of {call1['id']}"
    third, call3 = h.ask([{"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": first},
                          {"role": "user", "content": "And then?"},
                          {"role": "assistant", "content": second},
                          {"role": "user", "content": "Last"}])
    assert (call3["followup"], call3["id"], call3["content"]) == (True, call1["id"], "Last")
    assert h.count("lmgateway_conversations", {"start": "continued"}) == 2
    assert h.count("lmgateway_conversations", {"start": "fresh"}) == 1


def test_a_system_prompt_is_part_of_the_conversation(h):
    first, call1 = h.ask([{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hi"}])
    assert call1["content"].startswith(arena.TRANSCRIPT_HEADER)
    _, call2 = h.ask([{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": first},
                      {"role": "user", "content": "More"}])
    assert (call2["followup"], call2["id"], call2["content"]) == (True, call1["id"], "More")


def test_only_a_history_the_gateway_answered_continues(h):
    first, call1 = h.ask([{"role": "user", "content": "Hi"}])
    edits = {
        "an edited earlier turn": [{"role": "user", "content": "Hi!"},
                                   {"role": "assistant", "content": first}],
        "an edited answer": [{"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": first + " (edited)"}],
        "a history it never saw": [{"role": "user", "content": "Hello"},
                                   {"role": "assistant", "content": "Hi there"}],
    }
    for why, history in edits.items():
        answer, call = h.ask([*history, {"role": "user", "content": "Next"}])
        assert not call["followup"] and call["id"] != call1["id"], why
        assert call["content"].startswith(arena.TRANSCRIPT_HEADER), why
        assert call["content"].endswith("User: Next"), why
    # the original still continues: the edits started conversations of their own
    _, call = h.ask([{"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": first},
                     {"role": "user", "content": "Next"}])
    assert call["followup"] and call["id"] == call1["id"]


def test_a_history_continued_once_does_not_continue_twice(h):
    # A client that goes back and asks again from an earlier point branches: the
    # evaluation has moved on, so the branch starts afresh.
    first, call1 = h.ask([{"role": "user", "content": "Hi"}])
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first}]
    _, call2 = h.ask([*history, {"role": "user", "content": "A"}])
    _, call3 = h.ask([*history, {"role": "user", "content": "B"}])
    assert call2["followup"] and not call3["followup"]


def test_an_answer_with_its_sources_continues_as_the_client_got_it(h):
    first, call1 = h.ask([{"role": "user", "content": "Hi"}], model="search")
    assert "https://example.org/a" in first  # the sources are part of the content
    _, call = h.ask([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "Next"}], model="search")
    assert call["followup"] and call["id"] == call1["id"]


def test_another_model_starts_afresh(h):
    first, call1 = h.ask([{"role": "user", "content": "Hi"}])
    _, call = h.ask([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "Next"}], model="other")
    assert not call["followup"] and call["model"] == "m-other"


@pytest.mark.parametrize("refusal, reason", [
    ("account", "not_owner"),
    ((400, '{"error":"Message already has feedback, cannot retry"}'), "has_feedback"),
])
def test_a_refused_continuation_falls_back_once_to_a_fresh_evaluation(h, refusal, reason):
    first, call1 = h.ask([{"role": "user", "content": "Hi"}])
    if refusal == "account":
        h.accounts["t1"] = "carol"  # another account signed in to the same tab
    else:
        h.arena.refuse.append(refusal)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first},
                {"role": "user", "content": "Next"}]
    request, finished = h.send(messages)
    refused = h.run("t1")
    assert refused["followup"] and refused["id"] == call1["id"]
    fresh = h.run("t1")
    assert not fresh["followup"] and fresh["id"] != call1["id"]
    assert fresh["content"] == arena.pack(arena.turns_of(messages))  # the packed history
    assert _fired(finished) is None and request.responseCode == 200
    content = json.loads(b"".join(request.written))["choices"][0]["message"]["content"]
    account = "carol" if refusal == "account" else "alice"
    assert content == f"[{account}] turn 1 of {fresh['id']}"  # nothing said of the fallback
    assert h.count("lmgateway_conversation_fallbacks", {"reason": reason}) == 1
    assert h.count("lmgateway_upstream_errors", {"code": "ARENA_NOT_SIGNED_IN"}) == 0
    # and the conversation goes on in the new evaluation
    _, after = h.ask([*messages, {"role": "assistant", "content": content},
                      {"role": "user", "content": "Again"}])
    assert after["followup"] and after["id"] == fresh["id"] and after["content"] == "Again"


def test_the_fallback_happens_once_then_the_refusal_is_the_answer(h):
    first, _ = h.ask([{"role": "user", "content": "Hi"}])
    h.arena.refuse += [(401, '{"error":"Unauthorized"}')] * 2
    request, finished = h.send([{"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": first},
                                {"role": "user", "content": "Next"}])
    h.run("t1")
    h.run("t1")
    error = json.loads(_fired(finished))["error"]
    assert request.responseCode == 401 and error["code"] == "ARENA_NOT_SIGNED_IN"
    assert len(h.arena.calls) == 3  # the first question, the continuation, one fresh try
    assert h.count("lmgateway_conversation_fallbacks", {"reason": "not_owner"}) == 1


def test_a_fresh_request_refused_with_401_is_not_signed_in(h):
    h.arena.refuse.append((401, '{"error":"Unauthorized"}'))
    error, _ = h.ask([{"role": "user", "content": "Hi"}])
    assert error["error"]["code"] == "ARENA_NOT_SIGNED_IN" and len(h.arena.calls) == 1


def test_a_continuation_that_failed_midway_starts_afresh_next_time(h):
    first, call1 = h.ask([{"role": "user", "content": "Hi"}])
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first}]
    request, finished = h.send([*history, {"role": "user", "content": "Next"}])
    job = _fired(h.polls.pop("t1"))
    tab = h.registry.tab(DOMAIN, NAME, "t1")
    h.registry.push(tab, job.job_id, {"status": 200, "text": 'a0:"par'})
    h.registry.disconnect(tab, "closed")  # the arena holds part of the turn now
    assert json.loads(_fired(finished))["error"]["code"] == "TAB_LOST"
    h.connect("t1", "alice")
    _, call = h.ask([*history, {"role": "user", "content": "Next"}])
    assert not call["followup"]


def test_a_continuation_the_arena_refused_outright_may_be_asked_again(h):
    first, call1 = h.ask([{"role": "user", "content": "Hi"}])
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first}]
    h.arena.refuse.append((429, '{"error":"Too many requests"}'))
    error, _ = h.ask([*history, {"role": "user", "content": "Next"}])
    assert error["error"]["code"] == "ARENA_RATE_LIMITED"
    _, call = h.ask([*history, {"role": "user", "content": "Next"}])
    assert call["followup"] and call["id"] == call1["id"]  # the arena took nothing before


def test_a_continuation_cancelled_while_it_waited_may_be_asked_again(h):
    first, call1 = h.ask([{"role": "user", "content": "Hi"}])
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first}]
    h.send([{"role": "user", "content": "busy"}])  # t1 runs this one
    _, waiting = h.send([*history, {"role": "user", "content": "Next"}])
    waiting.cancel()  # the client went away before a tab took it
    waiting.addErrback(lambda failure: None)
    h.run("t1")
    _, call = h.ask([*history, {"role": "user", "content": "Next"}])
    assert call["followup"] and call["id"] == call1["id"]


def test_a_conversation_keeps_to_its_tab_and_waits_for_it(h):
    h.connect("t2", "bob")
    first, call1 = h.ask([{"role": "user", "content": "Hi"}], tab_id="t1")
    assert call1["account"] == "alice"
    # t1 is busy with another request; t2 is idle and polling
    busy_request, busy = h.send([{"role": "user", "content": "something else"}])
    assert h.polls["t1"].called and not h.polls["t2"].called
    request, finished = h.send([{"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": first},
                                {"role": "user", "content": "Next"}])
    assert not h.polls["t2"].called  # not handed to the other account's tab
    assert len(h.registry.session(DOMAIN, NAME).queue) == 1
    h.run("t1")
    _fired(busy)
    call = h.run("t1")  # t1's next poll takes it
    assert call["followup"] and call["id"] == call1["id"] and call["account"] == "alice"
    assert _fired(finished) is None


def test_a_conversation_whose_tab_is_gone_starts_afresh_on_another(h):
    h.connect("t2", "bob")
    first, call1 = h.ask([{"role": "user", "content": "Hi"}], tab_id="t1")
    h.registry.disconnect(h.registry.tab(DOMAIN, NAME, "t1"), "closed")
    answer, call = h.ask([{"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": first},
                          {"role": "user", "content": "Next"}], tab_id="t2")
    assert not call["followup"] and call["account"] == "bob"
    assert call["content"].startswith(arena.TRANSCRIPT_HEADER)


def test_the_map_holds_digests_and_ids_never_text(h):
    first, call1 = h.ask([{"role": "user", "content": "a secret question"}])
    held = h.store._conversations._sessions[f"{DOMAIN}/{NAME}"]
    (key, value), = held.items()
    assert key == arena.history_digest([Turn("user", "a secret question"),
                                        Turn("assistant", first)])
    assert "secret" not in encode_conversation(value)
    assert value.evaluation_id == call1["id"] and value.tab_id == "t1"


def test_without_a_store_every_request_is_fresh():
    harness = Harness()
    harness.upstream.store = None
    harness.connect("t1", "alice")
    first, call1 = harness.ask([{"role": "user", "content": "Hi"}])
    _, call = harness.ask([{"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": first},
                           {"role": "user", "content": "Next"}])
    assert not call["followup"]


def test_a_too_long_new_message_is_refused_before_anything_runs(h):
    first, _ = h.ask([{"role": "user", "content": "Hi"}])
    with pytest.raises(ApiError) as caught:
        h.send([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first},
                {"role": "user", "content": "x" * (arena.MAX_PROMPT + 1)}])
    assert caught.value.code == "PROMPT_TOO_LONG"
