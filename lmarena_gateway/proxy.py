"""The OpenAI-compatible routes' work: resolve the session, pick the bridge, forward.

What comes back is relayed by :mod:`lmarena_gateway.relay`.
"""

from __future__ import annotations

import json
import re
import time
import uuid

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.error import ConnectingCancelledError, ConnectError, DNSLookupError, TimeoutError
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, _HTTP11ClientFactory
from twisted.web.http_headers import Headers

from .config import GatewayConfig
from .errors import ApiError
from .metrics import Metrics
from .relay import Relay, normalize_error, read_capped, set_status
from .security import require_bridge_allowed
from .sessions import SessionRecord, check_domain, check_session_name

log = Logger()
REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


def _cancelled(failure) -> bool:
    """A cancellation, however the HTTP client wrapped it."""
    if failure.check(CancelledError, ConnectingCancelledError):
        return True
    if failure.check(ResponseFailed):
        return any(_cancelled(reason) for reason in failure.value.reasons)
    return False


def _why(failure) -> str:
    """One readable reason, not a repr of nested Failures."""
    if failure.check(ResponseFailed) and failure.value.reasons:
        return _why(failure.value.reasons[0])
    return failure.getErrorMessage() or failure.type.__name__


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False  # one "Starting factory" log line per bridge connection is noise


def make_http_client(reactor, config: GatewayConfig):
    """One client over one persistent pool for every bridge request."""
    from treq.client import HTTPClient

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _QuietClientFactory
    pool.maxPersistentPerHost = 64
    # Below uvicorn's 5 s keep-alive: we drop idle connections before the bridge does,
    # so a POST never lands on a connection the bridge is closing.
    pool.cachedConnectionTimeout = 4
    agent = Agent(reactor, connectTimeout=config.connect_timeout, pool=pool)
    return HTTPClient(agent), pool


@frozen
class Upstream:
    """Where one request goes and how it authenticates there."""

    base_url: str
    api_key: str | None = None

    def url(self, path: str) -> str:
        return self.base_url + path


def upstream_for(record: SessionRecord | None, config: GatewayConfig) -> Upstream:
    """The operator's key goes only to the operator's bridge, never to a registered URL.

    A registered URL is checked against --bridge-allow again here: the list may have
    shrunk since the session was registered.
    """
    if record is not None and record.bridge_base_url:
        require_bridge_allowed(record.bridge_base_url, config.bridge_allow_list, status=403)
        return Upstream(record.bridge_base_url, record.bridge_api_key)
    key = record.bridge_api_key if record is not None and record.bridge_api_key else config.bridge_api_key
    return Upstream(config.bridge_url, key)


def request_id(request) -> str:
    """The client's X-Request-ID when it is sane, else a new one (the front door sets it)."""
    known = getattr(request, "request_id", None)
    if known:
        return known
    given = request.getHeader(b"x-request-id")
    if given:
        text = given.decode("latin-1")
        if REQUEST_ID.match(text):
            return text
    return uuid.uuid4().hex


class Proxy:
    """The /v1 routes' logic; ``client`` is a treq HTTPClient or a StubTreq."""

    def __init__(self, config: GatewayConfig, store, client, clock, *, client_keys=None,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self.store = store
        self.client = client
        self.clock = clock
        self.metrics = metrics if metrics is not None else Metrics()
        self.client_keys = client_keys  # a callable giving the current ClientKeys, or None

    # --- session resolution ---

    def resolve(self, request, *, required: bool) -> SessionRecord | None:
        name = (request.getHeader(b"x-session-name") or b"default").decode("latin-1")
        domain = (request.getHeader(b"x-target-domain") or b"lmarena.ai").decode("latin-1")
        name = check_session_name(name)
        if self.client_keys is not None:
            self.client_keys().require(request, name)
        domain = check_domain(domain, self.config.domains)
        record = self.store.get(domain, name)
        if record is None and required:
            raise ApiError(
                404, "SESSION_NOT_FOUND",
                f"no session {name!r} for domain {domain!r}: register one with "
                f"POST /session/register, or install the userscript from "
                f"/userscript/generate?session_name={name}",
            )
        if record is not None:
            self.store.touch(domain, name, self.clock.seconds())
        return record

    def _headers(self, upstream: Upstream, record: SessionRecord | None, rid: str) -> Headers:
        headers = Headers({b"Content-Type": [b"application/json"], b"X-Request-ID": [rid.encode()]})
        if upstream.api_key:
            headers.setRawHeaders(b"Authorization", [b"Bearer " + upstream.api_key.encode()])
        if record is not None:
            headers.setRawHeaders(b"X-LMArena-Session-ID", [record.session_id.encode()])
            headers.setRawHeaders(b"X-LMArena-Message-ID", [record.message_id.encode()])
            headers.setRawHeaders(b"X-LMArena-Domain", [record.domain.encode()])
        return headers

    def read_json_body(self, request, *, required: tuple[tuple[str, type], ...]) -> tuple[dict, bytes]:
        raw = request.content.read(self.config.max_body + 1)
        if len(raw) > self.config.max_body:
            raise ApiError(413, "BODY_TOO_LARGE",
                           f"the request body is over {self.config.max_body} bytes")
        try:
            body = json.loads(raw)
        except ValueError:
            raise ApiError(400, "INVALID_REQUEST", "the body must be JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "INVALID_REQUEST", "the body must be a JSON object")
        for name, kind in required:
            value = body.get(name)
            if not isinstance(value, kind) or not value:
                what = "a non-empty list" if kind is list else "a string"
                raise ApiError(400, "INVALID_REQUEST", f"{name!r} must be {what}")
        return body, raw

    @staticmethod
    def _apply_alias(record, body: dict, raw: bytes) -> bytes:
        model = body.get("model")
        if record is None or not isinstance(model, str) or model not in record.models:
            return raw
        return json.dumps(dict(body, model=record.models[model])).encode()

    # --- the routes ---

    def chat(self, request) -> Deferred:
        record = self.resolve(request, required=True)
        body, raw = self.read_json_body(request, required=(("model", str), ("messages", list)))
        stream = body.get("stream") is True
        return self._forward(request, record, "/v1/chat/completions",
                             self._apply_alias(record, body, raw), sse=stream)

    def images(self, request) -> Deferred:
        record = self.resolve(request, required=True)
        body, raw = self.read_json_body(request, required=(("prompt", str),))
        return self._forward(request, record, "/v1/images/generations",
                             self._apply_alias(record, body, raw), sse=False)

    @inlineCallbacks
    def models(self, request):
        record = self.resolve(request, required=False)
        upstream = upstream_for(record, self.config)
        rid = request_id(request)
        request.setHeader(b"X-Request-ID", rid.encode())
        response = yield self._send(b"GET", upstream, "/v1/models", None, record, rid)
        body = yield read_capped(response, 16 * 1024 * 1024)
        if response.code >= 300:
            return self._bridge_error(request, upstream, response.code, body)
        try:
            listing = json.loads(body)
            models = list(listing["data"])
        except (ValueError, KeyError, TypeError):
            self.metrics.upstream_error("BRIDGE_BAD_RESPONSE")
            raise ApiError(502, "BRIDGE_BAD_RESPONSE",
                           f"the bridge at {upstream.base_url} sent an unreadable model list",
                           "bridge_error") from None
        if record is not None:
            for alias, target in sorted(record.models.items()):
                models.append({"id": alias, "object": "model", "created": int(record.created_at),
                               "owned_by": f"alias of {target} (session {record.session_name})"})
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"object": "list", "data": models}).encode()

    # --- upstream plumbing ---

    def _send(self, method: bytes, upstream: Upstream, path: str, data: bytes | None,
              record, rid: str) -> Deferred:
        """The bridge request; connection failures become our 502/504 envelopes."""
        started = time.monotonic()
        url = upstream.url(path)
        d = self.client.request(method.decode(), url, data=data,
                                headers=self._headers(upstream, record, rid),
                                allow_redirects=False, unbuffered=True)
        # treq's own timeout reads the global reactor; ours runs on the injected clock.
        timer = self.clock.callLater(self.config.stream_idle_timeout, d.cancel)

        def answered(response):
            if timer.active():
                timer.cancel()
            if self.config.debug:
                log.debug("bridge {method} {url} -> {code} in {ms:.1f} ms",
                          method=method.decode(), url=url, code=response.code,
                          ms=(time.monotonic() - started) * 1000)
            return response

        def failed(failure):
            timed_out = not timer.active()
            if timer.active():
                timer.cancel()
            if failure.check(TimeoutError) or (timed_out and _cancelled(failure)):
                self.metrics.upstream_error("BRIDGE_TIMEOUT")
                raise ApiError(504, "BRIDGE_TIMEOUT",
                               f"the bridge at {upstream.base_url} did not answer in time",
                               "bridge_error")
            if _cancelled(failure):
                raise CancelledError()  # the client went away: nothing to report
            if failure.check(ConnectError, DNSLookupError, ResponseFailed, ConnectionError):
                log.info("bridge {url} unreachable: {why}", url=url, why=_why(failure))
                self.metrics.upstream_error("BRIDGE_UNAVAILABLE")
                raise ApiError(502, "BRIDGE_UNAVAILABLE",
                               f"the bridge at {upstream.base_url} is unreachable",
                               "bridge_error")
            return failure

        return d.addCallbacks(answered, failed)

    def _bridge_error(self, request, upstream: Upstream, status: int, body: bytes) -> bytes:
        """A bridge error keeps its status, in the envelope; a redirect is a bad answer."""
        if status < 400:
            status, payload = 502, {"error": {
                "message": f"the bridge at {upstream.base_url} answered with a redirect "
                           f"(HTTP {status}), which the gateway does not follow",
                "type": "bridge_error", "code": "BRIDGE_BAD_RESPONSE"}}
        else:
            payload = normalize_error(status, body)
        self.metrics.upstream_error(payload["error"]["code"])
        set_status(request, status)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(payload).encode()

    def _stream_closed(self, result):
        self.metrics.stream_closed()
        return result

    def _forward(self, request, record, path: str, data: bytes, *, sse: bool) -> Deferred:
        upstream = upstream_for(record, self.config)
        rid = request_id(request)
        request.setHeader(b"X-Request-ID", rid.encode())
        sent_at = time.monotonic()
        pending = self._send(b"POST", upstream, path, data, record, rid)
        relay: list[Relay] = []

        def cancel(_):
            if relay:
                relay[0].stop()
            else:
                pending.cancel()

        finished = Deferred(cancel)

        def answered(response):
            if response.code >= 300:
                return read_capped(response).addCallback(
                    lambda body: finished.callback(
                        self._bridge_error(request, upstream, response.code, body)))
            set_status(request, response.code)
            content_type = response.headers.getRawHeaders(b"content-type", [None])[0]
            if sse:
                request.setHeader(b"Content-Type", content_type or b"text/event-stream")
                request.setHeader(b"Cache-Control", b"no-cache")
                request.setHeader(b"X-Accel-Buffering", b"no")
            elif content_type:
                request.setHeader(b"Content-Type", content_type)
            protocol = Relay(request, self.clock, sse=sse,
                              idle_timeout=self.config.stream_idle_timeout,
                              keepalive=self.config.keepalive,
                              upstream_url=upstream.base_url, finished=finished,
                              metrics=self.metrics, sent_at=sent_at)
            relay.append(protocol)
            self.metrics.stream_opened()  # finished fires once, however the relay ends
            finished.addBoth(self._stream_closed)
            response.deliverBody(protocol)

        def failed(failure):
            if not finished.called:
                finished.errback(failure)

        pending.addCallbacks(answered, failed)
        return finished
