"""The state the status page shows, gathered into the documented /status.json shape.

The HTML page is rendered from this same dictionary, so the page and its JSON twin
cannot disagree. Sources are handed in; the tab registry plugs in through ITabSource.
"""

from __future__ import annotations

import resource
from urllib.parse import urlsplit, urlunsplit

from attrs import frozen
from zope.interface import Interface, implementer

from .. import __version__
from ..bridge import Upstream, upstream_for
from ..errors import ApiError
from ..sessions import iso

MAX_SESSIONS_SHOWN = 500


@frozen
class TabView:
    """One connected tab, as the page shows it."""

    tab_id: str
    connected_since: float
    busy: bool = False
    last_error: str | None = None
    last_error_at: float | None = None


@frozen
class SessionTabsView:
    tabs: tuple[TabView, ...]
    queued: int = 0


class ITabSource(Interface):
    """Where the page learns which tabs serve which sessions (tab mode)."""

    def tabs_of(domain: str, name: str) -> SessionTabsView | None:
        """The session's connected tabs and queue, or None when it has none."""


@implementer(ITabSource)
class NoTabs:
    """Before tab mode, or when it is off: every session is served by its bridge."""

    def tabs_of(self, domain: str, name: str) -> SessionTabsView | None:
        return None


@implementer(ITabSource)
class RegistryTabs:
    """Tab mode's registry as the page sees it: a session's own tabs, else the tabs of a
    paired domain that serve it (``--tab-pairs``, as the proxy routes requests)."""

    def __init__(self, registry, config) -> None:
        self.registry = registry
        self.config = config

    def tabs_of(self, domain: str, name: str) -> SessionTabsView | None:
        for tab_domain in (domain, *self.config.tab_pairs_for(domain)):
            session = self.registry.session(tab_domain, name)
            if session is not None:
                return SessionTabsView(tuple(
                    TabView(tab.tab_id, tab.connected_at, busy=tab.busy,
                            last_error=tab.last_error)
                    for tab in session.tabs.values()), queued=len(session.queue))
        return None


def shown_url(url: str) -> str:
    """A bridge URL without user info, query or fragment: nothing secret on the page."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _time(seconds: float | None) -> str | None:
    return iso(seconds) if seconds else None


def memory() -> dict:
    """Resident memory now (Linux /proc) and at its peak; reading procfs does not block."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        with open("/proc/self/statm", "rb") as f:
            rss = int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        rss = None
    return {"rss_bytes": rss, "peak_rss_bytes": max(peak, rss or 0)}


class StatusReport:
    """Everything the page shows; ``gather()`` returns it as /status.json's shape."""

    def __init__(self, config, store, clock, *, activity, prober=None, pruner=None,
                 tabs=None, started_at: float | None = None) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.activity = activity
        self.prober = prober
        self.pruner = pruner
        self.tabs = tabs if tabs is not None else NoTabs()
        self.started_at = clock.seconds() if started_at is None else started_at

    def gather(self) -> dict:
        now = self.clock.seconds()
        records = sorted(self.store.records(), key=lambda r: r.key)
        known = {(r.domain, r.session_name) for r in records}
        for key in [k for k in self.activity.last_errors if k not in known]:
            del self.activity.last_errors[key]  # deleted elsewhere (CLI, pruning, another instance)
        return {
            "generated_at": iso(now),
            "gateway": self._gateway(now),
            "bridges": self._bridges(),
            "sessions_total": len(records),
            "sessions": [self._session(r) for r in records[:MAX_SESSIONS_SHOWN]],
        }

    def _gateway(self, now: float) -> dict:
        store = dict(self.store.health())
        last = getattr(self.pruner, "last", None)
        store["last_prune"] = None if last is None else {
            "at": iso(last.at), "ok": last.ok, "removed": last.removed}
        window = self.activity.window.totals()
        return {
            "version": __version__,
            "started_at": iso(self.started_at),
            "uptime_seconds": int(now - self.started_at),
            "memory": memory(),
            "open_streams": self.activity.open_streams,
            "last_5_minutes": {"requests": window.requests, "errors": window.errors,
                               "client_errors": window.client_errors},
            "store": store,
            "admin": "token" if self.config.admin_token else "local-only",
        }

    def _bridges(self) -> list[dict]:
        if self.prober is None:
            return []
        from .probe import bridge_of

        default = bridge_of(upstream_for(None, self.config))
        shown = []
        for upstream, sessions in sorted(self.prober.bridges().items(),
                                         key=lambda item: (item[0] != default, item[0].base_url)):
            shown.append({"url": shown_url(upstream.base_url), "default": upstream == default,
                          "has_api_key": upstream.api_key is not None, "sessions": sessions,
                          "probe": self._probe(upstream)})
        return shown

    def _probe(self, upstream) -> dict | None:
        result = self.prober.result_for(upstream) if self.prober is not None else None
        if result is None:
            return None
        return {"ok": result.ok, "checked_at": iso(result.checked_at), "since": iso(result.since),
                "code": result.code, "detail": result.detail, "status": result.status,
                "latency_ms": result.latency_ms}

    def _session(self, record) -> dict:
        key = (record.domain, record.session_name)
        open_streams = self.activity.open.get(key, 0)
        last_error = self.activity.last_errors.get(key)
        errors = [] if last_error is None else [(last_error.at, last_error.code)]
        upstream: Upstream | None
        probe: dict | None
        try:
            upstream = upstream_for(record, self.config)
        except ApiError as e:
            upstream, probe = None, {"ok": False, "code": e.code}
        else:
            probe = self._probe(upstream)
        view = self.tabs.tabs_of(*key)
        shown: dict[str, object] = {
            "domain": record.domain,
            "session_name": record.session_name,
            "served_by": "tab" if view is not None and view.tabs else "bridge",
            "bridge": shown_url(upstream.base_url) if upstream is not None else None,
            "bridge_answered": None if probe is None else probe["ok"],
            "last_used_at": _time(record.last_used_at),
            "open_streams": open_streams,
            "tabs": [],
        }
        if view is not None and view.tabs:
            tabs: tuple[TabView, ...] = view.tabs
            shown.update(connected=True,
                         connected_since=iso(min(t.connected_since for t in tabs)),
                         busy=any(t.busy for t in tabs) or open_streams > 0,
                         queue_length=view.queued)
            shown["tabs"] = [{"tab_id": t.tab_id, "connected_since": iso(t.connected_since),
                              "busy": t.busy, "last_error": t.last_error} for t in tabs]
            errors += [(t.last_error_at or 0.0, t.last_error) for t in tabs if t.last_error]
        else:
            shown.update(connected=shown["bridge_answered"],
                         connected_since=probe.get("since") if probe else None,
                         busy=open_streams > 0, queue_length=None)
        if errors:
            at, code = max(errors)
            shown["last_error"] = {"code": code, "at": _time(at)}
        else:
            shown["last_error"] = None
        return shown


def shape(report: dict) -> str:
    """Which rows the page has; the page's script reloads when this changes (see page.js)."""
    sessions = "|".join(
        f"{s['domain']}/{s['session_name']}:{','.join(t['tab_id'] for t in s['tabs'])}"
        for s in report["sessions"])
    bridges = "|".join(f"{b['url']}:{int(b['has_api_key'])}" for b in report["bridges"])
    return f"{sessions}#{bridges}"
