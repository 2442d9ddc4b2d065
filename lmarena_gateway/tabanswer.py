"""One tab-mode answer on its way to the client: the job's sink.

The tab pushes the arena's answer lines; a :class:`TabAnswer` turns them into chat
completion chunks (or one completion), retries before the first byte, maps refusals to
their codes, and settles the conversation map when it ends. Which tab and which
evaluation it runs on is decided by :mod:`lmarena_gateway.tabupstream`.
"""


from __future__ import annotations

import json
import secrets
import time
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from zope.interface import implementer

from . import arena
from .errors import ApiError, set_error_headers
from .refusals import refusal
from .relay import Relay, set_status, sse_error
from .tabs import IJobSink

log = Logger()

if TYPE_CHECKING:
    from .tabupstream import TabUpstream


class Chunks:
    """OpenAI ``chat.completion.chunk`` events of one answer."""

    def __init__(self, model: str, created: int) -> None:
        self.model = model
        self.created = created
        self.id = f"chatcmpl-{secrets.token_hex(12)}"
        self.started = False

    def event(self, delta: dict, finish: str | None = None, **extra) -> bytes:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.model, "choices": [{"index": 0, "delta": delta,
                                                   "finish_reason": finish}], **extra}
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    def delta(self, **fields) -> bytes:
        if not self.started:
            self.started = True
            fields = {"role": "assistant", **fields}
        return self.event(fields)

    def usage(self, usage: dict) -> bytes:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.model, "choices": [], "usage": usage}
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"


# Refusals a person fixes in the tab itself: the tab's badge shows them too.
TAB_NOTICES = {"ARENA_CHALLENGE", "ARENA_NOT_SIGNED_IN", "ARENA_RECAPTCHA_FAILED",
               "ARENA_RATE_LIMITED"}


def image_markdown(url: str) -> str:
    return f"\n\n![image]({url})\n\n"


@implementer(IJobSink, IPushProducer)
class TabAnswer:
    """One request's job: what the tab reports becomes the client's answer.

    It is also the Relay's transport (the producer registered with the request), so a
    client that goes away stops the job in the tab.
    """

    def __init__(self, upstream: "TabUpstream", request, *, kind: str, model: str,
                 stream: bool, include_usage: bool, finished: Deferred) -> None:
        self.upstream = upstream
        self.config = upstream.config
        self.request = request
        self.kind = kind  # "chat" or "images"
        self.stream = stream and kind == "chat"
        self.include_usage = include_usage
        self.finished = finished
        self.parser = arena.LineParser()
        self.chunks = Chunks(model, int(upstream.clock.seconds()))
        self.session_name = ""
        self.domain = ""
        self.job: Any = None
        self.relay: Relay | None = None
        self.text_parts: list[str] = []
        self.reasoning_parts: list[str] = []
        self.images: list[str] = []
        self.sources = arena.Sources()
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.failed: tuple[str, str] | None = None  # (code, message) of an arena error
        self.done = False
        self.refused: tuple[int, dict] | None = None  # the arena's error status, headers
        self.tabs: Any = None  # the SessionTabs the job runs on (for retries)
        self.payload_for: Any = None  # () -> a new job payload with fresh ids
        self.retries = {"recaptcha": 1, "empty": 2}  # what may still be tried again
        # A continuation: what to run instead, once, when the arena will not continue it
        self.afresh: Any = None  # () -> payload of a fresh evaluation with the packed history
        self.pinned: str | None = None  # the tab the job must run on (its conversation's)
        self.settled: Any = None  # (outcome, answer): answered, untouched, failed, fallback
        self.error_body: list[str] = []
        self.notice: str | None = None  # what the tab's badge should say about a refusal
        self.evaluation_id: str | None = None  # of the latest attempt
        self.sent_at = time.monotonic()
        self._deadline = upstream.clock.callLater(self.config.stream_idle_timeout, self._timeout)
        # A stream opens with its first chunk, so that a refusal, an empty answer or a model
        # error before it is still an HTTP status the client can act on. A client is not
        # left without headers longer than one keep-alive interval, though: after that the
        # stream opens anyway and keep-alives flow.
        self._opener = None
        if self.stream and self.config.keepalive > 0:
            self._opener = upstream.clock.callLater(self.config.keepalive, self._open_early)

    # --- IJobSink: what the tab reports ---

    def status(self, code: int, headers: dict) -> None:
        self._alive()
        if code >= 300:
            self.refused = (code, headers)  # what it means shows in the body: read it first

    def text(self, data: str) -> None:
        self._alive()
        if self.refused is not None:
            if sum(map(len, self.error_body)) < 64 * 1024:
                self.error_body.append(data)
            return
        self._events(self.parser.feed(data))

    def end(self, error: str | None) -> str | None:
        """The end of the body; returns what the tab's badge should say, if anything."""
        if self.done:
            return None
        self.notice = None
        if self.refused is not None:
            self._refused(*self.refused, "".join(self.error_body))
            return self.notice
        if error is None:
            self._events(self.parser.close())
        if self.done:
            return None
        if error is not None:
            self._fail(502, "TAB_FETCH_FAILED", f"the tab of session {self.session_name} could "
                       f"not finish the arena request: {error}")
        elif self.failed is not None:
            self._fail(502, *self.failed)
        else:
            self._complete()
        return None

    def lost(self, why: str) -> None:
        if not self.done:
            self._fail(502, "TAB_LOST", f"the tab of session {self.session_name} on "
                       f"{self.domain} went away before the answer was complete ({why}); "
                       "the request was not sent to another tab")

    # --- IPushProducer: the Relay's view of the job ---

    def pauseProducing(self) -> None:
        pass  # the tab pushes at its own pace; a slow client is buffered by the request

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        # The client's connection is going (or the relay gave up): stop the tab. The
        # response itself is left to the relay and to Klein's cancel of ``finished``.
        self.done = True
        self._deadline_off()
        self._opener_off()
        self.cancel_job()
        self._settle(self._untouched_or("failed"))

    # --- the answer ---

    def _events(self, events) -> None:
        for event in events:
            if self.done or self.failed is not None:
                return
            if event.side != "a":
                continue  # direct mode answers on side a only
            if event.kind == "text":
                self._emit(content=event.text)
            elif event.kind == "reasoning":
                self._emit(reasoning_content=event.text)
            elif event.kind == "image":
                self.images.append(event.text)
                if self.kind == "chat":
                    self._emit(content=image_markdown(event.text))
            elif event.kind == "citation":
                self.sources.add(event.data)
            elif event.kind == "error":
                self.failed = ("ARENA_MODEL_ERROR", f"LMArena: {event.text}")
                self._fail(502, *self.failed)
            elif event.kind == "finish":
                self.finish_reason = arena.FINISH_REASONS.get(event.text, "stop")
                self.usage = arena.usage_of(event.data)

    def _emit(self, **delta) -> None:
        for name, value in delta.items():
            (self.text_parts if name == "content" else self.reasoning_parts).append(value)
        if self.stream:
            self._start_stream()
        if self.relay is not None:
            self.relay.dataReceived(self.chunks.delta(**delta))

    def _start_stream(self) -> None:
        self._opener_off()
        if self.relay is not None or self.done:
            return
        self._deadline_off()
        request = self.request
        set_status(request, 200)
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Accel-Buffering", b"no")
        self.relay = Relay(request, self.upstream.clock, sse=True,
                           idle_timeout=self.config.stream_idle_timeout,
                           keepalive=self.config.keepalive,
                           upstream_url=f"tab:{self.domain}/{self.session_name}",
                           finished=self.finished, metrics=self.upstream.metrics,
                           sent_at=self.sent_at, label=self._source(),
                           codes=("TAB_TIMEOUT", "TAB_LOST"))
        self.upstream.metrics.stream_opened()
        self.finished.addBoth(self._closed)
        self.relay.makeConnection(self)

    def _open_early(self) -> None:
        """No chunk for a keep-alive interval: open the stream, with a keep-alive at once so
        the client (and any proxy) sees bytes now."""
        self._start_stream()
        if self.relay is not None and not self.done:
            self.request.write(b": keep-alive\n\n")

    def _closed(self, result):
        self.upstream.metrics.stream_closed()
        return result

    def _source(self) -> str:
        return f"the tab of session {self.session_name} on {self.domain}"

    def _complete(self) -> None:
        if self.sources.found:
            # the search model's citations, as the last of the text (see docs/tab-mode.rst)
            self._emit(content=self.sources.markdown())
        if not (self.text_parts or self.reasoning_parts or self.images):
            # 200 with no content: LMArena does this now and then; fresh ids, twice more
            if self._again("empty"):
                return
            self._fail(502, "ARENA_EMPTY_ANSWER", "LMArena answered with nothing, three times; "
                       "retry later or pick another model")
            return
        self.done = True
        self._deadline_off()
        self._opener_off()
        self._settle("answered")
        reason = self.finish_reason or "stop"
        if self.relay is not None:
            tail = self.chunks.event({}, reason)
            if self.include_usage:
                tail += self.chunks.usage(self.usage or {"prompt_tokens": 0, "completion_tokens": 0,
                                                         "total_tokens": 0})
            self.relay.dataReceived(tail + b"data: [DONE]\n\n")
            self.relay.connectionLost(Failure(ResponseDone()))
            return
        if self.kind == "images":
            body = {"created": self.chunks.created, "data": [{"url": u} for u in self.images]}
            if not self.images:
                self._fail(502, "ARENA_EMPTY_ANSWER", "LMArena answered without an image")
                return
        else:
            message = {"role": "assistant", "content": "".join(self.text_parts)}
            if self.reasoning_parts:
                message["reasoning_content"] = "".join(self.reasoning_parts)
            body = {"id": self.chunks.id, "object": "chat.completion",
                    "created": self.chunks.created, "model": self.chunks.model,
                    "choices": [{"index": 0, "message": message, "finish_reason": reason}],
                    "usage": self.usage or arena.usage_of({})}
        # Written through ``request`` as the relay writes (it may be a translator, as for
        # /v1/responses), not handed to Klein as the route's result.
        set_status(self.request, 200)
        self.request.setHeader(b"Content-Type", b"application/json")
        self.request.write(json.dumps(body).encode())
        self.request.finish()
        if not self.finished.called:
            self.finished.callback(None)

    def _again(self, why: str) -> bool:
        """Run the request once more with fresh ids (and a fresh token), if that is still
        allowed: only before the first chunk reached the client."""
        if self.retries.get(why, 0) <= 0 or self.chunks.started or self.payload_for is None:
            return False
        self.retries[why] -= 1
        self.upstream.metrics.upstream_error(f"ARENA_{why.upper()}_RETRIED")
        log.info("tab {session}@{domain}: retrying after {why}", session=self.session_name,
                 domain=self.domain, why=why)
        self._resubmit()
        return True

    def _start_afresh(self, reason: str) -> bool:
        """The arena will not continue the conversation (another account holds the tab now,
        or it has feedback): once, a fresh evaluation carrying the packed history, on any
        tab. The client is told nothing of it; the metric counts it."""
        if self.afresh is None or self.chunks.started:
            return False
        self.upstream.metrics.conversation_fallback(reason)
        log.info("tab {session}@{domain}: the arena would not continue the conversation "
                 "({reason}); starting a fresh one", session=self.session_name,
                 domain=self.domain, reason=reason)
        self._settle("fallback")
        self.payload_for, self.afresh, self.pinned = self.afresh, None, None
        self._resubmit()
        return True

    def _resubmit(self) -> None:
        self.parser = arena.LineParser()
        self.refused, self.error_body = None, []
        self.finish_reason, self.usage, self.failed = None, None, None
        self.text_parts, self.reasoning_parts, self.images = [], [], []
        self.sources = arena.Sources()
        try:
            self.job = self.upstream.registry.submit(self.tabs, self.payload_for(), self,
                                                     pinned=self.pinned)
        except ApiError as e:
            self._fail(e.status, e.code, e.message)

    def _refused(self, code: int, headers: dict, body: str) -> None:
        """The arena said no: an HTTP error, or an event when the stream has started."""
        found = refusal(code, headers, body, self.session_name, self.domain)
        if found.retry == "recaptcha" and self._again("recaptcha"):
            return
        if found.retry == "fresh" and self._start_afresh(
                "not_owner" if code == 401 else "has_feedback"):
            return
        if self.relay is None:
            for name, value in found.headers.items():
                self.request.setHeader(name.encode(), value.encode())
        if found.code in TAB_NOTICES:
            self.notice = found.message  # a person has to act in that tab: its badge says so
        self._fail(found.status, found.code, found.message)

    def _fail(self, status: int, code: str, message: str) -> None:
        if self.done:
            return
        self.done = True
        self._deadline_off()
        self._opener_off()
        self.upstream.metrics.upstream_error(code)
        self.cancel_job()
        self._settle(self._untouched_or("failed"))
        if self.relay is not None:
            self.relay.dataReceived(sse_error(message, code, "upstream_error"))
            self.relay.connectionLost(Failure(ResponseDone()))
            return
        kind = "invalid_request_error" if status < 500 and status != 429 else "upstream_error"
        if status == 429:
            kind = "rate_limit_error"
        body = json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()
        set_error_headers(self.request, code)
        self._reply(status, body)

    def _reply(self, status: int, body: bytes) -> None:
        set_status(self.request, status)
        self.request.setHeader(b"Content-Type", b"application/json")
        if not self.finished.called:
            self.finished.callback(body)

    def _alive(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.reset(self.config.stream_idle_timeout)

    def _deadline_off(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()

    def _opener_off(self) -> None:
        if self._opener is not None and self._opener.active():
            self._opener.cancel()

    def _timeout(self) -> None:
        self._fail(504, "TAB_TIMEOUT", f"{self._source()} sent nothing for "
                   f"{self.config.stream_idle_timeout:g} s")

    def cancel_job(self) -> None:
        if self.job is not None:
            self.upstream.registry.cancel(self.job)

    def _untouched_or(self, outcome: str) -> str:
        """The outcome, or untouched when the arena surely took nothing of this turn: the
        job never reached a tab, or the arena answered an HTTP error."""
        started = self.job is not None and self.job.tab is not None
        return "untouched" if self.refused is not None or not started else outcome

    def _settle(self, outcome: str) -> None:
        settled = self.settled
        if outcome != "fallback":
            self.settled = None  # once: the first outcome is the one that counts
        if settled is not None:
            settled(outcome, self)

    @property
    def answer_text(self) -> str:
        """The assistant's ``content`` as the client got it, and will send it back."""
        return "".join(self.text_parts)

    def cancel(self) -> None:
        """The client went away."""
        self.done = True
        self._deadline_off()
        self._opener_off()
        self.cancel_job()
        self._settle(self._untouched_or("failed"))
        if self.relay is not None:
            self.relay.stop()
