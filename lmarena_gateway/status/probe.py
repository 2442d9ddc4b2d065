"""Is each bridge answering? ``GET /v1/models`` to every distinct bridge, off the request path.

A timer ticks every few seconds; each tick probes the bridges in use that were not probed
within the last ``interval`` (a minute), so a bridge is asked at most once a minute and a
newly registered one is asked within a tick. Requests never wait for a probe.
"""

from __future__ import annotations

import json
import time

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from ..bridge import BRIDGE_CODES, Upstream, cancelled, read_capped, tls_failed, upstream_for
from ..errors import ApiError

log = Logger()
TICK = 5.0


@frozen
class ProbeResult:
    ok: bool
    checked_at: float
    since: float  # since when the bridge has been answering (or not)
    code: str | None = None  # why not, as the gateway's error code for the same failure
    status: int | None = None  # the HTTP status it answered with, if it answered
    latency_ms: float | None = None
    detail: str | None = None  # why not, in a few words


def bridge_of(upstream: Upstream) -> Upstream:
    """A bridge as the probe knows it: its URL and key, whichever session's label it wears."""
    return Upstream(upstream.base_url, upstream.api_key)


class BridgeProber:
    """The probe timer's function; ``results`` maps each bridge in use to its last probe."""

    def __init__(self, config, store, client, clock, *, interval: float = 60.0,
                 timeout: float = 10.0) -> None:
        self.config = config
        self.store = store
        self.client = client
        self.clock = clock
        self.interval = interval
        self.timeout = timeout
        self.results: dict[Upstream, ProbeResult] = {}
        self._started: dict[Upstream, float] = {}
        self._running: dict[Upstream, Deferred] = {}

    def bridges(self) -> dict[Upstream, int]:
        """Each distinct bridge (URL and key) in use, with how many sessions use it."""
        used: dict[Upstream, int] = {bridge_of(upstream_for(None, self.config)): 0}
        for record in self.store.records():
            try:
                upstream = bridge_of(upstream_for(record, self.config))
            except ApiError:
                continue  # no longer on --bridge-allow: nothing is sent there, probes included
            used[upstream] = used.get(upstream, 0) + 1
        return used

    def __call__(self) -> None:
        try:
            self.tick()
        except Exception:
            log.failure("bridge probe: a tick failed; trying again at the next one")

    def tick(self) -> None:
        now = self.clock.seconds()
        in_use = self.bridges()
        for gone in set(self.results) - set(in_use):
            del self.results[gone]
        for gone in set(self._started) - set(in_use):
            del self._started[gone]
        for upstream in in_use:
            if upstream in self._running:
                continue
            if now - self._started.get(upstream, float("-inf")) < self.interval:
                continue
            self._started[upstream] = now
            running = self.probe(upstream)
            if not running.called:  # an answer already there has nothing to wait for
                self._running[upstream] = running

    def stop(self) -> None:
        for running in list(self._running.values()):
            running.cancel()

    def probe(self, upstream: Upstream) -> Deferred:
        """One probe; fires (never fails) once ``results`` holds its outcome."""
        started = time.monotonic()
        headers = Headers({b"Accept": [b"application/json"]})
        if upstream.api_key:
            headers.setRawHeaders(b"Authorization", [b"Bearer " + upstream.api_key.encode()])
        d = self.client.request("GET", upstream.url("/v1/models"), headers=headers,
                                allow_redirects=False, unbuffered=True)
        timer = self.clock.callLater(self.timeout, d.cancel)

        def answered(response):
            return read_capped(response, 1024 * 1024).addCallback(
                lambda body: self._judge(response.code, body))

        def failed(failure):
            if timer.active() and cancelled(failure):
                return None  # stopped with the daemon: no outcome to show
            if not timer.active() or failure.check(TimeoutError):
                return ("BRIDGE_TIMEOUT", None, f"no answer in {self.timeout:g} s")
            if tls_failed(failure):
                return ("BRIDGE_TLS_ERROR", None, "TLS handshake failed")
            if failure.check(ConnectError, DNSLookupError, ConnectionError):
                return ("BRIDGE_ERROR", None, "unreachable")
            return ("BRIDGE_ERROR", None, "failed to answer")

        def record(outcome):
            if timer.active():
                timer.cancel()
            if outcome is None:
                return
            code, status, detail = outcome
            self._record(upstream, code, status, (time.monotonic() - started) * 1000, detail)

        def done(result):
            self._running.pop(upstream, None)
            return result

        d.addCallbacks(answered, failed)
        d.addCallbacks(record, lambda f: self._record(upstream, "BRIDGE_ERROR", None, None,
                                                      "failed to answer"))
        return d.addBoth(done)

    @staticmethod
    def _judge(status: int, body: bytes) -> tuple[str | None, int, str | None]:
        if status != 200:
            return (BRIDGE_CODES.get(status, "BRIDGE_ERROR"), status, f"HTTP {status}")
        try:
            models = json.loads(body)["data"]
        except (ValueError, KeyError, TypeError):
            models = None
        if not isinstance(models, list):
            return ("BRIDGE_BAD_RESPONSE", status, "not a model list")
        return (None, status, None)

    def _record(self, upstream: Upstream, code: str | None, status: int | None,
                latency_ms: float | None, detail: str | None = None) -> None:
        now = self.clock.seconds()
        ok = code is None
        before = self.results.get(upstream)
        since = before.since if before is not None and before.ok == ok else now
        result = ProbeResult(ok, now, since, code, status,
                             round(latency_ms, 1) if ok and latency_ms is not None else None,
                             detail)
        if before is not None and before.ok != ok:
            log.info("bridge {url} {what}", url=upstream.base_url,
                     what="answers again" if ok else f"stopped answering: {code} ({detail})")
        if upstream in self._started:  # still in use when the answer came
            self.results[upstream] = result

    def result_for(self, upstream: Upstream) -> ProbeResult | None:
        return self.results.get(bridge_of(upstream))


