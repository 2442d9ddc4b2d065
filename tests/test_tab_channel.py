"""The tab channel and the tab upstream over real loopback HTTP, with a tab written in
Python that speaks to /tab/* exactly as the userscript does (the browser tests show the
real script doing it)."""

from __future__ import annotations

import json

import pytest_twisted
import treq
from twisted.internet.defer import ensureDeferred

from support.client import call

ARENA_PAGE = 'self.__next_f.push([1,"' + json.dumps(json.dumps({"initialModels": [
    {"id": "0199e8a0-0000-7000-8000-000000000001", "publicName": "fake-chat",
     "capabilities": {"outputCapabilities": {"text": True}}},
    {"id": "0199e8a0-0000-7000-8000-000000000003", "publicName": "fake-image",
     "capabilities": {"outputCapabilities": {"image": True}}}]}))[1:-1] + '"])'


class PyTab:
    def __init__(self, gw, name: str, *, domain: str = "arena.ai", token: str | None = None,
                 tab_id: str = "tab-python-1") -> None:
        self.gw = gw
        tokens = gw.service.getServiceNamed("registration-tokens")
        self.ident = {"session_name": name, "domain": domain, "tab_id": tab_id,
                      "registration_token": token if token is not None else tokens.token_for(name)}

    async def send(self, path: str, **fields):
        return await call("POST", self.gw.url + path, {**self.ident, **fields})

    async def connect(self):
        status, _, body = await self.send("/tab/connect", models_source=ARENA_PAGE)
        assert status == 200, body
        return body

    def job(self):
        """A Deferred (cancellable) of the next job."""
        return ensureDeferred(self._job())

    async def _job(self):
        status, _, body = await self.send("/tab/poll", timeout_seconds=5)
        assert status == 200, (status, body)
        return body

    async def push(self, job, **fields):
        status, _, body = await self.send("/tab/push", job_id=job["job_id"], **fields)
        assert status == 200, body
        return body


async def gateway(gateway_factory, **overrides):
    overrides.setdefault("domains", ("arena.ai", "lmarena.ai"))
    return await gateway_factory(**overrides)


def chat(gw, *, stream: bool, model: str = "fake-chat", session: str = "alpha", **extra):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream,
            **extra}
    return treq.post(gw.url + "/v1/chat/completions", json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", "X-Session-Name": session,
                              "X-Target-Domain": "arena.ai"})


def events(raw: bytes) -> list:
    found = []
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            found.append(data if data == "[DONE]" else json.loads(data))
    return found


@pytest_twisted.ensureDeferred
async def test_a_tab_with_a_bad_token_or_domain_is_refused(gateway_factory):
    gw = await gateway(gateway_factory)
    beta = gw.service.getServiceNamed("registration-tokens").token_for("beta")
    cases = [(PyTab(gw, "alpha", token=beta), 403, "REGISTRATION_TOKEN_INVALID"),
             (PyTab(gw, "alpha", token="lmrt1.0.nope"), 403, "REGISTRATION_TOKEN_INVALID"),
             (PyTab(gw, "alpha", token=""), 401, "REGISTRATION_TOKEN_REQUIRED"),
             (PyTab(gw, "alpha", domain="evil.example"), 400, "INVALID_DOMAIN"),
             (PyTab(gw, "alpha", tab_id="x"), 400, "INVALID_TAB_ID")]
    for tab, status, code in cases:
        for path in ("/tab/connect", "/tab/poll", "/tab/push"):
            got, _, body = await tab.send(path, job_id="j")
            assert (got, body["error"]["code"]) == (status, code), (path, code)
    assert gw.store.records() == []
    assert gw.service.getServiceNamed("tabs").snapshot() == {}


@pytest_twisted.ensureDeferred
async def test_a_tab_creates_its_session_within_the_limit(gateway_factory):
    gw = await gateway(gateway_factory, max_sessions_per_domain=1)
    hello = await PyTab(gw, "alpha").connect()
    assert hello["models"] == ["fake-chat", "fake-image"]
    record = gw.store.get("arena.ai", "alpha")
    assert record is not None and record.session_id is None and record.upstream is None
    status, _, body = await PyTab(gw, "beta").send("/tab/connect", models_source="")
    assert (status, body["error"]["code"]) == (409, "SESSION_LIMIT")


@pytest_twisted.ensureDeferred
async def test_an_unknown_tab_is_asked_to_connect_again(gateway_factory):
    gw = await gateway(gateway_factory)
    status, _, body = await PyTab(gw, "alpha").send("/tab/poll")
    assert (status, body["error"]["code"]) == (409, "TAB_UNKNOWN")


@pytest_twisted.ensureDeferred
async def test_a_stream_becomes_openai_chunks_with_usage_and_done(gateway_factory):
    gw = await gateway(gateway_factory)
    tab = PyTab(gw, "alpha")
    await tab.connect()
    polled = tab.job()
    pending = chat(gw, stream=True, stream_options={"include_usage": True})
    job = await polled
    body = json.loads(job["payload"]["body"])
    assert job["payload"]["url"] == "/nextjs-api/stream/create-evaluation"
    assert body["modelAId"] == "0199e8a0-0000-7000-8000-000000000001"
    assert body["modality"] == "chat" and body["userMessage"]["content"] == "hi"
    assert await tab.push(job, status=200, headers={"content-type": "text/event-stream"},
                          text='ag:"hm"\na0:"Hel') == {"cancel": False}
    await tab.push(job, text='lo"\na2:[{"type":"image","image":"https://x/i.png"}]\n')
    await tab.push(job, text='ad:{"finishReason":"stop","usage":{"promptTokens":1,'
                             '"completionTokens":2}}', done=True)
    response = await pending
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream"]
    seen = events(await treq.content(response))
    assert seen[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in seen[:-1] if e["choices"]]
    # a line cut between two pushes is one delta, once it is whole
    assert deltas == [{"role": "assistant", "reasoning_content": "hm"}, {"content": "Hello"},
                      {"content": "\n\n![image](https://x/i.png)\n\n"}, {}]
    assert seen[-3]["choices"][0]["finish_reason"] == "stop"
    assert seen[-2]["choices"] == [] and seen[-2]["usage"] == {
        "prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert len({e["id"] for e in seen[:-1]}) == 1


@pytest_twisted.ensureDeferred
async def test_a_model_error_mid_stream_is_an_error_event_then_done(gateway_factory):
    gw = await gateway(gateway_factory)
    tab = PyTab(gw, "alpha")
    await tab.connect()
    polled = tab.job()
    pending = chat(gw, stream=True)
    job = await polled
    await tab.push(job, status=200, text='a0:"partial"\n')
    reply = await tab.push(job, text='a3:"overloaded"\n')
    assert reply == {"cancel": True}  # the answer is over: the tab stops reading
    seen = events(await treq.content(await pending))
    assert seen[0]["choices"][0]["delta"]["content"] == "partial"
    assert seen[1] == {"error": {"message": "LMArena: overloaded", "type": "upstream_error",
                                 "code": "ARENA_MODEL_ERROR"}}
    assert seen[2] == "[DONE]"


@pytest_twisted.ensureDeferred
async def test_a_tab_lost_mid_stream_ends_with_tab_lost(gateway_factory):
    gw = await gateway(gateway_factory)
    tab = PyTab(gw, "alpha")
    await tab.connect()
    polled = tab.job()
    pending = chat(gw, stream=True)
    job = await polled
    await tab.push(job, status=200, text='a0:"part"\na0:"par')
    registry = gw.service.getServiceNamed("tabs")
    registry.disconnect(registry.tab("arena.ai", "alpha", "tab-python-1"), "closed")
    seen = events(await treq.content(await pending))
    assert seen[0]["choices"][0]["delta"]["content"] == "part"
    assert seen[-2]["error"]["code"] == "TAB_LOST" and seen[-1] == "[DONE]"


@pytest_twisted.ensureDeferred
async def test_a_stream_opens_with_its_first_chunk_so_an_early_failure_is_a_status(
        gateway_factory):
    gw = await gateway(gateway_factory)
    tab = PyTab(gw, "alpha")
    await tab.connect()
    for text, code in (('a0:"hasArenaError"\n', "ARENA_MODEL_ERROR"),
                       ('a3:"the model is overloaded"\n', "ARENA_MODEL_ERROR")):
        polled = tab.job()
        pending = chat(gw, stream=True)
        await answer_with(tab, await polled, 200, text)
        response = await pending
        assert response.code == 502
        assert json.loads(await treq.content(response))["error"]["code"] == code
    polled = tab.job()
    pending = chat(gw, stream=True)
    job = await polled
    await tab.push(job, status=200, text='a0:"par')
    registry = gw.service.getServiceNamed("tabs")
    registry.disconnect(registry.tab("arena.ai", "alpha", "tab-python-1"), "closed")
    response = await pending
    assert response.code == 502  # not a line of the answer was whole: nothing was sent
    assert json.loads(await treq.content(response))["error"]["code"] == "TAB_LOST"


@pytest_twisted.ensureDeferred
async def test_non_stream_answers_and_images(gateway_factory):
    gw = await gateway(gateway_factory)
    tab = PyTab(gw, "alpha")
    await tab.connect()
    polled = tab.job()
    pending = chat(gw, stream=False)
    job = await polled
    await tab.push(job, status=200, text='ag:"r"\na0:"x"\nad:{"finishReason":"content-filter"}\n',
                   done=True)
    answer = json.loads(await treq.content(await pending))
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0] == {"index": 0, "finish_reason": "content_filter", "message": {
        "role": "assistant", "content": "x", "reasoning_content": "r"}}
    polled = tab.job()
    pending = treq.post(gw.url + "/v1/images/generations", json.dumps(
        {"prompt": "a cat", "model": "fake-image"}).encode(),
        headers={"Content-Type": "application/json", "X-Session-Name": "alpha",
                 "X-Target-Domain": "arena.ai"})
    job = await polled
    assert json.loads(job["payload"]["body"])["modality"] == "image"
    await tab.push(job, status=200, text='a2:[{"type":"image","image":"https://x/c.png"}]\n',
                   done=True)
    images = json.loads(await treq.content(await pending))
    assert images["data"] == [{"url": "https://x/c.png"}]


@pytest_twisted.ensureDeferred
async def test_an_arena_rate_limit_is_429_with_its_retry_after(gateway_factory):
    gw = await gateway(gateway_factory)
    tab = PyTab(gw, "alpha")
    await tab.connect()
    polled = tab.job()
    pending = chat(gw, stream=True)
    job = await polled
    await tab.push(job, status=429, headers={"retry-after": "42"},
                   text='{"error":"Too many requests"}', done=True)
    response = await pending
    assert response.code == 429 and response.headers.getRawHeaders("retry-after") == ["42"]
    body = json.loads(await treq.content(response))
    assert body["error"]["code"] == "ARENA_RATE_LIMITED"


@pytest_twisted.ensureDeferred
async def test_a_busy_session_queues_then_answers_429(gateway_factory):
    gw = await gateway(gateway_factory, tab_queue=1)
    tab = PyTab(gw, "alpha")
    await tab.connect()
    polled = tab.job()
    first = chat(gw, stream=False)
    await polled
    second = chat(gw, stream=False)
    response = await chat(gw, stream=False)
    assert response.code == 429 and response.headers.getRawHeaders("retry-after") == ["5"]
    assert json.loads(await treq.content(response))["error"]["code"] == "SESSION_BUSY"
    for pending in (first, second):
        pending.cancel()


@pytest_twisted.ensureDeferred
async def test_health_and_metrics_count_the_tabs(gateway_factory):
    gw = await gateway(gateway_factory)
    await PyTab(gw, "alpha").connect()
    await PyTab(gw, "beta", tab_id="tab-python-2").connect()
    status, _, health = await call("GET", gw.url + "/health")
    assert health["tabs"] == {"arena.ai": 2, "lmarena.ai": 0}
    status, _, metrics = await call("GET", gw.url + "/metrics")
    assert b'lmgateway_tabs{domain="arena.ai"} 2.0' in metrics
    assert b'lmgateway_session_tabs{domain="arena.ai",session="alpha"} 1.0' in metrics
    assert b'lmgateway_session_queued{domain="arena.ai",session="beta"} 0.0' in metrics
    alpha = health["tab_sessions"]["arena.ai"]["alpha"]
    assert (len(alpha["tabs"]), alpha["busy"], alpha["queued"]) == (1, 0, 0)


async def answer_with(tab, job, status, text, headers=None):
    return await tab.push(job, status=status, headers=headers or {}, text=text, done=True)


@pytest_twisted.ensureDeferred
async def test_a_refused_recaptcha_is_retried_once_with_fresh_ids(gateway_factory):
    gw = await gateway(gateway_factory)
    tab = PyTab(gw, "alpha")
    await tab.connect()
    polled = tab.job()
    pending = chat(gw, stream=False)
    first = await polled
    await answer_with(tab, first, 403, '{"error":"recaptcha validation failed"}')
    second = await tab.job()  # the retry waited for the tab to poll again
    ids = lambda job: {json.loads(job["payload"]["body"])[k]  # noqa: E731
                       for k in ("id", "userMessageId", "modelAMessageId")}
    assert not ids(first) & ids(second)
    await answer_with(tab, second, 200, 'a0:"ok"\nad:{"finishReason":"stop"}\n')
    answer = json.loads(await treq.content(await pending))
    assert answer["choices"][0]["message"]["content"] == "ok"


@pytest_twisted.ensureDeferred
async def test_a_recaptcha_refused_twice_is_502(gateway_factory):
    gw = await gateway(gateway_factory)
    tab = PyTab(gw, "alpha")
    await tab.connect()
    polled = tab.job()
    pending = chat(gw, stream=False)
    for attempt in range(2):
        job = await polled
        await answer_with(tab, job, 403, '{"error":"recaptcha validation failed"}')
        if attempt < 1:
            polled = tab.job()
    response = await pending
    assert response.code == 502
    assert json.loads(await treq.content(response))["error"]["code"] == "ARENA_RECAPTCHA_FAILED"
    session = gw.service.getServiceNamed("tabs").session("arena.ai", "alpha")
    assert list(session.queue) == []  # no third attempt



@pytest_twisted.ensureDeferred
async def test_empty_answers_are_retried_twice_then_502(gateway_factory):
    gw = await gateway(gateway_factory)
    tab = PyTab(gw, "alpha")
    await tab.connect()
    polled = tab.job()
    pending = chat(gw, stream=True)
    for attempt in range(3):
        job = await polled
        await answer_with(tab, job, 200, 'ad:{"finishReason":"stop"}\n')
        if attempt < 2:
            polled = tab.job()
    response = await pending
    assert response.code == 502  # no chunk yet: the stream had not opened
    assert json.loads(await treq.content(response))["error"]["code"] == "ARENA_EMPTY_ANSWER"


@pytest_twisted.ensureDeferred
async def test_a_refusal_after_the_stream_started_is_an_event(gateway_factory):
    gw = await gateway(gateway_factory, keepalive=0.2)
    tab = PyTab(gw, "alpha")
    await tab.connect()
    polled = tab.job()
    pending = chat(gw, stream=True)
    job = await polled
    await answer_with(tab, job, 200, "")  # empty: retried
    job = await tab.job()
    # no chunk for one keep-alive interval: the stream opens, and keep-alives flow
    response = await pending
    assert response.code == 200
    reply = await answer_with(tab, job, 403, "<!DOCTYPE html><title>Just a moment...</title>")
    # the tab's badge says what to do, as the client is told
    assert reply == {"cancel": False,
                     "problem": "solve the check in the arena.ai tab of session alpha"}
    seen = events(await treq.content(response))
    assert seen[-2]["error"]["code"] == "ARENA_CHALLENGE"
    assert "solve the check in the arena.ai tab of session alpha" in seen[-2]["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_two_tabs_of_one_team_answer_at_once_a_third_waits_a_fourth_is_429(gateway_factory):
    gw = await gateway(gateway_factory, tab_queue=1)
    one, two = PyTab(gw, "alpha", tab_id="tab-window-1"), PyTab(gw, "alpha", tab_id="tab-window-2")
    await one.connect()
    await two.connect()
    polls = [one.job(), two.job()]
    first, second = chat(gw, stream=False), chat(gw, stream=False)
    jobs = [await p for p in polls]  # each idle tab took one request
    third = chat(gw, stream=False)
    response = await chat(gw, stream=False)
    assert response.code == 429 and response.headers.getRawHeaders("retry-after") == ["5"]
    session = gw.service.getServiceNamed("tabs").session("arena.ai", "alpha")
    assert len(session.queue) == 1 and session.public()["busy"] == 2
    for tab, job, word in ((one, jobs[0], "one"), (two, jobs[1], "two")):
        await answer_with(tab, job, 200, f'a0:"{word}"\nad:{{"finishReason":"stop"}}\n')
    answers = {json.loads(await treq.content(await d))["choices"][0]["message"]["content"]
               for d in (first, second)}
    assert answers == {"one", "two"}
    job = await one.job()  # the waiting request goes to the first tab that asks
    await answer_with(one, job, 200, 'a0:"three"\n')
    assert json.loads(await treq.content(await third))["choices"][0]["message"]["content"] == "three"


SEARCH_ANSWER = ('a0:"It is sunny."\n'
                 'ac:{"toolCallId":"s1","argsTextDelta":"{\\"source\\":{\\"url\\":\\"https://w.example/'
                 'today\\",\\"title\\":\\"Weather today\\"}}"}\n'
                 'ac:{"toolCallId":"s2","argsTextDelta":"{\\"source\\":[{\\"url\\":\\"https://w.example/'
                 'today\\",\\"title\\":\\"Again\\"},{\\"url\\":\\"https://n.example/\\"}]}"}\n'
                 'ad:{"finishReason":"stop"}\n')
SOURCES = ("\n\nSources:\n1. [Weather today](https://w.example/today)\n"
           "2. [https://n.example/](https://n.example/)")


@pytest_twisted.ensureDeferred
async def test_a_search_answer_ends_with_its_sources(gateway_factory):
    gw = await gateway(gateway_factory)
    tab = PyTab(gw, "alpha")
    await tab.connect()
    polled = tab.job()
    pending = chat(gw, stream=False)
    await answer_with(tab, await polled, 200, SEARCH_ANSWER)
    answer = json.loads(await treq.content(await pending))
    assert answer["choices"][0]["message"]["content"] == "It is sunny." + SOURCES
    # streamed: one last content delta, then the finish chunk
    polled = tab.job()
    pending = chat(gw, stream=True)
    await answer_with(tab, await polled, 200, SEARCH_ANSWER)
    seen = events(await treq.content(await pending))
    deltas = [(e["choices"][0]["delta"], e["choices"][0]["finish_reason"]) for e in seen[:-1]]
    assert deltas == [({"role": "assistant", "content": "It is sunny."}, None),
                      ({"content": SOURCES}, None), ({}, "stop")]
    # /v1/responses rides the chat path: the same text
    polled = tab.job()
    pending = treq.post(gw.url + "/v1/responses", json.dumps(
        {"model": "fake-chat", "input": "weather?"}).encode(),
        headers={"Content-Type": "application/json", "X-Session-Name": "alpha",
                 "X-Target-Domain": "arena.ai"})
    await answer_with(tab, await polled, 200, SEARCH_ANSWER)
    response = json.loads(await treq.content(await pending))
    assert response["output"][0]["content"][0]["text"] == "It is sunny." + SOURCES
