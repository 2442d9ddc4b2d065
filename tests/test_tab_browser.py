"""Tab mode end to end: the official openai SDK -> the gateway daemon -> a userscript in
real headless Chromium -> the fake arena.ai (TLS on loopback, CSP "connect only to
yourself"). See tests/tabbrowser.py for how the browser and the manager are stood in for.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from lmarena_gateway.userscript import render_script

from support.processes import Daemon, http, wait_for
from support.tabbrowser import Tab, arena_fixtures, script_for, tabs_of

try:
    import openai
except ImportError:  # the `test` extra installs it; without it the browser fixture stops the tests
    openai = None

DOMAINS = "arena.ai,lmarena.ai"

arena, browser = arena_fixtures()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    # no bridge listens at the default URL: a session without a tab fails at once
    daemon = Daemon(tmp_path_factory.mktemp("gateway"),
                    ["--domains", DOMAINS, "--tab-poll-timeout", "5", "--log-requests",
                     "--keepalive", "1", "--bridge-url", "http://127.0.0.1:9"])
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def tabs(browser, gateway):
    """Two sessions, each served by a tab of its own account: alpha by alice, beta by bob."""
    opened = {"alpha": Tab(browser, script_for(gateway, "alpha"), "alice"),
              "beta": Tab(browser, script_for(gateway, "beta"), "bob")}
    for tab in opened.values():
        tab.wait_badge("connected")
    yield opened
    for tab in opened.values():
        tab.close()


def client(gateway, session: str, domain: str = "arena.ai"):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0,
                         timeout=60, default_headers={"X-Session-Name": session,
                                                      "X-Target-Domain": domain})


def ask(gateway, session: str, text: str, *, stream: bool, model: str = "fake-chat"):
    """(content, reasoning) of one answer, streamed or not."""
    api = client(gateway, session)
    messages = [{"role": "user", "content": text}]
    if not stream:
        answer = api.chat.completions.create(model=model, messages=messages)
        message = answer.choices[0].message
        return message.content, (message.model_extra or {}).get("reasoning_content")
    content, reasoning = [], []
    for chunk in api.chat.completions.create(model=model, messages=messages, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content.append(delta.content or "")
        reasoning.append((delta.model_extra or {}).get("reasoning_content") or "")
    return "".join(content), "".join(reasoning) or None


def test_the_badge_says_connected_as_the_session(tabs, gateway):
    state, text = tabs["alpha"].badge()
    assert (state, text) == ("connected", "Gateway: connected as alpha")
    assert tabs_of(gateway)["arena.ai"] == 2
    # each tab created its session, as a registration would
    status, _, listing = http("GET", gateway.url + "/session/list?domain=arena.ai")
    assert set(listing["domains"]["arena.ai"]) == {"alpha", "beta"}


def test_two_tabs_serve_two_sessions_at_once_never_mixed(tabs, gateway, arena):
    jobs = [(session, stream, f"question {i} for {session}")
            for i, (session, stream) in enumerate(
                [(s, st) for s in ("alpha", "beta") for st in (True, False)] * 2)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: ask(gateway, j[0], j[2], stream=j[1]), jobs))
    for (session, stream, text), (content, _) in zip(jobs, answers, strict=True):
        account = {"alpha": "alice", "beta": "bob"}[session]
        assert content.startswith(f"[{account}] turn 1 of "), (session, stream, content)
        assert content.endswith(f"you said {text}")
    seen = [e for e in arena.events() if e["event"] == "request"]
    for session, _stream, text in jobs:
        account = {"alpha": "alice", "beta": "bob"}[session]
        assert [e["account"] for e in seen if e["content"] == text] == [account]


def test_reasoning_arrives_as_reasoning_content(tabs, gateway):
    for stream in (True, False):
        content, reasoning = ask(gateway, "alpha", "think", stream=stream, model="fake-reasoner")
        assert reasoning == "Thinking about the question."
        assert content.startswith("[alice] ") and "Thinking" not in content


def test_models_are_the_tabs_models(tabs, gateway):
    listed = [m.id for m in client(gateway, "alpha").models.list()]
    assert listed == ["fake-chat", "fake-reasoner", "fake-image", "fake-search"]
    with pytest.raises(openai.NotFoundError) as caught:
        ask(gateway, "alpha", "hi", stream=False, model="gpt-4o")
    error = caught.value.body
    assert error["code"] == "MODEL_NOT_FOUND" and "fake-chat" in error["message"]


def test_a_client_that_goes_away_has_the_arena_request_aborted_within_a_second(tabs, gateway,
                                                                              arena):
    api = client(gateway, "beta")
    stream = api.chat.completions.create(model="fake-chat", stream=True, messages=[
        {"role": "user", "content": "[[slow]] tell me a long story"}])
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    evaluation = wait_for(lambda: next((e["evaluation"] for e in arena.events()
                                        if e["event"] == "request"
                                        and "long story" in e["content"]), None), 10,
                          what="the request at the arena")
    gone_at = time.time()
    stream.close()
    aborted = wait_for(lambda: next((e for e in arena.events() if e["event"] == "aborted"
                                     and e["evaluation"] == evaluation), None), 10,
                       what="the abort at the arena")
    assert aborted["at"] - gone_at < 1.0
    assert not any(e["event"] == "completed" and e["evaluation"] == evaluation
                   for e in arena.events())
    # the tab is free again
    tabs["beta"].wait_badge("connected")
    assert ask(gateway, "beta", "after the abort", stream=False)[0].startswith("[bob] ")


def test_a_reloaded_tab_serves_again(tabs, gateway):
    tabs["alpha"].reload()
    tabs["alpha"].wait_badge("connected")
    assert tabs_of(gateway)["arena.ai"] == 2  # the same tab came back: not a second one
    assert ask(gateway, "alpha", "after the reload", stream=True)[0].startswith("[alice] ")


def test_a_php_era_lmarena_request_is_served_by_the_arena_tab(tabs, gateway):
    api = client(gateway, "alpha", domain="lmarena.ai")
    answer = api.chat.completions.create(model="fake-chat",
                                         messages=[{"role": "user", "content": "old client"}])
    assert answer.choices[0].message.content.startswith("[alice] ")


def test_a_session_without_a_tab_gets_its_error_at_once(tabs, gateway):
    # a tab-only session fails closed, saying which script to open where
    status, _, body = http("POST", gateway.url + "/session/register", {
        "domain": "arena.ai", "session_name": "gamma", "upstream": "tab"})
    assert status == 200, body
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        ask(gateway, "gamma", "hello", stream=True)
    assert caught.value.status_code == 503
    error = caught.value.body
    assert error["code"] == "TAB_NOT_CONNECTED"
    assert "gamma.user.js" in error["message"] and "https://arena.ai/" in error["message"]
    # a session with neither tab nor bridge of its own goes to the default bridge (down here)
    http("POST", gateway.url + "/session/register", {
        "domain": "arena.ai", "session_name": "delta",
        "session_id": "12345678-1234-1234-1234-123456789abc",
        "message_id": "87654321-4321-4321-4321-cba987654321"})
    with pytest.raises(openai.APIStatusError) as caught:
        ask(gateway, "delta", "hello", stream=False)
    assert caught.value.body["code"] == "BRIDGE_ERROR"
    assert time.monotonic() - started < 10  # neither waited for a tab


def test_a_tab_with_a_wrong_or_another_sessions_token_serves_nothing(tabs, browser, gateway,
                                                                    arena):
    beta_token = json.loads(script_for(gateway, "beta").split(
        "var REGISTRATION_TOKEN = ", 1)[1].split(";", 1)[0])
    impostors = []
    for token in (beta_token, "lmrt1.0.forged"):
        script = render_script(session_name="epsilon", gateway_url=gateway.url,
                               domains=("arena.ai", "lmarena.ai"), registration_token=token)
        impostors.append(Tab(browser, script, "mallory"))
    try:
        for impostor in impostors:
            text = impostor.wait_badge("error")
            assert "not valid for session 'epsilon'" in text
        assert tabs_of(gateway)["arena.ai"] == 2
        status, _, listing = http("GET", gateway.url + "/session/list?domain=arena.ai")
        assert "epsilon" not in listing["domains"]["arena.ai"]
        with pytest.raises(openai.APIStatusError) as caught:
            ask(gateway, "epsilon", "hello", stream=False)
        assert caught.value.body["code"] == "SESSION_NOT_FOUND"
        assert not any(e.get("account") == "mallory" for e in arena.events())
    finally:
        for impostor in impostors:
            impostor.close()


def test_the_page_csp_would_refuse_the_gateway(tabs, browser, gateway):
    """The positive control of the CSP: the page itself may not reach the gateway."""
    result = browser.run(tabs["alpha"].page.evaluate(
        "url => fetch(url).then(() => 'reached', e => 'refused')", gateway.url + "/health"))
    assert result == "refused"


