"""The status page as HTML: twisted.web.template over page.xhtml, which escapes every value.

Each value is formatted by ``fmt``; page.js has the same formats, so a refresh from
/status.json writes what a reload would. Keep the two in step.
"""

from __future__ import annotations

from datetime import datetime, timezone
from importlib.resources import files

from twisted.python.filepath import FilePath
from twisted.web.template import Element, Tag, XMLFile, flattenString, renderer, tags

from ..sessions import parse_time
from .gather import MAX_SESSIONS_SHOWN, shape

HERE = files("lmarena_gateway.status")
DOCTYPE = b"<!DOCTYPE html>\n"
SECURITY_HEADERS = {
    b"Content-Security-Policy": b"default-src 'none'; script-src 'self'; style-src 'self'; "
                                b"img-src 'self'; connect-src 'self'; form-action 'self'; "
                                b"frame-ancestors 'none'; base-uri 'none'",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"same-origin",
    b"Cache-Control": b"no-store",
}


def asset(name: str) -> bytes:
    return (HERE / name).read_bytes()


def _seconds_between(then: str, now: str) -> float:
    return parse_time(now) - parse_time(then)


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 1:
        return "just now"
    return f"{_span(seconds)} ago"


def _span(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def fmt(kind: str, value, now: str) -> tuple[str, str | None]:
    """(text, state) for one value; state is ok, bad, warn or unknown (the CSS colours)."""
    if kind == "int":
        return ("—" if value is None else str(value)), None
    if kind == "count":
        return str(value), "bad" if value else "ok"
    if kind == "text":
        return ("—" if value is None else str(value)), None
    if kind == "error":
        return ("none" if value is None else str(value)), None if value is None else "bad"
    if kind == "ago":
        return ("never" if value is None else _ago(_seconds_between(value, now))), None
    if kind == "since":
        return ("" if value is None else f"for {_span(_seconds_between(value, now))}"), None
    if kind == "clock":
        return datetime.fromtimestamp(parse_time(value), timezone.utc).strftime("%H:%M:%S UTC"), None
    if kind == "duration":
        return _span(value), None
    if kind == "bytes":
        return ("—" if value is None else f"{value / 1048576:.1f} MiB"), None
    if kind == "ms":
        return ("—" if value is None else f"{value:.1f} ms"), None
    if kind == "probe":
        if value is None:
            return "not probed yet", "unknown"
        if value["ok"]:
            return "yes", "ok"
        detail = value.get("detail")
        return f"no: {value['code']}" + (f" ({detail})" if detail else ""), "bad"
    if kind == "connected":
        if value is None:
            return "not probed yet", "unknown"
        return ("yes", "ok") if value else ("no", "bad")
    if kind == "busy":
        return ("busy", "warn") if value else ("idle", None)
    if kind == "queue":
        return ("" if value is None else f"queue {value}"), None
    if kind == "status":
        return str(value), "ok" if value == "ok" else "bad"
    raise ValueError(f"no format {kind!r}")


def action_form(action: str, label: str, question: str, fields: dict, csrf: str, *,
                danger: bool = False, confirmed: bool = False):
    """A POST form with the CSRF token; page.js asks ``question`` before it goes.

    Without JavaScript the action answers with a page asking again (``confirmed``).
    """
    where = action if confirmed else f"status/{action}"  # from /status/ACTION or /status
    return tags.form(method="post", action=where, **{"data-confirm": question})(
        tags.input(type="hidden", name="csrf", value=csrf),
        *[tags.input(type="hidden", name=k, value=v) for k, v in fields.items()],
        tags.input(type="hidden", name="confirm", value="yes" if confirmed else ""),
        tags.button(label, type="submit", **{"class": "danger" if danger else "plain"}))


class StatusPage(Element):
    loader = XMLFile(FilePath(str(HERE / "page.xhtml")))  # type: ignore[assignment]

    def __init__(self, report: dict, csrf: str) -> None:
        super().__init__()
        self.report = report
        self.csrf = csrf
        self.now = report["generated_at"]

    def _cell(self, tag, slot: str, kind: str, value, state_slot: str | None = None):
        text, state = fmt(kind, value, self.now)
        tag.fillSlots(**{slot: text})
        if state_slot is not None:
            tag.fillSlots(**{state_slot: state or ""})

    @renderer
    def page(self, request, tag):
        g = self.report["gateway"]
        tag.fillSlots(shape=shape(self.report), version=g["version"],
                      generated_at=fmt("clock", self.now, self.now)[0])
        return tag

    @renderer
    def gateway(self, request, tag):
        g = self.report["gateway"]
        store, window, prune = g["store"], g["last_5_minutes"], g["store"]["last_prune"]
        self._cell(tag, "uptime", "duration", g["uptime_seconds"])
        self._cell(tag, "requests", "int", window["requests"])
        self._cell(tag, "errors", "count", window["errors"], "errors_state")
        self._cell(tag, "client_errors", "int", window["client_errors"])
        self._cell(tag, "open_streams", "int", g["open_streams"])
        self._cell(tag, "store_status", "status", store["status"], "store_state")
        detail = ""
        if "redis" in store:
            detail = f" · {store['redis']} ({'connected' if store['connected'] else 'down'})"
        if store.get("error"):
            detail += f" · {store['error']}"
        tag.fillSlots(store_backend=store["backend"], store_detail=detail)
        self._cell(tag, "store_sessions", "int", store.get("sessions"))
        self._cell(tag, "prune_at", "ago", prune["at"] if prune else None)
        self._cell(tag, "prune_removed", "int", prune["removed"] if prune else None)
        self._cell(tag, "rss", "bytes", g["memory"]["rss_bytes"])
        self._cell(tag, "peak_rss", "bytes", g["memory"]["peak_rss_bytes"])
        tag.fillSlots(admin="admin token" if g["admin"] == "token"
                      else "this machine only (no admin token set)")
        return tag

    @renderer
    def bridges(self, request, tag):
        for index, bridge in enumerate(self.report["bridges"]):
            row = tag.clone()
            probe = bridge["probe"]
            marks = [tags.span(" default", **{"class": "tag"})] if bridge["default"] else []
            if bridge["has_api_key"]:
                marks.append(tags.span(" with key", **{"class": "tag"}))
            row.fillSlots(row=f"bridges.{index}", url=bridge["url"], tags=marks)
            self._cell(row, "sessions", "int", bridge["sessions"])
            self._cell(row, "answered", "probe", probe, "state")
            self._cell(row, "since", "ago", probe["since"] if probe else None)
            self._cell(row, "checked", "ago", probe["checked_at"] if probe else None)
            self._cell(row, "latency", "ms", probe["latency_ms"] if probe else None)
            yield row

    @renderer
    def sessions_hint(self, request, tag):
        total = self.report["sessions_total"]
        if total > MAX_SESSIONS_SHOWN:
            return tag(f"The first {MAX_SESSIONS_SHOWN} of {total} sessions, by domain and name.")
        return tag(f"{total} session{'' if total == 1 else 's'}." if total else
                   "No sessions yet: register one, or install a userscript.")

    @renderer
    def sessions(self, request, tag):
        for index, s in enumerate(self.report["sessions"]):
            row = tag.clone()
            name, domain = s["session_name"], s["domain"]
            upstream = s["bridge"] if s["served_by"] == "bridge" else ""
            row.fillSlots(row=f"sessions.{index}", anchor=f"s-{domain}-{name}", domain=domain,
                          name=name, upstream=upstream or "", tabs=self._tabs(s["tabs"]),
                          actions=self._actions(domain, name))
            self._cell(row, "served_by", "text", s["served_by"])
            self._cell(row, "connected", "connected", s["connected"], "connected_state")
            self._cell(row, "connected_since", "since", s["connected_since"])
            self._cell(row, "busy", "busy", s["busy"])
            self._cell(row, "queue", "queue", s["queue_length"])
            self._cell(row, "last_used", "ago", s["last_used_at"])
            error = s["last_error"] or {}
            self._cell(row, "error_code", "error", error.get("code"), "error_state")
            self._cell(row, "error_at", "ago", error.get("at")) if error else \
                row.fillSlots(error_at="")
            self._cell(row, "open_streams", "int", s["open_streams"])
            yield row

    def _tabs(self, shown: list[dict]):
        if not shown:
            return ""
        items = []
        for tab in shown:
            words = [f"tab {tab['tab_id']}", fmt("since", tab["connected_since"], self.now)[0],
                     "busy" if tab["busy"] else "idle"]
            if tab["last_error"]:
                words.append(f"last error: {tab['last_error']}")
            items.append(tags.li(" · ".join(words)))
        return tags.ul(*items, **{"class": "tabs"})

    def _actions(self, domain: str, name: str):
        return [
            action_form("install-link", "Install link",
                        f"Show the userscript install link of {name}?",
                        {"session_name": name}, self.csrf),
            action_form("revoke", "Revoke token",
                        f"Revoke every registration token of {name} (on every domain)? "
                        "Its installed userscripts stop registering until reinstalled.",
                        {"session_name": name}, self.csrf, danger=True),
            action_form("delete", "Delete",
                        f"Delete session {name} on {domain}? Clients using it get "
                        "SESSION_NOT_FOUND until it registers again.",
                        {"domain": domain, "session_name": name}, self.csrf, danger=True),
        ]


def render_page(request, report: dict, csrf: str):
    """Fires with the whole page."""
    for name, value in SECURITY_HEADERS.items():
        request.setHeader(name, value)
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    page = StatusPage(report, csrf)  # an IRenderable, which the stubs do not list
    return flattenString(request, page).addCallback(  # type: ignore[arg-type]
        lambda body: DOCTYPE + body)


def render_note(request, title: str, body, *, status: int = 200):
    """A small page after an action (or asking to confirm one), in the page's style."""
    for name, value in SECURITY_HEADERS.items():
        request.setHeader(name, value)
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    request.setResponseCode(status)
    page = tags.html(lang="en")(
        tags.head(tags.meta(charset="utf-8"),
                  tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
                  tags.meta(name="color-scheme", content="light dark"),
                  tags.title(f"{title} · lmgateway status"),
                  tags.link(rel="stylesheet", href="page.css")),
        tags.body(Tag("main", attributes={"class": "note"})(
            tags.h1(title), body, tags.p(tags.a("Back to the status page", href="../status")))))
    return flattenString(request, page).addCallback(lambda text: DOCTYPE + text)
