"""Prometheus metrics for one gateway: what an operator watches, in the text format.

Each :class:`Metrics` owns its ``CollectorRegistry`` rather than prometheus_client's
global one, so one process can hold several gateways (the tests do) without their
numbers mixing. Labels are route patterns, domains, statuses and error codes: small,
bounded sets. Never ids, keys or raw paths, which would grow without limit.
"""

from __future__ import annotations

import re
from collections import Counter as Tally

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from twisted.logger import Logger

log = Logger()

# Requests that match no route (404, 405, CORS preflights) share one label value, so
# a scanner walking random paths cannot create new series.
OTHER_ROUTE = "other"
# Error codes come partly from the bridge's own error bodies: any text a bridge chooses.
# Codes that look like codes are kept, up to a fixed number of them; the rest are OTHER.
ERROR_CODE = re.compile(r"[A-Za-z0-9_]{1,48}")
MAX_ERROR_CODES = 32
OTHER_CODE = "OTHER"
# A bridge answers its first chunk in milliseconds to seconds; a whole request (a
# stream) can last minutes.
TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class _SessionsCollector:
    """Sessions per domain, counted from the store's memory when scraped.

    Counting at scrape time keeps the gauge right whoever changed the store (the API,
    pruning, the CLI in another process) without a hook in every writer.
    """

    def __init__(self, store, domains) -> None:
        self.store = store
        self.domains = tuple(domains)

    def describe(self):
        return [GaugeMetricFamily("lmgateway_sessions", "Stored sessions, per domain",
                                  labels=["domain"])]

    def collect(self):
        family = GaugeMetricFamily("lmgateway_sessions", "Stored sessions, per domain",
                                   labels=["domain"])
        try:
            counts = Tally(record.domain for record in self.store.records())
        except Exception:
            # A store that cannot list must not turn the whole scrape into an error.
            log.failure("metrics: could not count sessions")
            return
        for domain in self.domains:
            counts.setdefault(domain, 0)
        for domain, count in sorted(counts.items()):
            family.add_metric([domain], count)
        yield family


class _TabsCollector:
    """Connected tabs per domain, read from the tab registry when scraped."""

    def __init__(self, registry, domains) -> None:
        self.registry = registry
        self.domains = tuple(domains)

    def describe(self):
        return [GaugeMetricFamily("lmgateway_tabs", "Connected tabs, per domain",
                                  labels=["domain"])]

    def collect(self):
        family = GaugeMetricFamily("lmgateway_tabs", "Connected tabs, per domain",
                                   labels=["domain"])
        for domain, count in sorted(self.registry.per_domain(self.domains).items()):
            family.add_metric([domain], count)
        yield family
        # Per session: bounded by --max-sessions-per-domain, and only sessions with a tab.
        shapes = {"tabs": "Connected tabs of a session", "busy": "Tabs answering right now",
                  "queued": "Requests waiting for a tab of the session"}
        families = {k: GaugeMetricFamily(f"lmgateway_session_{k}", text,
                                         labels=["domain", "session"])
                    for k, text in shapes.items()}
        for domain, sessions in self.registry.snapshot().items():
            for name, shown in sessions.items():
                families["tabs"].add_metric([domain, name], len(shown["tabs"]))
                families["busy"].add_metric([domain, name], shown["busy"])
                families["queued"].add_metric([domain, name], shown["queued"])
        yield from families.values()


def route_of(request) -> str:
    """The route pattern Klein matched (``/session/<domain_and_name:rest>``), or ``other``."""
    from klein.interfaces import IKleinRequest

    mapper = getattr(IKleinRequest(request), "mapper", None)
    if mapper is None:
        return OTHER_ROUTE
    try:
        rule, _ = mapper.match(return_rule=True)
    except Exception:  # werkzeug's NotFound, MethodNotAllowed, RequestRedirect
        return OTHER_ROUTE
    return rule.rule


class Metrics:
    """Every metric of one gateway, and the small calls the code paths make on them."""

    content_type = CONTENT_TYPE_LATEST.encode()

    def __init__(self, store=None, domains=()) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "lmgateway_requests", "HTTP requests answered, by route pattern and status",
            ["route", "status"], registry=registry)
        self.request_duration = Histogram(
            "lmgateway_request_duration_seconds",
            "From receiving a request to its last byte (a stream's whole life), by route",
            ["route"], buckets=DURATION_BUCKETS, registry=registry)
        self.open_streams = Gauge(
            "lmgateway_open_streams",
            "Bridge answers being relayed to clients right now (streams and JSON bodies)",
            registry=registry)
        self.ttfb = Histogram(
            "lmgateway_time_to_first_byte_seconds",
            "From sending a request to the bridge to relaying the first body bytes",
            ["stream"], buckets=TTFB_BUCKETS, registry=registry)
        self.streamed_bytes = Counter(
            "lmgateway_streamed_bytes", "Body bytes relayed from bridges to clients",
            registry=registry)
        self.upstream_errors = Counter(
            "lmgateway_upstream_errors",
            "Bridge failures, by the error code the client was given", ["code"],
            registry=registry)
        self._error_codes: set[str] = set()
        self.pruning_runs = Counter(
            "lmgateway_pruning_runs", "Pruning passes, by result (ok or failed)", ["result"],
            registry=registry)
        self.sessions_pruned = Counter(
            "lmgateway_sessions_pruned", "Sessions removed for idleness, per domain",
            ["domain"], registry=registry)
        self.conversations = Counter(
            "lmgateway_conversations",
            "Tab-mode chat requests, by how their evaluation started: continued (the "
            "history was one this gateway answered) or fresh (the packed history)",
            ["start"], registry=registry)
        self.conversation_fallbacks = Counter(
            "lmgateway_conversation_fallbacks",
            "Continuations the arena refused that were run once more as a fresh evaluation, "
            "by why: not_owner (401, another account holds the tab) or has_feedback",
            ["reason"], registry=registry)
        if store is not None:
            registry.register(_SessionsCollector(store, domains))

    # --- the calls the gateway makes ---

    def request_done(self, request, seconds: float) -> None:
        route = route_of(request)
        self.requests.labels(route, str(request.code)).inc()
        self.request_duration.labels(route).observe(seconds)

    def stream_opened(self) -> None:
        self.open_streams.inc()

    def stream_closed(self) -> None:
        self.open_streams.dec()

    def first_byte(self, seconds: float, *, stream: bool) -> None:
        self.ttfb.labels("true" if stream else "false").observe(seconds)

    def relayed(self, count: int) -> None:
        self.streamed_bytes.inc(count)

    def upstream_error(self, code: str) -> None:
        if code not in self._error_codes:
            if not ERROR_CODE.fullmatch(code) or len(self._error_codes) >= MAX_ERROR_CODES:
                code = OTHER_CODE
            self._error_codes.add(code)
        self.upstream_errors.labels(code).inc()

    def conversation_started(self, start: str) -> None:
        self.conversations.labels(start).inc()

    def conversation_fallback(self, reason: str) -> None:
        self.conversation_fallbacks.labels(reason).inc()

    def pruned(self, per_domain: dict[str, int] | None) -> None:
        self.pruning_runs.labels("ok").inc()
        for domain, count in (per_domain or {}).items():
            self.sessions_pruned.labels(domain).inc(count)

    def pruning_failed(self) -> None:
        self.pruning_runs.labels("failed").inc()

    def watch_tabs(self, registry, domains) -> None:
        self.registry.register(_TabsCollector(registry, domains))

    def exposition(self) -> bytes:
        """The text a Prometheus scrape reads."""
        return generate_latest(self.registry)
