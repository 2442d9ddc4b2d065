"""The tab upstream: an OpenAI request run as a job by one of the session's tabs.

Here a request becomes a plan: which model, which tab, and whether it continues an
evaluation this gateway answered or starts a fresh one. The answer itself is a
:class:`~lmarena_gateway.tabanswer.TabAnswer`, which leaves as OpenAI chat chunks through
the same Relay the bridge path uses.
"""

from __future__ import annotations

import json
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from . import arena
from .errors import ApiError
from .store.conversations import Conversation
from .tabanswer import TabAnswer
from .tabs import SessionTabs, TabRegistry
from .upstream import IUpstream

log = Logger()


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
