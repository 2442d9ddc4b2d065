"""The tab upstream: an OpenAI request run as a job by one of the session's tabs.

The tab hands back LMArena's raw answer; :mod:`arena` parses it here and the answer
leaves as OpenAI chat chunks through the same :class:`Relay` the bridge path uses, so
keep-alives, the idle timeout, the request id and the metrics are one code path.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from attrs import frozen
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
from .store.conversations import Conversation
from .tabs import IJobSink, SessionTabs, TabRegistry
from .upstream import IUpstream

log = Logger()


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


@frozen
class Plan:
    """How one chat request runs: a continuation of a known evaluation, or a fresh one."""

    content: str  # what the user message carries
    evaluation_id: str | None = None  # continue this evaluation (post-to-evaluation)
    pinned: str | None = None  # on this tab: the one that holds the conversation
    history: str | None = None  # the digest of the history it continues
    conversation: Conversation | None = None
    packed: Any = None  # () -> the packed history, should the arena refuse to continue


@implementer(IUpstream)
class TabUpstream:
    """Serves a session from its tabs.

    With a ``store``, conversations continue (docs/tab-mode.rst): a history this gateway
    answered continues its evaluation on the tab that holds it; anything else is a fresh
    evaluation carrying the packed history.
    """

    kind = "tab"

    def __init__(self, registry: TabRegistry, config, clock, metrics, store=None) -> None:
        self.registry = registry
        self.config = config
        self.clock = clock
        self.metrics = metrics
        self.store = store
        # Histories being continued right now: a second request with the same history
        # must not continue an evaluation that is about to move on under it.
        self._continuing: set[tuple[str, str, str]] = set()

    def _model(self, tabs: SessionTabs, record, requested) -> arena.ArenaModel:
        name = requested
        if record is not None and isinstance(requested, str):
            name = record.models.get(requested, requested)
        for model in tabs.models:
            if model.public_name == name:
                return model
        offered = ", ".join(sorted(m.public_name for m in tabs.models)) or "none yet"
        raise ApiError(404, "MODEL_NOT_FOUND",
                       f"the tab of session {tabs.session_name} on {tabs.domain} offers no "
                       f"model {name!r}; it offers: {offered}")

    # --- conversations ---

    def _plan(self, tabs: SessionTabs, model: arena.ArenaModel,
              turns: list[arena.Turn]) -> Plan:
        """Continue when the history (all before the last user message) is exactly one
        this gateway answered in this session, with this model, on a tab still here."""
        history, rest = arena.split_history(turns)
        if self.store is None or not history or len(rest) != 1:
            return Plan(arena.pack(turns))
        digest = arena.history_digest(history)
        known = self.store.conversation(tabs.domain, tabs.session_name, digest)
        if (known is None or known.model_id != model.id or known.tab_id not in tabs.tabs
                or (tabs.domain, tabs.session_name, digest) in self._continuing):
            return Plan(arena.pack(turns))
        return Plan(arena.pack(rest), known.evaluation_id, known.tab_id, digest, known,
                    packed=lambda: arena.pack(turns))

    def _settled(self, tabs: SessionTabs, model: arena.ArenaModel, turns: list[arena.Turn],
                 plan: Plan):
        """What the end of an answer means for the conversation map."""
        where = (tabs.domain, tabs.session_name)
        history = plan.history

        def settled(outcome: str, answer: TabAnswer) -> None:
            nonlocal history
            if history is not None:
                self._continuing.discard((*where, history))
            if outcome == "answered" and answer.evaluation_id and answer.job is not None:
                tab = answer.job.tab
                now = self.clock.seconds()
                continued = plan.conversation if answer.evaluation_id == plan.evaluation_id else None
                conversation = Conversation(
                    answer.evaluation_id, tab.tab_id if tab is not None else "", model.id,
                    continued.created_at if continued is not None else now, now)
                answered = arena.history_digest(
                    [*turns, arena.Turn("assistant", answer.answer_text)])
                self._store_call(self.store.remember_conversation, *where, answered,
                                 conversation, replaces=history)
            elif history is not None and outcome in ("failed", "fallback"):
                # The arena may hold part of this turn now (or the evaluation is not ours
                # any more): that history no longer matches what it holds.
                self._store_call(self.store.forget_conversation, *where, history)
            if outcome == "fallback":
                history = None

        return settled

    def _store_call(self, method, *args, **kwargs) -> None:
        def failed(failure):
            log.failure("conversation map: {method} failed", failure, method=method.__name__)

        method(*args, **kwargs).addErrback(failed)

    def _run(self, request, tabs: SessionTabs, *, kind: str, model: arena.ArenaModel,
             plan: Plan, stream: bool, include_usage: bool, requested: str,
             turns: list[arena.Turn] | None = None) -> Deferred:
        answer: list[TabAnswer] = []

        def payload(content: str, evaluation_id: str | None) -> dict:
            # each attempt has fresh ids; the tab mints a fresh token for each
            path, body = arena.request_body(model_id=model.id, content=content,
                                            modality=model.modality,
                                            evaluation_id=evaluation_id)
            if answer:
                answer[0].evaluation_id = body["id"]
            return {"url": path, "method": "POST",
                    "headers": {"Content-Type": "text/plain;charset=UTF-8"},
                    "body": json.dumps(body), "recaptcha": {"action": "chat_submit",
                                                            "field": "recaptchaV3Token"}}

        def afresh() -> dict:
            return payload(plan.packed(), None)

        finished: Deferred = Deferred(lambda _: answer[0].cancel() if answer else None)
        sink = TabAnswer(self, request, kind=kind, model=requested, stream=stream,
                         include_usage=include_usage, finished=finished)
        sink.session_name, sink.domain = tabs.session_name, tabs.domain
        sink.tabs = tabs
        sink.payload_for = lambda: payload(plan.content, plan.evaluation_id)
        if plan.evaluation_id is not None:
            sink.afresh, sink.pinned = afresh, plan.pinned
        answer.append(sink)
        try:
            sink.job = self.registry.submit(tabs, sink.payload_for(), sink, pinned=sink.pinned)
        except ApiError as e:
            sink.done = True
            sink._deadline_off()
            sink._opener_off()
            if e.code == "SESSION_BUSY":
                request.setHeader(b"Retry-After", b"5")
            raise
        if turns is not None and self.store is not None:
            if plan.history is not None:
                self._continuing.add((tabs.domain, tabs.session_name, plan.history))
            sink.settled = self._settled(tabs, model, turns, plan)
            self.metrics.conversation_started(
                "continued" if plan.evaluation_id is not None else "fresh")
        return finished

    # --- IUpstream ---

    def chat(self, request, route, body: dict, raw: bytes = b"") -> Deferred:
        tabs = route.tabs
        model = self._model(tabs, route.record, body["model"])
        turns = arena.turns_of(body["messages"])
        plan = self._plan(tabs, model, turns)
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return self._run(request, tabs, kind="chat", model=model, plan=plan,
                         stream=body.get("stream") is True, include_usage=include_usage,
                         requested=body["model"], turns=turns)

    def images(self, request, route, body: dict, raw: bytes = b"") -> Deferred:
        tabs = route.tabs
        requested = body.get("model")
        if not isinstance(requested, str) or not requested:
            image_models = [m for m in tabs.models if m.modality == "image"]
            if not image_models:
                raise ApiError(404, "MODEL_NOT_FOUND", "the tab offers no image model")
            requested = image_models[0].public_name
        model = self._model(tabs, route.record, requested)
        return self._run(request, tabs, kind="images", model=model,
                         plan=Plan(body["prompt"]), stream=False, include_usage=False,
                         requested=requested)

    def models(self, request, route) -> list[dict]:
        tabs = route.tabs
        record = route.record
        created = int(min(t.connected_at for t in tabs.tabs.values()))
        listing = [m.listing(created) for m in tabs.models]
        if record is not None:
            for alias, target in sorted(record.models.items()):
                listing.append({"id": alias, "object": "model", "created": created,
                                "owned_by": f"alias of {target} (session {record.session_name})"})
        return listing
