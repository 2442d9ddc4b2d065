"""The tab registry with a Clock: who gets a job, the queue, liveness, cancel."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from lmarena_gateway.arena import ArenaModel
from lmarena_gateway.errors import ApiError
from lmarena_gateway.tabs import BUSY_SILENCE, IJobSink, TabRegistry
from lmarena_gateway.upstream import IUpstream

MODELS = [ArenaModel("u1", "fake-chat", ("text",))]


@implementer(IJobSink)
class Sink:
    def __init__(self) -> None:
        self.seen: list = []

    def status(self, code, headers):
        self.seen.append(("status", code))

    def text(self, data):
        self.seen.append(("text", data))

    def end(self, error):
        self.seen.append(("end", error))

    def lost(self, why):
        self.seen.append(("lost", why))


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def registry(clock):
    return TabRegistry(clock, queue_limit=1, poll_timeout=25)


def results(d):
    box = []
    d.addBoth(box.append)
    return box


def test_the_sinks_and_upstreams_provide_their_interfaces(registry, clock):
    from lmarena_gateway.config import GatewayConfig
    from lmarena_gateway.metrics import Metrics
    from lmarena_gateway.proxy import BridgeUpstream, Proxy
    from lmarena_gateway.tabupstream import TabUpstream

    verifyObject(IJobSink, Sink())
    verifyObject(IUpstream, TabUpstream(registry, GatewayConfig(), clock, Metrics()))
    verifyObject(IUpstream, Proxy(GatewayConfig(), None, None, clock).bridge)
    assert isinstance(Proxy(GatewayConfig(), None, None, clock).bridge, BridgeUpstream)


def test_a_job_goes_to_the_tab_that_is_polling(registry):
    tab = registry.connect("arena.ai", "alpha", "tab-aaaaaaaa", MODELS)
    polled = results(registry.poll(tab, 25))
    job = registry.submit(registry.session("arena.ai", "alpha"), {"url": "/x"}, Sink())
    assert polled == [job] and tab.busy and job.tab is tab


def test_a_job_waits_for_a_poll_and_beyond_the_queue_is_429(registry):
    tab = registry.connect("arena.ai", "alpha", "tab-aaaaaaaa", MODELS)
    session = registry.session("arena.ai", "alpha")
    first = registry.submit(session, {}, Sink())  # the tab is not polling: it waits
    with pytest.raises(ApiError) as caught:
        registry.submit(session, {}, Sink())
    assert (caught.value.status, caught.value.code) == (429, "SESSION_BUSY")
    assert results(registry.poll(tab, 25)) == [first]
    assert list(session.queue) == []


def test_a_poll_without_work_answers_nothing_after_its_timeout(registry, clock):
    tab = registry.connect("arena.ai", "alpha", "tab-aaaaaaaa", MODELS)
    polled = results(registry.poll(tab, 5))
    clock.advance(4.9)
    assert polled == []
    clock.advance(0.2)
    assert polled == [None] and tab.waiting is None


def test_what_the_tab_pushes_reaches_the_sink(registry):
    tab = registry.connect("arena.ai", "alpha", "tab-aaaaaaaa", MODELS)
    registry.poll(tab, 25)
    sink = Sink()
    job = registry.submit(registry.session("arena.ai", "alpha"), {}, sink)
    assert registry.push(tab, job.job_id, {"status": 200, "text": 'a0:"h'}) == {"cancel": False}
    assert registry.push(tab, job.job_id, {"text": 'i"\n', "done": True}) == {"cancel": False}
    assert sink.seen == [("status", 200), ("text", 'a0:"h'), ("text", 'i"\n'), ("end", None)]
    assert not tab.busy


def test_a_cancelled_job_is_stopped_at_the_next_push(registry):
    tab = registry.connect("arena.ai", "alpha", "tab-aaaaaaaa", MODELS)
    registry.poll(tab, 25)
    sink = Sink()
    job = registry.submit(registry.session("arena.ai", "alpha"), {}, sink)
    registry.cancel(job)
    assert registry.push(tab, job.job_id, {"text": "more"}) == {"cancel": True}
    assert sink.seen == [] and not tab.busy


def test_a_queued_job_that_is_cancelled_is_never_handed_out(registry):
    tab = registry.connect("arena.ai", "alpha", "tab-aaaaaaaa", MODELS)
    job = registry.submit(registry.session("arena.ai", "alpha"), {}, Sink())
    registry.cancel(job)
    polled = results(registry.poll(tab, 25))
    assert polled == [] and tab.waiting is not None


def test_a_silent_busy_tab_is_lost_and_its_job_not_handed_on(registry, clock):
    one = registry.connect("arena.ai", "alpha", "tab-aaaaaaaa", MODELS)
    two = registry.connect("arena.ai", "alpha", "tab-bbbbbbbb", MODELS)
    registry.poll(one, 25)
    sink = Sink()
    job = registry.submit(registry.session("arena.ai", "alpha"), {}, sink)
    clock.advance(BUSY_SILENCE / 2)
    registry.poll(two, 25)  # the other tab stays in touch
    clock.advance(BUSY_SILENCE / 2 + 0.1)
    assert sink.seen == [("lost", f"no word from the tab for {BUSY_SILENCE:g} s")]
    assert registry.tab("arena.ai", "alpha", one.tab_id) is None
    assert two.job is None and job.tab is one  # not handed to the other tab


def test_an_idle_tab_is_gone_after_the_heartbeat(registry, clock):
    tab = registry.connect("arena.ai", "alpha", "tab-aaaaaaaa", MODELS)
    clock.advance(registry.heartbeat - 1)
    assert registry.session("arena.ai", "alpha") is not None
    clock.advance(2)
    assert registry.session("arena.ai", "alpha") is None
    assert registry.per_domain(("arena.ai",)) == {"arena.ai": 0}
    del tab


def test_the_last_tab_going_tells_the_waiting_clients(registry, clock):
    tab = registry.connect("arena.ai", "alpha", "tab-aaaaaaaa", MODELS)
    sink = Sink()
    registry.submit(registry.session("arena.ai", "alpha"), {}, sink)
    registry.disconnect(tab, "closed")
    assert sink.seen == [("lost", "the last tab of session alpha on arena.ai went away")]


def test_a_reloaded_tab_drops_what_its_old_page_left_open(registry):
    tab = registry.connect("arena.ai", "alpha", "tab-aaaaaaaa", MODELS)
    old_poll = results(registry.poll(tab, 25))
    again = registry.connect("arena.ai", "alpha", "tab-aaaaaaaa", MODELS)
    assert again is tab and old_poll == [None] and tab.waiting is None
    sink = Sink()
    job = registry.submit(registry.session("arena.ai", "alpha"), {}, sink)
    assert job.tab is None  # queued until the new page polls, never given to the dead one
    registry.poll(tab, 25)
    registry.connect("arena.ai", "alpha", "tab-aaaaaaaa", MODELS)
    assert sink.seen == [("lost", "the tab was reloaded")]


def test_the_snapshot_shows_tabs_per_domain_and_session(registry, clock):
    clock.advance(1_700_000_000)
    tab = registry.connect("arena.ai", "alpha", "tab-aaaaaaaa", MODELS)
    registry.submit(registry.session("arena.ai", "alpha"), {}, Sink())
    assert registry.snapshot() == {"arena.ai": {"alpha": {
        "tabs": [{"tab_id": tab.tab_id, "connected_since": "2023-11-14T22:13:20Z",
                  "busy": False, "models": 1, "served": 0, "last_error": None}],
        "busy": 0, "queued": 1}}}
