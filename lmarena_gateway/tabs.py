"""The tabs connected to this process, per (domain, session name), and their jobs.

A tab is a logged-in arena.ai page running the session's userscript. It long-polls for
one job at a time, runs the LMArena fetch in the page, and pushes back what it reads.
Jobs are handed out only to a tab that is polling right now (so a tab that was reloaded
or closed never takes one); until then they wait in their session's short queue.

Nothing here speaks HTTP: the channel routes (tabchannel) and the upstream (tabupstream)
call these methods, and tests call them directly with a Clock.
"""

from __future__ import annotations

import itertools
import secrets
from collections import deque
from typing import Any, Iterator

from attrs import define, field
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import Interface

from .arena import ArenaModel
from .errors import ApiError

log = Logger()
# While a job runs the tab pushes at least every 250 ms; this long without one and the
# tab is gone (closed, crashed, or its network dropped).
BUSY_SILENCE = 10.0


class IJobSink(Interface):
    """Who waits for a job's answer (the tab upstream); the registry calls these."""

    def status(code: int, headers: dict) -> None:
        """The arena answered with this status and these few headers."""

    def text(data: str) -> None:
        """More of the body, cut anywhere."""

    def end(error: str | None) -> str | None:
        """The body ended, or (``error``) the fetch in the tab failed. Returns what the
        tab should show its user (a check to solve, a sign-in), if anything."""

    def lost(why: str) -> None:
        """The tab went away before the end; the job is not handed to another tab."""


_job_ids = itertools.count(1)


@define(eq=False)
class Job:
    """One LMArena call to be run by a tab of one session."""

    payload: dict
    sink: Any  # IJobSink
    pinned_tab: str | None = None  # a conversation keeps to the tab that created it
    job_id: str = field(factory=lambda: f"j{next(_job_ids)}-{secrets.token_hex(4)}")
    tab: "Tab | None" = None
    cancelled: bool = False
    finished: bool = False


@define(eq=False)
class Tab:
    tab_id: str
    domain: str
    session_name: str
    connected_at: float
    models: list[ArenaModel] = field(factory=list)
    last_seen: float = 0.0
    waiting: Deferred | None = None  # its open poll: it is idle and listening
    job: Job | None = None
    last_error: str | None = None
    served: int = 0
    _timer: Any = None

    @property
    def busy(self) -> bool:
        return self.job is not None

    def model(self, public_name: str) -> ArenaModel | None:
        return next((m for m in self.models if m.public_name == public_name), None)

    def public(self) -> dict:
        from .sessions import iso

        return {"tab_id": self.tab_id, "connected_since": iso(self.connected_at),
                "busy": self.busy, "models": len(self.models), "served": self.served,
                "last_error": self.last_error}


@define(eq=False)
class SessionTabs:
    domain: str
    session_name: str
    tabs: dict[str, Tab] = field(factory=dict)
    queue: deque = field(factory=deque)

    def idle(self, pinned: str | None) -> Tab | None:
        """A polling tab for a job: its own tab when pinned to one still here, else any."""
        if pinned is not None and pinned in self.tabs:
            tab = self.tabs[pinned]
            return tab if tab.waiting is not None and tab.job is None else None
        return next((t for t in self.tabs.values() if t.waiting is not None and t.job is None),
                    None)

    @property
    def models(self) -> list[ArenaModel]:
        """The models of the session's tabs, in the order they report them."""
        seen: dict[str, ArenaModel] = {}
        for tab in self.tabs.values():
            for model in tab.models:
                seen.setdefault(model.public_name, model)
        return list(seen.values())

    def public(self) -> dict:
        return {"tabs": [t.public() for t in self.tabs.values()],
                "busy": sum(t.busy for t in self.tabs.values()), "queued": len(self.queue)}


class TabRegistry(Service):
    """Every tab of this process; the clock is injected for tests."""

    def __init__(self, clock, *, queue_limit: int = 4, poll_timeout: float = 25.0,
                 heartbeat: float | None = None, metrics=None) -> None:
        self.clock = clock
        self.queue_limit = queue_limit
        self.poll_timeout = poll_timeout
        self.heartbeat = heartbeat if heartbeat is not None else 3 * poll_timeout
        self.metrics = metrics
        self.sessions: dict[tuple[str, str], SessionTabs] = {}

    # --- what the routes and the status page read ---

    def session(self, domain: str, name: str) -> SessionTabs | None:
        """The session's tabs when it has at least one."""
        tabs = self.sessions.get((domain, name))
        return tabs if tabs is not None and tabs.tabs else None

    def all_tabs(self) -> Iterator[Tab]:
        for session in self.sessions.values():
            yield from session.tabs.values()

    def per_domain(self, domains=()) -> dict[str, int]:
        counts = {d: 0 for d in domains}
        for tab in self.all_tabs():
            counts[tab.domain] = counts.get(tab.domain, 0) + 1
        return counts

    def snapshot(self) -> dict[str, dict[str, dict]]:
        """{domain: {name: {"tabs": [...], "busy": n, "queued": n}}}, for /health and people."""
        shown: dict[str, dict[str, dict]] = {}
        for (domain, name), session in sorted(self.sessions.items()):
            if session.tabs:
                shown.setdefault(domain, {})[name] = session.public()
        return shown

    # --- the tab's side ---

    def connect(self, domain: str, name: str, tab_id: str, models: list[ArenaModel]) -> Tab:
        """A tab says hello (on load, after a reload, after the gateway restarted)."""
        session = self.sessions.setdefault((domain, name), SessionTabs(domain, name))
        now = self.clock.seconds()
        tab = session.tabs.get(tab_id)
        if tab is None:
            tab = Tab(tab_id, domain, name, connected_at=now)
            session.tabs[tab_id] = tab
            log.info("tab {tab} connected for {domain}/{name} with {n} models",
                     tab=tab_id, domain=domain, name=name, n=len(models))
        else:
            # The same tab again: it was reloaded. What its old page left open is dead.
            if tab.waiting is not None:
                waiting, tab.waiting = tab.waiting, None
                waiting.callback(None)
            if tab.job is not None:
                self._lose(tab.job, "the tab was reloaded")
        tab.models = list(models)
        self._seen(tab)
        return tab

    def tab(self, domain: str, name: str, tab_id: str) -> Tab | None:
        session = self.sessions.get((domain, name))
        return session.tabs.get(tab_id) if session is not None else None

    def poll(self, tab: Tab, timeout: float) -> Deferred:
        """Fires with the tab's next Job, or None after ``timeout`` seconds."""
        self._seen(tab)
        if tab.job is not None:
            # It asks for work while we think it runs a job: it gave up on that one.
            self._lose(tab.job, "the tab stopped running the request")
        if tab.waiting is not None:
            old, tab.waiting = tab.waiting, None
            old.callback(None)  # one poll per tab: the older one answers "nothing"
        session = self.sessions[(tab.domain, tab.session_name)]
        job = self._next_for(session, tab)
        if job is not None:
            self._start(tab, job)
            return _fired(job)
        timer = None

        def cancelled(_):
            if timer is not None and timer.active():
                timer.cancel()
            if tab.waiting is waiting:
                tab.waiting = None

        waiting: Deferred = Deferred(cancelled)
        tab.waiting = waiting

        def expired():
            if tab.waiting is waiting:
                tab.waiting = None
                waiting.callback(None)

        timer = self.clock.callLater(min(timeout, self.poll_timeout), expired)

        def handed(result):
            if timer.active():
                timer.cancel()
            return result

        return waiting.addCallback(handed)

    def push(self, tab: Tab, job_id: str, message: dict) -> dict:
        """What the tab read for a job; the reply tells it whether to stop."""
        self._seen(tab)
        job = tab.job
        if job is None or job.job_id != job_id:
            return {"cancel": True}  # cancelled and forgotten, or never its job
        if job.cancelled:
            self._release(tab, job)
            return {"cancel": True}
        status = message.get("status")
        if isinstance(status, int) and not isinstance(status, bool):
            headers = message.get("headers")
            job.sink.status(status, headers if isinstance(headers, dict) else {})
        text = message.get("text")
        if isinstance(text, str) and text:
            job.sink.text(text)
        error = message.get("error")
        if isinstance(error, str) and error:
            tab.last_error = error[:300]
        if message.get("done") or (isinstance(error, str) and error):
            self._release(tab, job)
            notice = job.sink.end(error if isinstance(error, str) and error else None)
            if isinstance(notice, str) and notice:
                tab.last_error = notice[:300]
                return {"cancel": False, "problem": notice}
            return {"cancel": False}
        return {"cancel": job.cancelled}

    def disconnect(self, tab: Tab, why: str) -> None:
        """The tab is gone: its job ends with TAB_LOST and is never handed on."""
        session = self.sessions.get((tab.domain, tab.session_name))
        if session is None or session.tabs.get(tab.tab_id) is not tab:
            return
        del session.tabs[tab.tab_id]
        if tab._timer is not None and tab._timer.active():
            tab._timer.cancel()
        if tab.waiting is not None:
            waiting, tab.waiting = tab.waiting, None
            waiting.callback(None)
        if tab.job is not None:
            self._lose(tab.job, why)
        log.info("tab {tab} of {domain}/{name} is gone: {why}", tab=tab.tab_id,
                 domain=tab.domain, name=tab.session_name, why=why)
        if not session.tabs:
            # Nothing can serve what waits: tell each waiting client now.
            while session.queue:
                session.queue.popleft().sink.lost(
                    f"the last tab of session {tab.session_name} on {tab.domain} went away")
            del self.sessions[(tab.domain, tab.session_name)]

    # --- the client's side ---

    def submit(self, session: SessionTabs, payload: dict, sink, *,
               pinned: str | None = None) -> Job:
        """Run ``payload`` on an idle tab of the session, or queue it; 429 when full."""
        job = Job(payload, sink, pinned_tab=pinned)
        tab = session.idle(pinned)
        if tab is not None and tab.waiting is not None:
            waiting, tab.waiting = tab.waiting, None
            self._start(tab, job)
            waiting.callback(job)
            return job
        if len(session.queue) >= self.queue_limit:
            raise ApiError(429, "SESSION_BUSY",
                           f"every tab of session {session.session_name} is answering and "
                           f"{len(session.queue)} requests wait (--tab-queue); retry shortly, "
                           "or open the script in another logged-in window", "rate_limit_error")
        session.queue.append(job)
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: a queued job is dropped, a running one stopped by the tab
        (its next push is answered "cancel")."""
        if job.finished:
            return
        job.cancelled = True
        if job.tab is None:
            for session in self.sessions.values():
                if job in session.queue:
                    session.queue.remove(job)
            job.finished = True

    # --- inside ---

    def _next_for(self, session: SessionTabs, tab: Tab) -> Job | None:
        for job in session.queue:
            if job.pinned_tab in (None, tab.tab_id) or job.pinned_tab not in session.tabs:
                session.queue.remove(job)
                return job
        return None

    def _start(self, tab: Tab, job: Job) -> None:
        tab.job, job.tab = job, tab
        tab.served += 1
        self._arm(tab)

    def _release(self, tab: Tab, job: Job) -> None:
        job.finished = True
        if tab.job is job:
            tab.job = None
        self._arm(tab)

    def _lose(self, job: Job, why: str) -> None:
        tab = job.tab
        if tab is not None:
            tab.last_error = why
            self._release(tab, job)
        if not job.cancelled:
            job.sink.lost(why)

    def _seen(self, tab: Tab) -> None:
        tab.last_seen = self.clock.seconds()
        self._arm(tab)

    def _arm(self, tab: Tab) -> None:
        """(Re)start the tab's silence timer: shorter while it runs a job."""
        limit = BUSY_SILENCE if tab.job is not None else self.heartbeat
        due = max(0.0, tab.last_seen + limit - self.clock.seconds())
        if tab._timer is not None and tab._timer.active():
            tab._timer.reset(due)
        else:
            tab._timer = self.clock.callLater(due, self._silent, tab)

    def _silent(self, tab: Tab) -> None:
        limit = BUSY_SILENCE if tab.job is not None else self.heartbeat
        self.disconnect(tab, f"no word from the tab for {limit:g} s")

    def stopService(self):
        for tab in list(self.all_tabs()):
            self.disconnect(tab, "the gateway is stopping")
        return super().stopService()


def _fired(value) -> Deferred:
    d: Deferred = Deferred()
    d.callback(value)
    return d
