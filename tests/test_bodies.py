"""Large JSON bodies are parsed off the reactor, and absurd ones are refused (issue 13, item 4).

The unit tier pins the routing (a body over the threshold never reaches ``json.loads``
on the reactor) and the bound; the process tier runs real worker processes and shows
``/health`` answered while a million-key body is being parsed, by ordering, not timing.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import struct
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from lmarena_gateway.bodies import (
    CHUNK,
    MAX_VALUES,
    THRESHOLD,
    Bodies,
    BodyPool,
    FileBody,
    InlinePool,
    _answer,
    decode,
)
from lmarena_gateway.errors import ApiError

from support.client import SESSION, call
from support.fakeprocess import ProcessReactor
from support.stub import StubGateway, result_of

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def million_keys(keys: int = 1_000_000) -> bytes:
    head = json.dumps(CHAT).encode()[:-1]
    return head + b"".join(b', "k%07d": 0' % i for i in range(keys)) + b"}"


def padded(body: dict, size: int = THRESHOLD + 1024) -> bytes:
    """A legitimate body just over the threshold: one long message."""
    text = "x" * size
    if "messages" in body:
        return json.dumps(dict(body, messages=[{"role": "user", "content": text}])).encode()
    if "prompt" in body:
        return json.dumps(dict(body, prompt=text)).encode()
    return json.dumps(dict(body, input=text)).encode()


def answered(d: Deferred) -> list:
    """A list that gets the Deferred's result when it has one (``called`` is True as soon
    as a Deferred waits on another)."""
    results: list = []

    def keep(result):
        results.append(result)
        return result

    d.addBoth(keep)
    return results


def refusal(raw: bytes) -> tuple[int, str]:
    with pytest.raises(ApiError) as caught:
        decode(raw)
    return caught.value.status, caught.value.code


# --- the bound, the same in a worker and on the reactor ---

def test_a_million_keys_are_too_complex():
    assert refusal(million_keys()) == (413, "BODY_TOO_COMPLEX")


def test_a_ten_mebibyte_prompt_in_one_message_is_a_body_like_any_other():
    text = "a long prompt, " * (10 * 1024 * 1024 // 15)
    body = {"model": "m", "messages": [{"role": "user", "content": text}]}
    assert decode(json.dumps(body).encode()) == body


def test_the_bound_counts_values_at_every_depth():
    at_limit = json.dumps({"a": [{"b": 0}] * ((MAX_VALUES - 2) // 2)}).encode()
    assert len(raw_values(at_limit)) <= MAX_VALUES
    decode(at_limit)
    over = json.dumps({"a": [[0, 0]] * (MAX_VALUES // 3 + 1)}).encode()
    assert refusal(over) == (413, "BODY_TOO_COMPLEX")


def raw_values(raw: bytes) -> list:
    out, stack = [], [json.loads(raw)]
    while stack:
        item = stack.pop()
        out.append(item)
        stack.extend(item.values() if isinstance(item, dict) else item if isinstance(item, list) else ())
    return out


def test_invalid_and_deep_bodies_stay_invalid_json():
    assert refusal(b"[" * 1500 + b"]" * 1500) == (400, "INVALID_JSON")
    assert refusal(b'{"a": ') == (400, "INVALID_JSON")


# --- which bodies leave the reactor ---

class HeldPool:
    """A pool whose jobs wait until the test parses them."""

    running = True

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, Deferred]] = []
        self.aliases: list = []

    def submit(self, body, aliases=None) -> Deferred:
        d: Deferred = Deferred()
        self.jobs.append((body, d))
        self.aliases.append(aliases)
        return d

    def finish(self) -> None:
        for (body, d), aliases in zip(self.jobs, self.aliases, strict=True):
            InlinePool().submit(body, aliases).chainDeferred(d)


@pytest.fixture
def no_big_parse(monkeypatch):
    """Every json.loads of more than the threshold, wherever it is called from."""
    seen: list[int] = []
    real = json.loads

    def loads(s, *args, **kwargs):
        if len(s) > THRESHOLD:
            seen.append(len(s))
        return real(s, *args, **kwargs)

    monkeypatch.setattr(json, "loads", loads)
    return seen


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", CHAT),
    ("/v1/images/generations", {"model": "fake-model", "prompt": "a cat"}),
    ("/v1/responses", {"model": "fake-model", "input": "hi"}),
])
def test_a_body_over_the_threshold_is_parsed_by_the_pool_not_the_reactor(path, body, no_big_parse):
    gw = StubGateway()
    gw.register()
    pool = HeldPool()
    gw.gateway.bodies.pool = pool  # the routes share the gateway's one Bodies
    pending = gw.send("POST", path, padded(body), {"X-Session-Name": SESSION["session_name"]})
    assert [len(raw) for raw, _ in pool.jobs] == [len(padded(body))]
    assert no_big_parse == []  # the reactor did not parse it
    assert answered(pending) == []
    pool.finish()
    gw.settle()
    assert result_of(pending).code == 200


def test_a_body_at_the_threshold_is_parsed_inline():
    pool = HeldPool()
    raw = json.dumps(dict(CHAT, pad="x" * (THRESHOLD - len(json.dumps(CHAT)) - 11))).encode()
    assert len(raw) <= THRESHOLD
    assert result_of(Bodies(pool).parse(raw))["model"] == "fake-model"
    assert pool.jobs == []


def test_a_million_keys_get_the_envelope_from_the_pool():
    gw = StubGateway()
    gw.register()
    pool = HeldPool()
    gw.gateway.bodies.pool = pool
    pending = gw.send("POST", "/v1/chat/completions", million_keys(),
                      {"X-Session-Name": SESSION["session_name"]})
    pool.finish()
    gw.settle()
    answer = result_of(pending)
    assert answer.code == 413
    body = json.loads(result_of(gw.client.content(answer)))
    assert body["error"]["code"] == "BODY_TOO_COMPLEX"


def test_without_a_running_pool_the_reactor_parses():
    pool = HeldPool()
    pool.running = False
    assert result_of(Bodies(pool).parse(padded(CHAT)))["model"] == "fake-model"
    assert pool.jobs == []


# --- real worker processes ---

@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_worker_processes_parse_refuse_and_survive_a_crash(reactor):
    pool = BodyPool(reactor, 1)
    pool.startService()
    try:
        big = padded(CHAT, 3 * 1024 * 1024)
        assert await pool.submit(big) == (json.loads(big), None)
        with pytest.raises(ApiError) as caught:
            await pool.submit(million_keys())
        assert caught.value.code == "BODY_TOO_COMPLEX"
        # A worker killed mid-body fails that body, and the next one gets a new worker.
        doomed = pool.submit(million_keys())
        pid = pool._all[0].transport.pid
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ApiError) as caught:
            await doomed
        assert (caught.value.status, caught.value.code) == (503, "BODY_PARSER_UNAVAILABLE")
        assert await pool.submit(big) == (json.loads(big), None)
        assert pool._all[0].transport.pid != pid
    finally:
        await pool.stopService()
    assert pool.processes == 0


async def until(check, reactor, what: str, timeout: float = 60.0) -> None:
    from twisted.internet.task import deferLater

    waited = 0.0
    while not check():
        assert waited < timeout, f"timed out waiting for {what}"
        await deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_health_is_answered_while_a_million_key_body_is_being_parsed(gateway_factory,
                                                                          reactor):
    import treq

    gw = await gateway_factory()
    await call("POST", gw.url + "/session/register", SESSION)
    pool = gw.service.getServiceNamed("body-parsers")
    big = treq.post(gw.url + "/v1/chat/completions", data=million_keys(),
                    headers={"Content-Type": "application/json", "X-Session-Name": "team-alpha"})
    big_answer = answered(big)
    await until(lambda: pool.processes == 1 and pool._all[0].job is not None, reactor,
                "the body to reach a worker")
    worker = pool._all[0].transport.pid
    os.kill(worker, signal.SIGSTOP)  # the parse cannot finish until the test says so
    try:
        status, _, health = await call("GET", gw.url + "/health")
        assert (status, health["status"]) == (200, "ok")
        assert big_answer == []  # /health answered while the body was still being parsed
    finally:
        os.kill(worker, signal.SIGCONT)
    response = await big
    body = json.loads(await treq.content(response))
    assert (response.code, body["error"]["code"]) == (413, "BODY_TOO_COMPLEX")


# --- a worker that is alive but never answers ---

def answer_frame(value) -> bytes:
    payload = pickle.dumps(("ok", value, None))
    return struct.pack("!Q", len(payload)) + payload


def test_a_hung_worker_is_killed_at_the_deadline_and_the_next_body_gets_a_new_one():
    reactor, clock = ProcessReactor(), Clock()
    pool = BodyPool(reactor, 1, timeout=30.0, clock=clock)
    pool.startService()
    stuck = pool.submit(b'{"a": 1}')
    waiting = pool.submit(b'{"b": 2}')  # queued behind the stuck body: one worker only
    (first,) = reactor.children
    clock.advance(29.9)
    assert answered(stuck) == [] and first.signals == []
    clock.advance(0.2)
    failure = answered(stuck)[0]
    assert (failure.value.status, failure.value.code) == (503, "BODY_PARSER_UNAVAILABLE")
    assert json.loads(failure.value.body())["error"]["type"] == "server_error"
    assert first.signals == ["KILL"]
    # The queued body went to a new worker at once, before the kill's end was seen.
    assert len(reactor.children) == 2
    second = reactor.children[1]
    second.protocol.outReceived(answer_frame({"b": 2}))
    assert answered(waiting) == [({"b": 2}, None)]
    first.end(signal=9)  # the killed one's end, late: nothing more happens
    assert pool.processes == 1 and answered(stuck)[0] is failure
    assert clock.getDelayedCalls() == []  # an answered body leaves no deadline running


def test_an_answer_in_time_cancels_the_deadline():
    reactor, clock = ProcessReactor(), Clock()
    pool = BodyPool(reactor, 1, timeout=30.0, clock=clock)
    pool.startService()
    job = pool.submit(b'{"a": 1}')
    clock.advance(29.0)
    reactor.children[0].protocol.outReceived(answer_frame({"a": 1}))
    clock.advance(60.0)
    assert answered(job) == [({"a": 1}, None)]
    assert reactor.children[0].signals == [] and pool.processes == 1


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_a_stopped_worker_is_killed_and_replaced(reactor):
    pool = BodyPool(reactor, 1, timeout=1.0)
    pool.startService()
    try:
        big = padded(CHAT, 1024 * 1024)
        assert await pool.submit(big) == (json.loads(big), None)
        pid = pool._all[0].transport.pid
        os.kill(pid, signal.SIGSTOP)  # alive, holding its next body forever
        with pytest.raises(ApiError) as caught:
            await pool.submit(big)
        assert (caught.value.status, caught.value.code) == (503, "BODY_PARSER_UNAVAILABLE")
        assert await pool.submit(big) == (json.loads(big), None)
        assert pool._all[0].transport.pid != pid
    finally:
        await pool.stopService()
    assert pool.processes == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the stopped one was killed, and reaped


# --- a small route stops reading at its own cap ---

def _refused_early(port: int, head: bytes, body_part: bytes) -> tuple[bytes, int]:
    """Sends the headers and the start of a body that is never finished; returns what the
    gateway answered and how many body bytes it could have read."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + body_part)
        answer = b""
        while not answer.endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    return answer, len(body_part)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_register_refuses_at_its_own_cap_over_real_http(gateway_factory):
    from twisted.internet.threads import deferToThread

    gw = await gateway_factory()
    port = int(gw.url.rsplit(":", 1)[1])
    declared = (b"POST /session/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                b"\r\nContent-Length: %d\r\n\r\n" % (16 * 1024 * 1024))
    chunked = (b"POST /session/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
               b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    cases = [(declared, b""),  # said in the headers: refused before one byte of the body
             (chunked, _chunk(b" " * 40_000) + _chunk(b" " * 40_000))]  # 80 KB of 16 MiB
    for head, part in cases:
        answer, sent = await deferToThread(_refused_early, port, head, part)
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 413 "), answer[:200]
        error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
        assert (error["code"], error["type"]) == ("BODY_TOO_LARGE", "invalid_request_error")
        assert sent < 100_000  # answered with at most this much of a 16 MiB body read


# --- no whole-body work on the reactor for a large body ---

class SpyFile(io.BytesIO):
    """twisted.web's temporary file, recording each read's size."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads: list[int] = []

    def read(self, size=-1):
        data = super().read(size)
        self.reads.append(len(data))
        return data


def test_a_large_body_reaches_the_worker_from_its_file_in_pieces():
    raw = padded(CHAT, 4 * CHUNK)
    spy = SpyFile(raw)
    reactor = ProcessReactor()
    pool = BodyPool(reactor, 1, clock=Clock())
    pool.startService()
    pool.submit(FileBody.of(spy), {"gpt-4": "claude"})
    (child,) = reactor.children
    assert max(spy.reads) <= CHUNK and sum(spy.reads) == len(raw)
    assert max(len(piece) for piece in child.written) <= CHUNK  # never the body whole
    options = pickle.dumps({"gpt-4": "claude"}, protocol=pickle.HIGHEST_PROTOCOL)
    assert b"".join(child.written) == (struct.pack("!Q", len(options)) + options
                                       + struct.pack("!Q", len(raw)) + raw)


def test_the_answer_is_unpickled_where_it_arrived(monkeypatch):
    reactor = ProcessReactor()
    pool = BodyPool(reactor, 1, clock=Clock())
    pool.startService()
    job = pool.submit(b'{"a": 1}')
    given = []
    real = pickle.loads
    monkeypatch.setattr(pickle, "loads", lambda data: given.append(type(data)) or real(data))
    frame = answer_frame({"a": 1})
    reactor.children[0].protocol.outReceived(frame[:5])
    reactor.children[0].protocol.outReceived(frame[5:])
    assert answered(job) == [({"a": 1}, None)]
    assert given == [memoryview]  # not a bytes copy of the answer


def test_the_worker_applies_the_alias_and_sends_the_rewritten_body():
    raw = json.dumps(dict(CHAT, model="gpt-4")).encode()
    kind, value, forward = pickle.loads(_answer(raw, {"gpt-4": "claude"}))
    assert (kind, value["model"], json.loads(forward)["model"]) == ("ok", "gpt-4", "claude")
    assert pickle.loads(_answer(raw, {"other": "x"}))[2] is None


def test_a_large_aliased_body_is_not_reserialised_on_the_reactor(monkeypatch):
    """The alias used to be applied by json.dumps of the whole body on the reactor
    (46 ms for 16 MiB); now the pool does it, and the reactor forwards what it gets."""
    gw = StubGateway()
    gw.register(models={"gpt-4": "fake-model"})
    pool = HeldPool()
    gw.gateway.bodies.pool = pool
    body = padded(dict(CHAT, model="gpt-4"))
    dumped: list[int] = []
    real = json.dumps

    def dumps(value, *args, **kwargs):
        text = real(value, *args, **kwargs)
        if len(text) > THRESHOLD:
            dumped.append(len(text))
        return text

    monkeypatch.setattr(json, "dumps", dumps)
    pending = gw.send("POST", "/v1/chat/completions", body,
                      {"X-Session-Name": SESSION["session_name"]})
    assert pool.aliases == [{"gpt-4": "fake-model"}]
    monkeypatch.setattr(json, "dumps", real)  # HeldPool.finish stands in for the worker
    pool.finish()
    monkeypatch.setattr(json, "dumps", dumps)
    gw.settle()
    assert result_of(pending).code == 200
    assert gw.fake.seen[-1]["body"]["model"] == "fake-model"
    assert dumped == []
