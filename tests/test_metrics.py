"""/metrics over real loopback sockets: counters move by exactly what the traffic did."""

from __future__ import annotations

import pytest
import pytest_twisted
import treq
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock

from lmarena_gateway.metrics import Metrics
from lmarena_gateway.service import Pruner

from bridges import ChunkCollector, HeldBridge, event
from support.client import SESSION, call
from support.processes import free_port

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
HEADERS = {"X-Session-Name": "team-alpha", "X-Target-Domain": "lmarena.ai"}
CHAT_ROUTE = {"route": "/v1/chat/completions", "status": "200"}


class Scrape:
    """One /metrics answer: the raw text and every sample by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(url: str, headers=None) -> Scrape:
    status, response_headers, body = await call("GET", url + "/metrics", headers=headers)
    assert status == 200, body
    assert response_headers.getRawHeaders("content-type") == [CONTENT_TYPE_LATEST]
    return Scrape(body.decode())


async def registered(gateway_factory, **config):
    gw = await gateway_factory(**config)
    status, _, body = await call("POST", gw.url + "/session/register", SESSION)
    assert status == 200, body
    return gw


async def stream_body(url: str) -> bytes:
    response = await treq.post(url + "/v1/chat/completions", json=dict(CHAT, stream=True),
                               headers=HEADERS, unbuffered=True)
    collector = ChunkCollector()
    response.deliverBody(collector)
    await collector.done
    return collector.received


@pytest_twisted.ensureDeferred
async def test_chat_requests_counted_by_route_pattern_and_status(gateway_factory):
    gw = await registered(gateway_factory)
    before = await scrape(gw.url)
    for _ in range(3):
        status, _, _ = await call("POST", gw.url + "/v1/chat/completions", CHAT, HEADERS)
        assert status == 200
    after = await scrape(gw.url)
    assert after.value("lmgateway_requests_total", **CHAT_ROUTE) \
        - before.value("lmgateway_requests_total", **CHAT_ROUTE) == 3
    duration = {"route": "/v1/chat/completions"}
    assert after.value("lmgateway_request_duration_seconds_count", **duration) \
        - before.value("lmgateway_request_duration_seconds_count", **duration) == 3
    assert after.value("lmgateway_time_to_first_byte_seconds_count", stream="false") \
        - before.value("lmgateway_time_to_first_byte_seconds_count", stream="false") == 3
    # the first scrape was itself a request, counted under its own route
    assert after.value("lmgateway_requests_total", route="/metrics", status="200") == 1


@pytest_twisted.ensureDeferred
async def test_bytes_streamed_equal_what_clients_received(gateway_factory):
    gw = await registered(gateway_factory)
    before = await scrape(gw.url)
    bodies = [await stream_body(gw.url) for _ in range(2)]
    assert all(body.endswith(b"data: [DONE]\n\n") for body in bodies)
    after = await scrape(gw.url)
    assert after.value("lmgateway_streamed_bytes_total") \
        - before.value("lmgateway_streamed_bytes_total") == sum(len(b) for b in bodies)
    assert after.value("lmgateway_time_to_first_byte_seconds_count", stream="true") == 2
    assert after.value("lmgateway_open_streams") == 0


@pytest_twisted.ensureDeferred
async def test_open_streams_gauge_follows_a_held_stream(gateway_factory, listen):
    bridge = HeldBridge()
    gw = await registered(gateway_factory, bridge_url=await listen(bridge))
    response = await treq.post(gw.url + "/v1/chat/completions", json=dict(CHAT, stream=True),
                               headers=HEADERS, unbuffered=True)
    collector = ChunkCollector()
    response.deliverBody(collector)
    held = await bridge.arrivals.get()
    held.write(event("first"))
    assert await collector.chunks.get() == event("first")
    assert (await scrape(gw.url)).value("lmgateway_open_streams") == 1
    held.write(b"data: [DONE]\n\n")
    held.finish()
    await collector.done
    assert (await scrape(gw.url)).value("lmgateway_open_streams") == 0


@pytest_twisted.ensureDeferred
async def test_upstream_errors_counted_by_code(gateway_factory):
    gw = await registered(gateway_factory)
    status, _, _ = await call("POST", gw.url + "/v1/chat/completions",
                              dict(CHAT, model="fake-error-503"), HEADERS)
    assert status == 503
    dead = await registered(gateway_factory, bridge_url=f"http://127.0.0.1:{free_port()}")
    status, _, _ = await call("POST", dead.url + "/v1/chat/completions", CHAT, HEADERS)
    assert status == 502
    assert (await scrape(gw.url)).value("lmgateway_upstream_errors_total",
                                        code="BRIDGE_NOT_READY") == 1
    seen = await scrape(dead.url)
    assert seen.value("lmgateway_upstream_errors_total", code="BRIDGE_ERROR") == 1
    assert seen.value("lmgateway_requests_total", route="/v1/chat/completions", status="502") == 1


@pytest_twisted.ensureDeferred
async def test_labels_are_patterns_never_paths_names_or_ids(gateway_factory):
    gw = await registered(gateway_factory)
    status, _, _ = await call("GET", gw.url + "/no-such-place-4711")
    assert status == 404
    status, _, _ = await call("DELETE", gw.url + "/session/lmarena.ai/team-alpha")
    assert status == 200
    seen = await scrape(gw.url)
    assert seen.value("lmgateway_requests_total", route="other", status="404") == 1
    assert seen.value("lmgateway_requests_total", route="/session/<domain_and_name:rest>", status="200") == 1
    for secret in ("4711", "team-alpha", SESSION["session_id"], SESSION["message_id"]):
        assert secret not in seen.text


@pytest_twisted.ensureDeferred
async def test_sessions_per_domain_counted_when_scraped(gateway_factory):
    gw = await registered(gateway_factory)
    for name, domain in (("b", "lmarena.ai"), ("c", "arena.ai")):
        status, _, _ = await call("POST", gw.url + "/session/register",
                                  dict(SESSION, session_name=name, domain=domain))
        assert status == 200
    seen = await scrape(gw.url)
    assert seen.value("lmgateway_sessions", domain="lmarena.ai") == 2
    assert seen.value("lmgateway_sessions", domain="arena.ai") == 1
    assert ("lmgateway_sessions", frozenset({("domain", "beta.lmarena.ai")})) in seen.samples


@pytest_twisted.ensureDeferred
async def test_metrics_answers_admins_only(gateway_factory):
    gw = await gateway_factory()
    # a client relayed by a proxy on this machine is not a local client
    status, _, body = await call("GET", gw.url + "/metrics", headers={"X-Forwarded-For": "192.0.2.7"})
    assert status == 403
    assert body["error"]["code"] == "ADMIN_LOCAL_ONLY"
    token = "metrics-admin-token-0123456789abcdef"
    guarded = await gateway_factory(admin_token=token)
    status, _, body = await call("GET", guarded.url + "/metrics")
    assert status == 401
    assert body["error"]["code"] == "ADMIN_TOKEN_REQUIRED"
    await scrape(guarded.url, headers={"Authorization": f"Bearer {token}"})


@pytest_twisted.ensureDeferred
async def test_each_gateway_has_its_own_numbers(gateway_factory):
    first = await registered(gateway_factory)
    second = await registered(gateway_factory)
    status, _, _ = await call("POST", first.url + "/v1/chat/completions", CHAT, HEADERS)
    assert status == 200
    assert (await scrape(first.url)).value("lmgateway_requests_total", **CHAT_ROUTE) == 1
    assert (await scrape(second.url)).value("lmgateway_requests_total", **CHAT_ROUTE) == 0


class _PruningStore:
    def __init__(self, result) -> None:
        self.result = result

    def prune(self, cutoff):
        return self.result


@pytest.mark.parametrize("outcome", ["ok", "failed"])
def test_pruning_runs_and_sessions_pruned(outcome):
    metrics = Metrics()
    result = succeed({"lmarena.ai": 3, "arena.ai": 1}) if outcome == "ok" \
        else fail(OSError("disk gone"))
    pruner = Pruner(_PruningStore(result), Clock(), 30, metrics=metrics)
    pruner()
    seen = Scrape(metrics.exposition().decode())
    assert seen.value("lmgateway_pruning_runs_total", result=outcome) == 1
    pruned = {"lmarena.ai": 3, "arena.ai": 1} if outcome == "ok" else {}
    for domain in ("lmarena.ai", "arena.ai"):
        assert seen.value("lmgateway_sessions_pruned_total", domain=domain) == pruned.get(domain, 0)


def test_error_codes_from_bridges_cannot_grow_the_series():
    metrics = Metrics()
    for index in range(100):
        metrics.upstream_error(f"CODE_{index}")
    metrics.upstream_error("not a code: <script>")
    seen = Scrape(metrics.exposition().decode())
    codes = {dict(labels)["code"] for name, labels in seen.samples
             if name == "lmgateway_upstream_errors_total"}
    assert len(codes) == 33
    assert seen.value("lmgateway_upstream_errors_total", code="OTHER") == 100 - 32 + 1
    assert "<script>" not in seen.text
