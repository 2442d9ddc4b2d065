"""Conversations that continue, end to end: the openai SDK -> the gateway daemon -> the
userscript in real headless Chromium -> ``lmgateway fake-arena``, whose log shows which
evaluation each call continued (see tests/support/tabbrowser.py for the stand-ins).
"""

from __future__ import annotations

import http.client as httpclient
import json
import re
import ssl
from concurrent.futures import ThreadPoolExecutor

import pytest

from support.processes import Daemon, http, wait_for
from support.tabbrowser import Tab, arena_fixtures, script_for, tabs_of

try:
    import openai
except ImportError:  # the `test` extra installs it; without it the browser fixture stops the tests
    openai = None

DOMAINS = "arena.ai,lmarena.ai"
ANSWER = re.compile(r"^\[(?P<account>[^\]]+)\] turn (?P<turn>\d+) of (?P<evaluation>[0-9a-f-]+): ")

arena, browser = arena_fixtures()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    daemon = Daemon(tmp_path_factory.mktemp("gateway"),
                    ["--domains", DOMAINS, "--tab-poll-timeout", "5", "--log-requests",
                     "--bridge-url", "http://127.0.0.1:9"])
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def alpha(browser, gateway):
    """Session alpha's one tab, signed in as alice."""
    tab = Tab(browser, script_for(gateway, "alpha"), "alice")
    tab.wait_badge("connected")
    yield tab
    tab.close()


def chat(gateway, session: str, messages, *, stream: bool = False) -> str:
    api = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0,
                        timeout=60, default_headers={"X-Session-Name": session,
                                                     "X-Target-Domain": "arena.ai"})
    if not stream:
        answer = api.chat.completions.create(model="fake-chat", messages=messages)
        return answer.choices[0].message.content
    parts = []
    for chunk in api.chat.completions.create(model="fake-chat", messages=messages, stream=True):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
    return "".join(parts)


def parsed(content: str) -> dict:
    match = ANSWER.match(content)
    assert match, content
    return {**match.groupdict(), "turn": int(match["turn"])}


def calls_to(arena, evaluation: str) -> list[dict]:
    return [e for e in arena.events() if e["event"] == "request" and e["evaluation"] == evaluation]


def metric(gateway, name: str, **labels) -> float:
    _, _, body = http("GET", gateway.url + "/metrics")
    text = body.decode() if isinstance(body, bytes) else str(body)
    shown = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.findall(rf"^{re.escape(name)}\{{{re.escape(shown)}\}} (\S+)$", text, re.M)
    return float(found[0]) if found else 0.0


def queued(gateway, session: str) -> int:
    _, _, health = http("GET", gateway.url + "/health")
    return health["tab_sessions"]["arena.ai"][session]["queued"]


def refuse_next(arena, status: int, body: str) -> None:
    connection = httpclient.HTTPSConnection("127.0.0.1", arena.port, timeout=5,
                                             context=ssl._create_unverified_context())
    try:
        connection.request("POST", "/_fake/refuse-next", body=json.dumps(
            {"status": status, "body": body}), headers={"Host": "arena.ai"})
        assert connection.getresponse().status == 200
    finally:
        connection.close()


def test_a_follow_up_continues_the_same_evaluation(alpha, gateway, arena):
    history = [{"role": "user", "content": "first question"}]
    first = chat(gateway, "alpha", history, stream=True)
    started = parsed(first)
    assert (started["account"], started["turn"]) == ("alice", 1)
    for turn, stream in ((2, False), (3, True)):
        history += [{"role": "assistant", "content": first},
                    {"role": "user", "content": f"question {turn}"}]
        first = chat(gateway, "alpha", history, stream=stream)
        assert parsed(first) == {**started, "turn": turn}
    seen = calls_to(arena, started["evaluation"])
    assert [(e["followup"], e["content"]) for e in seen] == [
        (False, "first question"), (True, "question 2"), (True, "question 3")]
    assert all(e["path"].endswith(f"/post-to-evaluation/{started['evaluation']}")
               for e in seen[1:])


def test_an_edited_history_starts_afresh_with_the_packed_history(alpha, gateway, arena):
    first = chat(gateway, "alpha", [{"role": "user", "content": "what is red?"}])
    original = parsed(first)["evaluation"]
    edited = [{"role": "user", "content": "what is blue?"},  # the client edited its turn
              {"role": "assistant", "content": first},
              {"role": "user", "content": "and green?"}]
    answer = parsed(chat(gateway, "alpha", edited))
    assert answer["evaluation"] != original and answer["turn"] == 1
    (call,) = calls_to(arena, answer["evaluation"])
    assert not call["followup"]
    assert call["content"].endswith("User: and green?")  # the arena keeps its last 200
    assert "Assistant: [alice] turn 1 of " in call["content"]
    assert len(calls_to(arena, original)) == 1  # the original evaluation was left alone


def test_a_conversation_continues_after_a_gateway_restart(alpha, gateway, arena):
    history = [{"role": "user", "content": "before the restart"}]
    first = chat(gateway, "alpha", history)
    started = parsed(first)
    gateway.stop()
    gateway.start()
    # the tab finds the new process by itself, with the same tab id
    wait_for(lambda: tabs_of(gateway).get("arena.ai", 0) == 1, 90, what="the tab to reconnect")
    history += [{"role": "assistant", "content": first},
                {"role": "user", "content": "after the restart"}]
    assert parsed(chat(gateway, "alpha", history)) == {**started, "turn": 2}
    assert calls_to(arena, started["evaluation"])[-1]["followup"] is True


def test_another_account_in_the_tab_falls_back_to_a_fresh_evaluation(alpha, browser, gateway,
                                                                     arena):
    history = [{"role": "user", "content": "a question for alice"}]
    first = chat(gateway, "alpha", history)
    started = parsed(first)
    before = metric(gateway, "lmgateway_conversation_fallbacks_total", reason="not_owner")
    # carol signs in to the same tab: it keeps its tab id, the evaluation stays alice's
    browser.run(alpha.page.goto(f"{arena.origin}/_fake/login?account=carol"))
    wait_for(lambda: "carol" in browser.run(alpha.page.inner_text("#account")), 10,
             what="carol signed in")
    wait_for(lambda: tabs_of(gateway).get("arena.ai", 0) == 1 and alpha.badge()[0] == "connected",
             20, what="the tab to reconnect")
    history += [{"role": "assistant", "content": first},
                {"role": "user", "content": "and now?"}]
    answer = chat(gateway, "alpha", history, stream=True)
    fresh = parsed(answer)
    # the client sees a plain answer, from a new evaluation of carol's
    assert fresh["account"] == "carol" and fresh["turn"] == 1
    assert fresh["evaluation"] != started["evaluation"]
    refused = [e for e in arena.events() if e["event"] == "refused"
               and e["path"].endswith(started["evaluation"])]
    assert [(e["status"], e["reason"]) for e in refused] == [(401, "not owner")]
    (call,) = calls_to(arena, fresh["evaluation"])
    assert not call["followup"] and "User: a question for alice" in call["content"]
    assert metric(gateway, "lmgateway_conversation_fallbacks_total",
                  reason="not_owner") == before + 1
    # the conversation goes on in carol's evaluation
    history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "more"}]
    assert parsed(chat(gateway, "alpha", history)) == {**fresh, "turn": 2}
    browser.run(alpha.page.goto(f"{arena.origin}/_fake/login?account=alice"))
    wait_for(lambda: alpha.badge()[0] == "connected" and
             tabs_of(gateway).get("arena.ai", 0) == 1, 20, what="alice back")


def test_already_has_feedback_falls_back_to_a_fresh_evaluation(alpha, gateway, arena):
    history = [{"role": "user", "content": "rate me"}]
    first = chat(gateway, "alpha", history)
    started = parsed(first)
    refuse_next(arena, 400, '{"error":"Message already has feedback, cannot retry"}')
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "again"}]
    fresh = parsed(chat(gateway, "alpha", history))
    assert fresh["account"] == "alice" and fresh["evaluation"] != started["evaluation"]
    assert metric(gateway, "lmgateway_conversation_fallbacks_total", reason="has_feedback") == 1


def test_a_conversation_stays_with_its_tab(alpha, browser, gateway, arena):
    # alice's tab holds two conversations, then bob's tab joins the session
    conversations = []
    for topic in ("cats", "dogs"):
        history = [{"role": "user", "content": f"tell me about {topic}"}]
        answer = chat(gateway, "alpha", history)
        assert parsed(answer)["account"] == "alice"
        conversations.append(history + [{"role": "assistant", "content": answer}])
    bob = Tab(browser, script_for(gateway, "alpha"), "bob")
    try:
        bob.wait_badge("connected")
        assert tabs_of(gateway)["arena.ai"] == 2
        cats, dogs = conversations
        with ThreadPoolExecutor(3) as pool:
            # alice's tab is busy with a slow follow-up of one conversation...
            slow = pool.submit(chat, gateway, "alpha",
                               cats + [{"role": "user", "content": "[[slow]] more on cats"}])
            wait_for(lambda: any("more on cats" in e.get("content", "")
                                 for e in arena.events() if e["event"] == "request"), 20,
                     what="the slow follow-up at the arena")
            # ...so the other conversation's follow-up waits for it, with bob's tab idle,
            waiting = pool.submit(chat, gateway, "alpha",
                                  dogs + [{"role": "user", "content": "more on dogs"}])
            wait_for(lambda: queued(gateway, "alpha") == 1, 20, what="the follow-up to wait")
            # while a new conversation is free to go to bob's tab at once
            new = parsed(chat(gateway, "alpha", [{"role": "user", "content": "hello bob"}]))
            assert new["account"] == "bob"
            assert not waiting.done() and queued(gateway, "alpha") == 1
            assert parsed(slow.result(60))["account"] == "alice"
            dogs_answer = parsed(waiting.result(60))
        assert dogs_answer["account"] == "alice" and dogs_answer["turn"] == 2
        assert calls_to(arena, dogs_answer["evaluation"])[-1]["followup"] is True
    finally:
        bob.close()
    wait_for(lambda: tabs_of(gateway).get("arena.ai", 0) == 1, 40, what="bob's tab gone")
