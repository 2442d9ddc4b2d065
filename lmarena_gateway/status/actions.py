"""The page's POST actions (revoke, delete, install link) and their CSRF tokens.

The page is a browser page behind HTTP Basic or "this machine only", both of which a
browser applies to a form another site posts. So each action needs a token only our
page holds, and refuses a request that says it comes from another origin.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from urllib.parse import parse_qs

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger
from twisted.web.template import tags

from ..errors import ApiError
from ..security import own_origin
from ..sessions import check_domain, check_session_name
from .page import action_form, render_note

log = Logger()
CSRF_MAX_AGE = 24 * 3600.0


class CsrfTokens:
    """``issued.mac``: valid for a day, on every instance that shares the registration secret."""

    def __init__(self, clock, tokens=None) -> None:
        self.clock = clock
        self.tokens = tokens
        self._own = secrets.token_bytes(32)  # used while (or when) no shared secret exists

    def _keys(self) -> list[bytes]:
        shared = self.tokens.derived_key("status-csrf") if self.tokens is not None else None
        return [shared, self._own] if shared else [self._own]

    @staticmethod
    def _mac(key: bytes, issued: int) -> str:
        digest = hmac.new(key, f"csrf\0{issued}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def issue(self) -> str:
        issued = int(self.clock.seconds())
        return f"{issued}.{self._mac(self._keys()[0], issued)}"

    def valid(self, token: str) -> bool:
        issued_text, _, mac = token.partition(".")
        if not issued_text.isdigit() or not mac:
            return False
        issued = int(issued_text)
        if not 0 <= self.clock.seconds() - issued <= CSRF_MAX_AGE:
            return False
        return any(hmac.compare_digest(mac.encode(), self._mac(key, issued).encode())
                   for key in self._keys())


MAX_FORM = 4096


def _form(request) -> dict[str, str]:
    """The posted form, parsed here: the site leaves form bodies alone (see GatewaySite)."""
    form = getattr(request, "status_form", None)
    if form is None:
        kind = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        raw = request.content.read(MAX_FORM + 1) if kind == b"application/x-www-form-urlencoded" \
            else b""
        if len(raw) > MAX_FORM:
            raise ApiError(413, "BODY_TOO_LARGE", f"a status page form is under {MAX_FORM} bytes")
        text = raw.decode("utf-8", "replace")
        form = {k: v[0] for k, v in parse_qs(text, keep_blank_values=True).items()}
        request.status_form = form
    return form


def _field(request, name: str) -> str:
    return _form(request).get(name, "")


class StatusActions:
    """What the forms do; each route checks the admin rule before calling ``check``."""

    def __init__(self, config, store, csrf: CsrfTokens, *, tokens=None, activity=None) -> None:
        self.config = config
        self.store = store
        self.csrf = csrf
        self.tokens = tokens
        self.activity = activity

    def check(self, request) -> None:
        """The CSRF token, and no other origin: refused with 403 before anything changes."""
        origin = request.getHeader(b"origin")
        if origin is not None and origin.decode("latin-1").lower() != own_origin(request):
            raise ApiError(403, "CSRF_ORIGIN_REFUSED",
                           "status page actions are accepted from the status page only")
        if request.getHeader(b"sec-fetch-site") == b"cross-site":
            raise ApiError(403, "CSRF_ORIGIN_REFUSED",
                           "status page actions are accepted from the status page only")
        token = _field(request, "csrf")
        if not token:
            raise ApiError(403, "CSRF_TOKEN_REQUIRED",
                           "this form needs the CSRF token of the status page: reload it")
        if not self.csrf.valid(token):
            raise ApiError(403, "CSRF_TOKEN_INVALID",
                           "the status page's CSRF token is invalid or over a day old: reload it")

    def _confirmed(self, request, action: str, question: str, fields: dict):
        """None once confirmed; otherwise the page asking (what a browser without JS sees)."""
        if _field(request, "confirm") == "yes":
            return None
        form = action_form(action, "Yes, go ahead", question, fields, _field(request, "csrf"),
                           danger=action != "install-link", confirmed=True)
        return render_note(request, "Are you sure?", [tags.p(question), form])

    @inlineCallbacks
    def revoke(self, request):
        self.check(request)
        name = check_session_name(_field(request, "session_name"))
        asking = self._confirmed(request, "revoke",
                                 f"Revoke every registration token of {name}?",
                                 {"session_name": name})
        if asking is not None:
            return (yield asking)
        if self.tokens is None:
            raise ApiError(503, "TOKENS_UNAVAILABLE", "this gateway issues no registration tokens",
                           "server_error")
        generation = yield self.tokens.revoke(name)
        log.info("status page: revoked the registration tokens of {name} (generation {g})",
                 name=name, g=generation)
        return (yield render_note(request, "Tokens revoked", tags.p(
            f"Every registration token of {name} is revoked (now generation {generation}). "
            "Its installed userscripts can no longer register; give its users a new install "
            "link.")))

    @inlineCallbacks
    def delete(self, request):
        self.check(request)
        domain = check_domain(_field(request, "domain"), self.config.domains)
        name = check_session_name(_field(request, "session_name"))
        asking = self._confirmed(request, "delete", f"Delete session {name} on {domain}?",
                                 {"domain": domain, "session_name": name})
        if asking is not None:
            return (yield asking)
        existed = yield self.store.delete(domain, name)
        if not existed:
            raise ApiError(404, "SESSION_NOT_FOUND", f"no session {name!r} for domain {domain!r}")
        if self.activity is not None:
            self.activity.forget(domain, name)
        log.info("status page: session deleted: {domain}/{name}", domain=domain, name=name)
        return (yield render_note(request, "Session deleted",
                                  tags.p(f"Session {name} on {domain} is deleted.")))

    @inlineCallbacks
    def install_link(self, request):
        from ..userscript import gateway_url_for

        self.check(request)
        name = check_session_name(_field(request, "session_name"))
        asking = self._confirmed(request, "install-link",
                                 f"Show the userscript install link of {name}?",
                                 {"session_name": name})
        if asking is not None:
            return (yield asking)
        link = f"{gateway_url_for(request, self.config)}/userscript/{name}.user.js"
        return (yield render_note(request, f"Install link for {name}", [
            tags.p("Open this link in the browser where the team is logged in to LMArena; "
                   "the userscript manager (Tampermonkey, Violentmonkey) offers to install it:"),
            tags.p(tags.a(link, href=link, id="install-link")),
            tags.p("The link holds no secret: it asks for the admin token (as the password) "
                   "unless the browser is on the gateway's machine and no token is set. The "
                   "installed script carries its own registration token and updates itself.")]))
