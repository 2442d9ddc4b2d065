"""LMArena's refusals, end to end: the openai SDK -> the gateway daemon -> the real userscript
in headless Chromium -> the fake arena.ai, which refuses as LMArena does (a word in the
message, or an answer scripted for one message through ``/_fake/refuse-next``).

Each refusal of docs/tab-mode.rst ("Errors and what a person does") is shown twice:
before the first byte (an HTTP status and the envelope, streamed or not) and after it
(the stream opened, then an error event and ``[DONE]``). A stream opens with its first
chunk, or after one keep-alive interval (``--keepalive 2`` here) without one; an answer
the arena holds back longer than that (``delay``) arrives after the first byte.
One browser, one fake arena and one
gateway serve the whole module.
"""

from __future__ import annotations

import http.client as httpclient
import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

from support.processes import Daemon, http, wait_for
from support.tabbrowser import Tab, arena_fixtures, script_for

try:
    import openai
except ImportError:  # the `test` extra installs it; without it the browser fixture stops the tests
    openai = None

KEEPALIVE = 2.0
LATE = KEEPALIVE + 1.0  # an arena answer held this long comes after the stream opened
RECAPTCHA = '{"error":"recaptcha validation failed"}'
CHALLENGE = ("<!DOCTYPE html><html><head><title>Just a moment...</title></head>"
             "<body>Checking your browser</body></html>")
TOS = '{"error":"Request rejected: Content violates our terms of use"}'
SCHEMA = ('{"success":false,"error":{"issues":[{"path":["userMessage","content"],'
          '"message":"Required"},{"path":["modality"],"message":"Invalid"}]}}')
EMPTY = 'ad:{"finishReason":"stop"}\n'
_markers = itertools.count(1)

arena, browser = arena_fixtures(delay_ms=10)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    daemon = Daemon(tmp_path_factory.mktemp("gateway"),
                    ["--domains", "arena.ai,lmarena.ai", "--tab-poll-timeout", "5",
                     "--keepalive", str(KEEPALIVE), "--tab-queue", "1",
                     "--bridge-url", "http://127.0.0.1:9"])
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def tabs(browser, gateway):
    """solo: one tab (alice); team: two tabs of two accounts (bob, carol), in two browser
    profiles; nobody: a tab whose browser is not signed in to the arena."""
    script = {name: script_for(gateway, name) for name in ("solo", "team", "nobody")}
    wanted = {"solo": ("solo", "alice"), "team-bob": ("team", "bob"),
              "team-carol": ("team", "carol"), "nobody": ("nobody", None)}
    with ThreadPoolExecutor(len(wanted)) as pool:  # the browser opens them side by side
        futures = {key: pool.submit(Tab, browser, script[name], account)
                   for key, (name, account) in wanted.items()}
        opened = {key: future.result() for key, future in futures.items()}
    for tab in opened.values():
        tab.wait_badge("connected")
    yield opened
    for tab in opened.values():
        tab.close()


def client(gateway, session: str):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0,
                         timeout=60, default_headers={"X-Session-Name": session,
                                                      "X-Target-Domain": "arena.ai"})


def marker(name: str) -> str:
    return f"row-{name}-{next(_markers)}"


def refused(gateway, session: str, text: str, *, stream: bool, model: str = "fake-chat"):
    """The openai SDK's error for a request the gateway answers with an HTTP error."""
    api = client(gateway, session)
    with pytest.raises(openai.APIStatusError) as caught:
        answer = api.chat.completions.create(model=model, stream=stream,
                                             messages=[{"role": "user", "content": text}])
        if stream:
            list(answer)
    return caught.value


def ask(gateway, session: str, text: str, *, stream: bool = False, model: str = "fake-chat"):
    api = client(gateway, session)
    messages = [{"role": "user", "content": text}]
    if not stream:
        return api.chat.completions.create(model=model, messages=messages).choices[0].message.content
    parts = []
    for chunk in api.chat.completions.create(model=model, messages=messages, stream=True):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
    return "".join(parts)


def raw_stream(gateway, session: str, text: str) -> tuple[int, str]:
    """(status, body) of a streamed chat request, read to its end as bytes on the wire."""
    parts = urlsplit(gateway.url)
    connection = httpclient.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps({
            "model": "fake-chat", "stream": True,
            "messages": [{"role": "user", "content": text}]}),
            headers={"Content-Type": "application/json", "X-Session-Name": session,
                     "X-Target-Domain": "arena.ai"})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def error_after_first_byte(gateway, session: str, text: str) -> dict:
    """The error event of a stream that had opened: it is the last event but [DONE]."""
    status, body = raw_stream(gateway, session, text)
    assert status == 200, body
    blocks = [b for b in body.split("\n\n") if b]
    assert blocks[0] == ": keep-alive", blocks  # bytes reached the client before the refusal
    assert blocks[-1] == "data: [DONE]"
    assert blocks[-2].startswith("data: {\"error\""), blocks
    assert not any('"choices"' in b for b in blocks)  # nothing of a failed attempt leaked
    return json.loads(blocks[-2][len("data: "):])["error"]


def attempts(arena, text: str) -> list[dict]:
    """What the fake arena saw of the calls for one message, in order."""
    return [e for e in arena.events() if text in str(e.get("content", ""))
            and e["event"] in ("request", "refused")]


def all_fresh(seen: list[dict]) -> bool:
    ids = [i for e in seen for i in e["ids"]]
    tokens = [e["token"] for e in seen]
    return len(set(ids)) == len(ids) and len(set(tokens)) == len(tokens) and all(tokens)


# --- 403 reCAPTCHA failure: once more with a fresh token and fresh ids, then 502 ---


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_recaptcha_refused_twice_is_502_after_one_fresh_retry(tabs, gateway, arena, stream):
    text = marker("recaptcha")
    for _ in range(2):
        arena.script(403, RECAPTCHA, when=text)
    error = refused(gateway, "solo", text, stream=stream)
    assert error.status_code == 502 and error.body["code"] == "ARENA_RECAPTCHA_FAILED"
    assert "reload the arena.ai tab of session solo" in error.body["message"]
    seen = attempts(arena, text)
    assert [e["status"] for e in seen] == [403, 403] and all_fresh(seen)


def test_a_recaptcha_refused_once_then_passed_answers(tabs, gateway, arena):
    text = marker("recaptcha-once")
    arena.script(403, RECAPTCHA, when=text)
    content = ask(gateway, "solo", text, stream=True)
    seen = attempts(arena, text)
    assert [e["event"] for e in seen] == ["refused", "request"] and all_fresh(seen)
    # the answer is the second attempt's: its own evaluation, its own ids
    assert content == f"[alice] turn 1 of {seen[1]['evaluation']}: you said {text}"
    assert seen[1]["evaluation"] in seen[1]["ids"]


def test_a_recaptcha_refused_twice_after_the_first_byte_is_an_event(tabs, gateway, arena):
    text = marker("recaptcha-late")
    arena.script(403, RECAPTCHA, when=text, delay=LATE)
    arena.script(403, RECAPTCHA, when=text)
    error = error_after_first_byte(gateway, "solo", text)
    assert error["code"] == "ARENA_RECAPTCHA_FAILED"
    assert len(attempts(arena, text)) == 2  # retried: no answer had reached the client


# --- 403 HTML challenge: 503 naming the session, and the tab's badge says it too ---


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_challenge_is_503_and_the_badge_says_what_to_do(tabs, gateway, arena, stream):
    error = refused(gateway, "solo", f"[[challenge]] {marker('challenge')}", stream=stream)
    assert error.status_code == 503 and error.body["code"] == "ARENA_CHALLENGE"
    assert error.body["message"] == "solve the check in the arena.ai tab of session solo"
    assert error.response.headers["retry-after"] == "30"
    said = ("error", "Gateway (solo): solve the check in the arena.ai tab of session solo")
    wait_for(lambda: tabs["solo"].badge() == said or None, 20, what="the badge to say so")
    # solved: the next answer clears the badge
    assert ask(gateway, "solo", marker("after-check")).startswith("[alice] ")
    tabs["solo"].wait_badge("connected")


def test_a_challenge_after_the_first_byte_is_an_event(tabs, gateway, arena):
    text = marker("challenge-late")
    arena.script(403, CHALLENGE, when=text, content_type="text/html", delay=LATE)
    error = error_after_first_byte(gateway, "solo", text)
    assert error == {"message": "solve the check in the arena.ai tab of session solo",
                     "type": "upstream_error", "code": "ARENA_CHALLENGE"}
    said = ("error", "Gateway (solo): solve the check in the arena.ai tab of session solo")
    wait_for(lambda: tabs["solo"].badge() == said or None, 20, what="the badge to say so")
    ask(gateway, "solo", marker("after-check"))
    tabs["solo"].wait_badge("connected")


# --- 401 on a new conversation: the browser is not signed in ---


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_tab_not_signed_in_is_401(tabs, gateway, arena, stream):
    error = refused(gateway, "nobody", marker("signed-out"), stream=stream)
    assert error.status_code == 401 and error.body["code"] == "ARENA_NOT_SIGNED_IN"
    assert "sign in to LMArena in the arena.ai tab of session nobody" in error.body["message"]
    assert "sign in to LMArena" in tabs["nobody"].wait_badge("error")


def test_a_401_after_the_first_byte_is_an_event(tabs, gateway, arena):
    text = marker("signed-out-late")
    arena.script(401, '{"error":"Unauthorized"}', when=text, delay=LATE)
    assert error_after_first_byte(gateway, "solo", text)["code"] == "ARENA_NOT_SIGNED_IN"
    ask(gateway, "solo", marker("after-sign-in"))
    tabs["solo"].wait_badge("connected")


# --- 429: the arena's Retry-After, or its ratelimit reset ---


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("headers, wait", [({"Retry-After": "37"}, "37"),
                                           ({"ratelimit": "limit=3000, remaining=0, reset=23"},
                                            "23")], ids=["retry-after", "ratelimit"])
def test_an_arena_rate_limit_is_429_with_the_arenas_wait(tabs, gateway, arena, headers, wait,
                                                         stream):
    text = marker("ratelimit")
    arena.script(429, '{"error":"Too many requests"}', when=text, headers=headers)
    error = refused(gateway, "solo", text, stream=stream)
    assert error.status_code == 429 and error.body["code"] == "ARENA_RATE_LIMITED"
    assert error.response.headers["retry-after"] == wait
    assert f"retry in {wait} s" in error.body["message"]
    assert isinstance(error, openai.RateLimitError)


def test_a_rate_limit_after_the_first_byte_is_an_event(tabs, gateway, arena):
    text = marker("ratelimit-late")
    arena.script(429, "{}", when=text, headers={"Retry-After": "41"}, delay=LATE)
    error = error_after_first_byte(gateway, "solo", text)
    assert error["code"] == "ARENA_RATE_LIMITED" and "retry in 41 s" in error["message"]
    ask(gateway, "solo", marker("after-limit"))


# --- 422 terms of use: the content is the client's to change ---


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_content_against_the_terms_is_400(tabs, gateway, arena, stream):
    error = refused(gateway, "solo", f"[[tos]] {marker('tos')}", stream=stream)
    assert error.status_code == 400 and error.body["code"] == "ARENA_CONTENT_REJECTED"
    assert "Content violates our terms of use" in error.body["message"]
    assert isinstance(error, openai.BadRequestError)


def test_content_rejected_after_the_first_byte_is_an_event(tabs, gateway, arena):
    text = marker("tos-late")
    arena.script(422, TOS, when=text, delay=LATE)
    error = error_after_first_byte(gateway, "solo", text)
    assert error["code"] == "ARENA_CONTENT_REJECTED" and "terms of use" in error["message"]


# --- 400 schema issues: the gateway needs an update, and says which fields ---


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_schema_change_is_502_naming_the_paths(tabs, gateway, arena, stream):
    text = marker("schema")
    arena.script(400, SCHEMA, when=text)
    error = refused(gateway, "solo", text, stream=stream)
    assert error.status_code == 502 and error.body["code"] == "ARENA_SCHEMA_CHANGED"
    assert "(userMessage.content, modality)" in error.body["message"]


def test_a_schema_change_after_the_first_byte_is_an_event(tabs, gateway, arena):
    text = marker("schema-late")
    arena.script(400, SCHEMA, when=text, delay=LATE)
    error = error_after_first_byte(gateway, "solo", text)
    assert error["code"] == "ARENA_SCHEMA_CHANGED" and "userMessage.content" in error["message"]


# --- 200 with no content: two more attempts with fresh ids, then 502 ---


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_empty_answer_is_tried_three_times_then_502(tabs, gateway, arena, stream):
    text = f"[[empty]] {marker('empty')}"
    error = refused(gateway, "solo", text, stream=stream)
    assert error.status_code == 502 and error.body["code"] == "ARENA_EMPTY_ANSWER"
    seen = attempts(arena, text)
    assert [e["event"] for e in seen] == ["request"] * 3 and all_fresh(seen)


def test_an_empty_answer_once_then_an_answer(tabs, gateway, arena):
    text = marker("empty-once")
    arena.script(200, EMPTY, when=text, content_type="text/event-stream")
    assert ask(gateway, "solo", text, stream=True).endswith(f"you said {text}")
    assert len(attempts(arena, text)) == 2


def test_empty_answers_after_the_first_byte_end_with_an_event(tabs, gateway, arena):
    text = f"[[empty]] {marker('empty-late')}"
    arena.script(200, EMPTY, when=text, content_type="text/event-stream", delay=LATE)
    assert error_after_first_byte(gateway, "solo", text)["code"] == "ARENA_EMPTY_ANSWER"
    assert len(attempts(arena, text)) == 3


# --- hasArenaError / a3: the model failed, in the arena's words ---


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_has_arena_error_is_a_model_error(tabs, gateway, arena, stream):
    error = refused(gateway, "solo", f"[[model-error]] {marker('model-error')}", stream=stream)
    assert error.status_code == 502 and error.body["code"] == "ARENA_MODEL_ERROR"
    assert "hasArenaError" in error.body["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_a3_line_is_a_model_error_with_the_arenas_message(tabs, gateway, arena, stream):
    text = marker("a3")
    arena.script(200, 'a3:"the model is overloaded, try later"\n', when=text,
                 content_type="text/event-stream")
    error = refused(gateway, "solo", text, stream=stream)
    assert error.status_code == 502 and error.body["code"] == "ARENA_MODEL_ERROR"
    assert error.body["message"] == "LMArena: the model is overloaded, try later"


def test_a_model_error_after_text_is_an_event_after_that_text(tabs, gateway, arena):
    status, body = raw_stream(gateway, "solo", f"[[mid-error]] {marker('mid-error')}")
    assert status == 200
    blocks = [b for b in body.split("\n\n") if b and not b.startswith(":")]
    assert '"content"' in blocks[0] and "[alice] turn 1" in blocks[0]
    assert json.loads(blocks[-2][len("data: "):])["error"] == {
        "message": "LMArena: the model stopped with an error", "type": "upstream_error",
        "code": "ARENA_MODEL_ERROR"}
    assert blocks[-1] == "data: [DONE]"
    # the openai SDK raises it mid-stream, after the text it gave
    api = client(gateway, "solo")
    given = []
    with pytest.raises(openai.APIError, match="the model stopped with an error"):
        for chunk in api.chat.completions.create(model="fake-chat", stream=True, messages=[
                {"role": "user", "content": f"[[mid-error]] {marker('mid-error')}"}]):
            given.append(chunk.choices[0].delta.content or "")
    assert "".join(given).startswith("[alice] turn 1")


def test_has_arena_error_after_the_first_byte_is_an_event(tabs, gateway, arena):
    text = marker("has-error-late")
    arena.script(200, 'a0:"hasArenaError"\n', when=text, content_type="text/event-stream",
                 delay=LATE)
    error = error_after_first_byte(gateway, "solo", text)
    assert error["code"] == "ARENA_MODEL_ERROR" and "hasArenaError" in error["message"]


# --- search: the citations end the answer ---

SOURCES = ("\n\nSources:\n1. [Source A](https://example.org/a)\n"
           "2. [Source B](https://example.org/b?q=1)")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_search_answer_ends_with_its_sources(tabs, gateway, stream):
    text = marker("search")
    content = ask(gateway, "solo", text, stream=stream, model="fake-search")
    assert content.startswith("[alice] turn 1 of ") and content.endswith(
        f"you said {text}" + SOURCES)
    response = client(gateway, "solo").responses.create(model="fake-search", input=text)
    assert response.output_text.endswith(SOURCES)


# --- several tabs of one team ---


def test_two_tabs_of_one_team_answer_at_once_a_third_waits_a_fourth_is_429(tabs, gateway,
                                                                          arena):
    slow = [f"[[slow]] {marker('team')}" for _ in range(2)]
    waiting = marker("team-waits")
    with ThreadPoolExecutor(3) as pool:
        running = [pool.submit(ask, gateway, "team", text, stream=True) for text in slow]
        # both tabs are answering before either has finished
        wait_for(lambda: len([e for e in arena.events() if e["event"] == "request"
                              and e.get("content") in slow]) == 2 or None, 20,
                 what="both slow requests at the arena")
        queued = pool.submit(ask, gateway, "team", waiting)

        def session():
            status, _, health = http("GET", gateway.url + "/health")
            return health["tab_sessions"]["arena.ai"]["team"]

        shown = wait_for(lambda: session() if session()["queued"] == 1 else None, 20,
                         what="the third request in the queue")
        assert (len(shown["tabs"]), shown["busy"]) == (2, 2)
        error = refused(gateway, "team", marker("team-429"), stream=False)
        assert error.status_code == 429 and error.body["code"] == "SESSION_BUSY"
        assert error.response.headers["retry-after"] == "5"
        answers = [f.result(60) for f in running]
        third = queued.result(60)
    events = arena.events()
    starts = {e["content"]: e for e in events if e["event"] == "request"}
    ends = {e["evaluation"]: e["at"] for e in events if e["event"] == "completed"}
    first, second = (starts[text] for text in slow)
    # two accounts, at once: each started before the other was done
    assert {first["account"], second["account"]} == {"bob", "carol"}
    assert first["at"] < ends[second["evaluation"]] and second["at"] < ends[first["evaluation"]]
    # the third waited for a tab to be free
    assert starts[waiting]["at"] >= min(ends[first["evaluation"]], ends[second["evaluation"]])
    assert all(a.startswith(("[bob] ", "[carol] ")) for a in answers + [third])
