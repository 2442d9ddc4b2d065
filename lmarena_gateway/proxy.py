"""The OpenAI-compatible routes' work: resolve the session, pick the bridge, forward.

What comes back is relayed by :mod:`lmarena_gateway.relay`.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    FirstError,
    gatherResults,
    inlineCallbacks,
    succeed,
)
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from .bodies import Bodies, Body, FileBody
from .bridge import (
    Upstream,
    cancelled,
    normalize_error,
    read_capped,
    redact,
    tls_failed,
    upstream_for,
    why,
)
from .config import GatewayConfig
from .errors import ApiError, envelope, note_error, set_error_headers
from .metrics import Metrics
from .relay import Relay, set_status
from .sessions import SessionRecord, check_domain, check_session_name
from .site import request_id
from .upstream import IUpstream, Route
from .workers import tab_mode_off

log = Logger()


def _all(looked: list[Deferred]) -> Deferred:
    """Fires once every lookup has; fails with the first failure itself (an ApiError)."""
    def first(failure: Failure) -> Failure:
        return failure.value.subFailure if isinstance(failure.value, FirstError) else failure

    return gatherResults(looked, consumeErrors=True).addErrback(first)


def session_name_of(request) -> str:
    """X-Session-Name, else the PHP gateway's fallback X-Session-ID, else ``default``."""
    given = request.getHeader(b"x-session-name") or request.getHeader(b"x-session-id")
    return check_session_name((given or b"default").decode("latin-1").strip())


class Proxy:
    """The /v1 routes' logic: resolve the session, choose its upstream (its tabs, or the
    bridge path this class implements), hand the request over.

    ``client`` has treq's surface (a BridgeClient, a StubTreq); ``tabs`` is the
    TabRegistry, or None.
    """

    def __init__(self, config: GatewayConfig, store, client, clock, *, client_keys=None,
                 metrics: Metrics | None = None, tabs=None, bodies: Bodies | None = None) -> None:
        self.config = config
        self.bodies = bodies if bodies is not None else Bodies()
        self.store = store
        self.client = client
        self.clock = clock
        self.metrics = metrics if metrics is not None else Metrics()
        self.client_keys = client_keys  # a callable giving the current ClientKeys, or None
        self.bridge = BridgeUpstream(self)
        self.tabs = tabs
        self.tab_upstream = None
        if tabs is not None:
            from .tabupstream import TabUpstream

            self.tab_upstream = TabUpstream(tabs, config, clock, self.metrics, store=store)

    # --- session resolution ---

    def routed(self, request, *, required: bool) -> Deferred:
        """:meth:`route`, once any of the session's records missing from memory has been
        looked for in the store: a registration another worker or instance acknowledged
        a moment ago is not a 404 here. Hits, the usual case, never wait."""
        name = session_name_of(request)
        domain = (request.getHeader(b"x-target-domain") or b"lmarena.ai").decode("latin-1").strip()
        if self.client_keys is not None:
            self.client_keys().require(request, name)
        domain = check_domain(domain, self.config.domains)
        if self.store.get(domain, name) is not None:
            return succeed(self.route(request, required=required))
        # Paired domains matter only without a record here (a tab-only session there).
        missing = [domain] + [d for d in self.config.tab_pairs_for(domain)
                              if self.store.get(d, name) is None]
        looked = [self.store.lookup(d, name) for d in missing]
        return (looked[0] if len(looked) == 1 else _all(looked)).addCallback(
            lambda _: self.route(request, required=required))

    def route(self, request, *, required: bool) -> Route:
        """The session's tabs when one is connected (on its domain, else on a paired one),
        else its bridge; a tab-only session without a tab fails at once."""
        name = session_name_of(request)
        domain = (request.getHeader(b"x-target-domain") or b"lmarena.ai").decode("latin-1").strip()
        if self.client_keys is not None:
            self.client_keys().require(request, name)
        domain = check_domain(domain, self.config.domains)
        record = self.store.get(domain, name)
        candidates = (domain, *self.config.tab_pairs_for(domain))
        if self.tabs is not None:
            for tab_domain in candidates:
                tabs = self.tabs.session(tab_domain, name)
                if tabs is not None:
                    record = record or self.store.get(tab_domain, name)
                    if record is not None:
                        self.store.touch(record.domain, name, self.clock.seconds())
                    return Route(domain, name, record, tabs, self.tab_upstream)
        records = [r for r in (self.store.get(d, name) for d in candidates) if r is not None]
        if any(r.upstream == "tab" for r in records) and (record is None or record.upstream == "tab"):
            if self.tabs is None and self.config.workers > 1:
                raise ApiError(503, "TAB_MODE_OFF", tab_mode_off(self.config.workers),
                               "upstream_error")
            raise ApiError(503, "TAB_NOT_CONNECTED",
                           f"session {name!r} is served only by its tab, and none is connected: "
                           f"open https://{candidates[-1]}/ in a browser that is signed in to "
                           f"LMArena and has the userscript {name}.user.js installed "
                           f"(tabs of {' or '.join(candidates)} serve it)", "upstream_error")
        record = self.resolve(request, required=required)
        return Route(domain, name, record, None, self.bridge)

    def resolve(self, request, *, required: bool) -> SessionRecord | None:
        name = session_name_of(request)
        domain = (request.getHeader(b"x-target-domain") or b"lmarena.ai").decode("latin-1").strip()
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
        if record is not None and record.session_id and record.message_id:
            headers.setRawHeaders(b"X-LMArena-Session-ID", [record.session_id.encode()])
            headers.setRawHeaders(b"X-LMArena-Message-ID", [record.message_id.encode()])
            headers.setRawHeaders(b"X-LMArena-Domain", [record.domain.encode()])
        return headers

    def read_json_body(self, request, *, required: tuple[tuple[str, type], ...],
                       aliases: dict[str, str] | None = None) -> Deferred:
        """Fires with (body, what to forward): a large body is parsed off the reactor, and
        left in its file (bodies.py); with ``aliases``, what to forward has its model
        rewritten to the alias's target, by the worker for a large body."""
        content = FileBody.of(request.content)
        if content.size > self.config.max_body:
            raise ApiError(413, "BODY_TOO_LARGE",
                           f"the request body is over {self.config.max_body} bytes")
        raw: Body = content if content.size > self.bodies.threshold else content.read()
        return self.bodies.parse_for_bridge(raw, aliases).addCallback(self._checked, required)

    def _aliases(self, route: Route) -> dict[str, str] | None:
        """The session's model aliases, applied as the body is parsed: on the bridge path."""
        if route.upstream is self.bridge and route.record is not None:
            return dict(route.record.models) or None
        return None

    @staticmethod
    def _checked(parsed, required: tuple[tuple[str, type], ...]) -> tuple[dict, Body]:
        body, raw = parsed
        if not isinstance(body, dict):
            raise ApiError(400, "INVALID_REQUEST", "the body must be a JSON object")
        for name, kind in required:
            value = body.get(name)
            if not isinstance(value, kind) or not value:
                what = "a non-empty list" if kind is list else "a string"
                raise ApiError(400, "INVALID_REQUEST", f"{name!r} must be {what}")
        return body, raw

    @staticmethod
    def _serialised(record, body: dict) -> bytes:
        """A body built here (not the client's) as the bridge gets it, alias applied."""
        model = body.get("model")
        if record is not None and isinstance(model, str) and model in record.models:
            body = dict(body, model=record.models[model])
        return json.dumps(body).encode()

    # --- the routes ---

    def chat(self, request) -> Deferred:
        return self.routed(request, required=True).addCallback(self._chat, request)

    def _chat(self, route: Route, request) -> Deferred:
        return self.read_json_body(request, required=(("model", str), ("messages", list)),
                                   aliases=self._aliases(route)) \
            .addCallback(lambda parsed: route.upstream.chat(request, route, *parsed))

    def forward_chat(self, request, record, body: dict, raw: Body | None = None) -> Deferred:
        """The chat path every chat-shaped request takes (/v1/responses translates into it).

        ``request`` is whatever the answer is written to: the client's request, or a
        translator standing in for it. ``raw`` is the client's body as read_json_body
        gave it (its alias already applied); None: ``body`` is serialised here.
        """
        stream = body.get("stream") is True
        raw = self._serialised(record, body) if raw is None else raw
        return self._forward(request, record, "/v1/chat/completions", raw, sse=stream)

    def images(self, request) -> Deferred:
        return self.routed(request, required=True).addCallback(self._images, request)

    def _images(self, route: Route, request) -> Deferred:
        return self.read_json_body(request, required=(("prompt", str),),
                                   aliases=self._aliases(route)) \
            .addCallback(lambda parsed: route.upstream.images(request, route, *parsed))

    def _model_list(self, request):
        """The upstream's models plus the session's aliases; fires with a list, or with
        bytes (the upstream's error, already set on the request)."""
        def routed(route: Route):
            request.setHeader(b"X-Request-ID", request_id(request).encode())
            upstream: Any = route.upstream
            return upstream.models(request, route)

        return self.routed(request, required=False).addCallback(routed)

    @inlineCallbacks
    def bridge_models(self, request, record):
        upstream = upstream_for(record, self.config)
        rid = request_id(request)
        request.setHeader(b"X-Request-ID", rid.encode())
        response = yield self._send(b"GET", upstream, "/v1/models", None, record, rid)
        body = yield read_capped(response, 16 * 1024 * 1024)
        if response.code >= 300:
            return self._bridge_error(request, upstream, response, body)
        try:
            listing = json.loads(body)
            models = list(listing["data"])
        except (ValueError, KeyError, TypeError, RecursionError):
            self.metrics.upstream_error("BRIDGE_BAD_RESPONSE")
            log.info("bridge {url} sent an unreadable model list", url=upstream.base_url,
                     request_id=rid)
            raise ApiError(502, "BRIDGE_BAD_RESPONSE",
                           f"{upstream.label} sent an unreadable model list",
                           "bridge_error") from None
        if record is not None:
            for alias, target in sorted(record.models.items()):
                models.append({"id": alias, "object": "model", "created": int(record.created_at),
                               "owned_by": f"alias of {target} (session {record.session_name})"})
        return models

    @inlineCallbacks
    def models(self, request):
        models = yield self._model_list(request)
        if isinstance(models, bytes):
            return models
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"object": "list", "data": models}).encode()

    @inlineCallbacks
    def model(self, request, model_id: str):
        """One model of the same list (``models.retrieve`` in both SDKs)."""
        models = yield self._model_list(request)
        if isinstance(models, bytes):
            return models
        for entry in models:
            if isinstance(entry, dict) and entry.get("id") == model_id:
                request.setHeader(b"Content-Type", b"application/json")
                return json.dumps(entry).encode()
        raise ApiError(404, "MODEL_NOT_FOUND",
                       f"no model {model_id!r} in this session's list (GET /v1/models)")

    # --- upstream plumbing ---

    def _send(self, method: bytes, upstream: Upstream, path: str, data: Body | None,
              record, rid: str) -> Deferred:
        """The bridge request; connection failures become our 502/504 envelopes."""
        started = time.monotonic()
        url = upstream.url(path)
        if isinstance(data, FileBody) and not getattr(self.client, "takes_files", False):
            data = data.read()  # treq, a StubTreq: bytes
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
            if failure.check(TimeoutError) or (timed_out and cancelled(failure)):
                code, status, what = "BRIDGE_TIMEOUT", 504, "did not answer in time"
            elif cancelled(failure):
                raise CancelledError()  # the client went away: nothing to report
            elif tls_failed(failure):
                code, status, what = "BRIDGE_TLS_ERROR", 502, (
                    "could not be reached over TLS (is its URL https:// in front of a "
                    "plain-http bridge, or is its certificate wrong?)")
            elif failure.check(ConnectError, DNSLookupError, ConnectionError):
                code, status, what = "BRIDGE_ERROR", 502, "is unreachable"
            else:
                # Anything else the HTTP client can raise (a connection lost while the
                # request was written, a malformed answer, ...) is still the bridge's
                # failure, in the envelope: never Twisted's HTML error page.
                code, status, what = "BRIDGE_ERROR", 502, "failed to answer"
            log.info("bridge {url} {code}: {why}", url=url, code=code, why=why(failure),
                     request_id=rid)
            self.metrics.upstream_error(code)
            raise ApiError(status, code, f"{upstream.label} {what}", "bridge_error")

        return d.addCallbacks(answered, failed)

    def _bridge_error(self, request, upstream: Upstream, response, body: bytes) -> bytes:
        """A bridge error keeps its status, in the envelope; a redirect is a bad answer.

        The bridge's own ``Retry-After`` is a delay we know, so it is passed on.
        """
        status = response.code
        if status < 400:
            log.info("bridge {url} answered with a redirect (HTTP {status})",
                     url=upstream.base_url, status=status, request_id=request_id(request))
            status, payload = 502, {"error": {
                "message": f"{upstream.label} answered with a redirect "
                           f"(HTTP {status}), which the gateway does not follow",
                "type": "bridge_error", "code": "BRIDGE_BAD_RESPONSE"}}
        else:
            try:
                payload = normalize_error(status, body)
            except RecursionError:  # nested past what we parse: not an answer we can read
                status, payload = 502, envelope(f"{upstream.label} answered HTTP {status} with "
                                                "an unreadable error body",
                                                "BRIDGE_BAD_RESPONSE", "bridge_error")
            log.info("bridge {url} answered HTTP {status}", url=upstream.base_url,
                     status=status, request_id=request_id(request))
        payload = redact(payload, (upstream.api_key, self.config.bridge_api_key,
                                   self.config.admin_token))
        code = payload["error"]["code"]
        self.metrics.upstream_error(code)
        note_error(request, code)
        set_status(request, status)
        request.setHeader(b"Content-Type", b"application/json")
        delay = response.headers.getRawHeaders(b"retry-after", [None])[0]
        extra: tuple[tuple[str, str], ...] = ()
        if delay is not None and re.fullmatch(rb"\d{1,6}", delay.strip()):
            extra = (("Retry-After", delay.strip().decode()),)
        set_error_headers(request, code, extra)
        return json.dumps(payload).encode()

    def _stream_closed(self, result):
        self.metrics.stream_closed()
        return result

    def _forward(self, request, record, path: str, data: Body, *, sse: bool) -> Deferred:
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

        finished: Deferred = Deferred(cancel)

        def answered(response):
            if response.code >= 300:
                # Whatever goes wrong in reading it, ``finished`` fires: a client never
                # waits on an error body we could not handle.
                return read_capped(response).addCallback(
                    lambda body: self._bridge_error(request, upstream, response, body)
                ).addCallbacks(done, failed)
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
                              upstream_url=upstream.base_url, label=upstream.label,
                              finished=finished,
                              metrics=self.metrics, sent_at=sent_at)
            relay.append(protocol)
            self.metrics.stream_opened()  # finished fires once, however the relay ends
            finished.addBoth(self._stream_closed)
            response.deliverBody(protocol)

        def done(body):
            if not finished.called:
                finished.callback(body)

        def failed(failure):
            if not finished.called:
                finished.errback(failure)

        pending.addCallbacks(answered, failed)
        return finished


@implementer(IUpstream)
class BridgeUpstream:
    """A session served by an LMArenaBridge over HTTP (its own, or the default one)."""

    kind = "bridge"

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def chat(self, request, route, body: dict, raw: Body | None) -> Deferred:
        return self.proxy.forward_chat(request, route.record, body, raw)

    def images(self, request, route, body: dict, raw: Body | None) -> Deferred:
        raw = self.proxy._serialised(route.record, body) if raw is None else raw
        return self.proxy._forward(request, route.record, "/v1/images/generations", raw,
                                   sse=False)

    def models(self, request, route):
        return self.proxy.bridge_models(request, route.record)
