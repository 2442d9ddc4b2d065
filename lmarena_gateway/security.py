"""Who may do what: the admin token, client API keys, and where bridges may be.

The PHP gateway trusted every caller. Here the admin routes need the admin token (or,
with none configured, a loopback client), /v1 needs a client key once keys are
configured, and a session's bridge URL must name an allowed host.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
import signal
from typing import Any
from urllib.parse import urlsplit

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger

from .errors import ApiError
from .sessions import SESSION_NAME
from .validation import is_printable

log = Logger()
_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def _is_loopback_ip(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return any(address.ipv4_mapped in network for network in _LOOPBACK)
    return any(address in network for network in _LOOPBACK)


def is_local_client(request) -> bool:
    """A client on this machine, not relayed: a proxy in front makes every caller look local."""
    if request.getHeader(b"x-forwarded-for") or request.getHeader(b"forwarded"):
        return False
    address = request.getClientAddress()
    if isinstance(address, (IPv4Address, IPv6Address)):
        return _is_loopback_ip(address.host)
    return True  # a UNIX socket: its file permissions already decide who connects


def bearer(request) -> str | None:
    value = (request.getHeader(b"authorization") or b"").decode("latin-1")
    if value[:7].lower() == "bearer ":
        return value[7:].strip()
    return None


def basic_password(request) -> str | None:
    value = (request.getHeader(b"authorization") or b"").decode("latin-1")
    if value[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(value[6:].strip(), validate=True).decode("utf-8")
    except ValueError:
        return None
    return decoded.partition(":")[2]


EXTENSION_ORIGINS = ("chrome-extension://", "moz-extension://", "safari-web-extension://")
# Paths that answer admins only: their preflights get no CORS either. A new admin route
# calls AdminAuth.require and, if a browser may preflight it, is listed here.
ADMIN_PATHS = (b"/session/list", b"/metrics", b"/userscript/", b"/status")


def is_admin_path(method: bytes, path: bytes) -> bool:
    """/session/{domain}/{name} (DELETE) is admin; /session/register is not."""
    if path.startswith(b"/session/") and path != b"/session/register":
        return True
    return any(path == p or (p.endswith(b"/") and path.startswith(p)) or path.startswith(p + b"/")
               for p in ADMIN_PATHS)


def from_a_page(request) -> bool:
    """Sent by a web page's script, not by a tool, the address bar or a userscript manager.

    Browsers set ``Origin`` on a page's cross-origin requests and ``Sec-Fetch-Site`` on
    all of them, script and image loads too (which carry no Origin); pages cannot forge
    either, and extension origins cannot be claimed by a page.

    A page the gateway served itself (the status page posting its forms) is not one: its
    Origin is the request's own, and the Host rule already holds it to a loopback name.
    """
    origin = request.getHeader(b"origin")
    if origin is not None:
        text = origin.decode("latin-1")
        if not text.startswith(EXTENSION_ORIGINS) and text != own_origin(request):
            return True
    return (request.getHeader(b"sec-fetch-site") or b"").lower() in (b"cross-site", b"same-site")


def own_origin(request) -> str:
    """The origin a page served by this request's URL would have."""
    host = (request.getHeader(b"host") or b"").decode("latin-1").lower()
    return f"{'https' if request.isSecure() else 'http'}://{host}"


def host_name(value: str) -> str:
    """The name in a Host header, without its port; '' when it is not one."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1] if "]" in value else ""
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def is_loopback_host(request, public_url: str | None = None) -> bool:
    """Host names this machine only: what a DNS-rebinding page cannot send."""
    raw = request.getHeader(b"host")
    if raw is None:
        return True  # HTTP/1.0 without Host: no name a page could have rebound
    name = host_name(raw.decode("latin-1")).rstrip(".")
    if name == "localhost" or name.endswith(".localhost") or _is_loopback_ip(name):
        return True
    public = (urlsplit(public_url).hostname or "").lower() if public_url else ""
    return bool(public) and name.strip("[]") == public


class AdminAuth:
    """The one rule of every admin route: token, local-only, origin, Host, and CORS.

    With a token, the token decides. Without one, only a client on this machine that is
    not a web page (no page ``Origin``, no cross-site fetch) and that names this machine
    in ``Host`` (which defeats DNS rebinding) is an admin.
    """

    def __init__(self, token: str | None, *, public_url: str | None = None,
                 cors_origins: tuple[str, ...] = ()) -> None:
        self.set_token(token)
        self.public_url = public_url
        # "*" never counts for admin routes: only origins listed one by one.
        self.cors_origins = frozenset(o for o in cors_origins if o != "*")

    def set_token(self, token: str | None) -> None:
        """A re-read token file replaces the token; the loopback-only rule never returns."""
        self._token = token.encode() if token else None

    @property
    def configured(self) -> bool:
        return self._token is not None

    def _matches(self, given: str | None) -> bool:
        return given is not None and self._token is not None and hmac.compare_digest(
            given.encode("utf-8", "replace"), self._token)

    def is_admin(self, request, *, allow_basic: bool = False) -> bool:
        if self._token is None:
            return (is_local_client(request) and not from_a_page(request)
                    and is_loopback_host(request, self.public_url))
        return self._matches(bearer(request)) or (allow_basic and self._matches(basic_password(request)))

    def cors_allowed(self, request) -> bool:
        origin = request.getHeader(b"origin")
        return self._token is not None and origin is not None and \
            origin.decode("latin-1") in self.cors_origins

    def guard_cors(self, request) -> None:
        """An admin answer is readable by no page, unless a token is set and it is listed."""
        if not self.cors_allowed(request):
            for name in (b"access-control-allow-origin", b"access-control-expose-headers",
                         b"access-control-allow-credentials"):
                request.responseHeaders.removeHeader(name)

    def require(self, request, *, allow_basic: bool = False) -> None:
        self.guard_cors(request)
        if self.is_admin(request, allow_basic=allow_basic):
            return
        if self._token is None and is_local_client(request):
            if from_a_page(request):
                raise ApiError(403, "ORIGIN_NOT_ALLOWED",
                               "admin routes do not answer web pages while no admin token is "
                               "configured: set GATEWAY_ADMIN_TOKEN or --admin-token-file")
            raise ApiError(403, "HOST_NOT_ALLOWED",
                           "without an admin token, admin routes answer only requests whose "
                           "Host is a loopback name or the --public-url host")
        if self._token is None:
            raise ApiError(403, "ADMIN_LOCAL_ONLY",
                           "this endpoint answers clients on this machine only until an admin "
                           "token is configured: set GATEWAY_ADMIN_TOKEN or --admin-token-file, "
                           "then send 'Authorization: Bearer <token>'")
        # 401, with a challenge, for a missing or wrong token alike: a browser asks again
        # after a 401, while after a 403 it keeps sending the mistyped password.
        challenge = b'Basic realm="lmgateway", charset="UTF-8"' if allow_basic \
            else b'Bearer realm="lmgateway"'
        request.setHeader(b"WWW-Authenticate", challenge)
        if bearer(request) is None and basic_password(request) is None:
            how = "'Authorization: Bearer <token>'" + (
                ", or as the password of HTTP Basic auth" if allow_basic else "")
            raise ApiError(401, "ADMIN_TOKEN_REQUIRED", f"send the admin token as {how}",
                           "authentication_error")
        raise ApiError(401 if allow_basic else 403, "ADMIN_TOKEN_INVALID",
                       "the admin token is not valid", "authentication_error")


@frozen
class ClientKeys:
    """Client API keys for /v1: {sha256(key): allowed session names, or None for any}.

    ``required`` stays true once keys were configured, even if a re-read finds none:
    emptying the keys file closes /v1, it never opens it.
    """

    keys: dict
    required: bool = False

    @classmethod
    def parse(cls, text: str, *, entry_separators: str = r"\n") -> "ClientKeys":
        keys = {}
        for number, entry in enumerate(re.split(entry_separators, text), 1):
            words = entry.split("#", 1)[0].split()
            if not words:
                continue
            key, names = words[0], words[1:]
            bad = [n for n in names if not SESSION_NAME.fullmatch(n)]
            if bad or not is_printable(key, 8, 512):
                what = f"session name {bad[0]!r}" if bad else "a key (8-512 printable characters)"
                raise ValueError(f"entry {number}: not {what}")
            keys[hashlib.sha256(key.encode()).digest()] = frozenset(names) if names else None
        return cls(keys, required=True)

    def require(self, request, session_name: str) -> None:
        if not self.required:
            return
        given = bearer(request)
        digest = hashlib.sha256(given.encode()).digest() if given else None
        if digest is None or digest not in self.keys:
            raise ApiError(401, "invalid_api_key",
                           "Incorrect API key provided: send one of this gateway's client keys "
                           "as 'Authorization: Bearer <key>'", "invalid_request_error")
        allowed = self.keys[digest]
        if allowed is not None and session_name not in allowed:
            raise ApiError(403, "SESSION_NOT_ALLOWED",
                           f"this API key may not use session {session_name!r}")


def load_client_keys(path: str | None, inline: str | None) -> ClientKeys:
    """Keys from the file (one a line) and GATEWAY_API_KEYS (entries split by , or ;)."""
    keys: dict = {}
    if path:
        with open(path, encoding="utf-8") as f:
            keys.update(ClientKeys.parse(f.read()).keys)
    if inline:
        keys.update(ClientKeys.parse(inline, entry_separators=r"[\n,;]").keys)
    return ClientKeys(keys, required=bool(path or inline))


def bridge_allowed(url: str, allow: tuple[str, ...]) -> bool:
    """Whether a session may send traffic (and its key) to ``url``'s host."""
    host = (urlsplit(url).hostname or "").lower().rstrip(".")
    if not host:
        return False
    for entry in allow:
        if entry == "loopback":
            if host == "localhost" or _is_loopback_ip(host):
                return True
        elif entry.startswith("*."):
            if host.endswith(entry[1:]) and host != entry[2:]:
                return True
        elif "/" in entry:
            try:
                if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
        elif host == entry.strip("[]"):
            return True
    return False


def require_bridge_allowed(url: str, allow: tuple[str, ...], status: int = 400) -> None:
    if not bridge_allowed(url, allow):
        host = urlsplit(url).hostname
        raise ApiError(status, "BRIDGE_NOT_ALLOWED",
                       f"bridge host {host!r} is not allowed: the operator lists allowed bridge "
                       "hosts with --bridge-allow / GATEWAY_BRIDGE_ALLOW")


class ClientKeyService:
    """Holds the client keys; SIGHUP re-reads the keys file without a restart."""

    def __init__(self, path: str | None, inline: str | None, reactor) -> None:
        self.path = path
        self.inline = inline
        self._reactor = reactor
        self.current = load_client_keys(path, inline)  # at startup: a bad file stops the daemon
        if self.current.required and not self.current.keys:
            log.warn("the client API keys file holds no key: /v1 refuses every request")

    def __call__(self) -> ClientKeys:
        return self.current

    def reload(self):
        from twisted.internet.threads import deferToThread

        def loaded(keys: ClientKeys) -> None:
            self.current = keys
            if keys.keys:
                log.info("client API keys re-read: {count} in all", count=len(keys.keys))
            else:
                log.warn("client API keys re-read: none left, so /v1 refuses every request")

        return deferToThread(load_client_keys, self.path, self.inline).addCallbacks(
            loaded, lambda f: log.error("client API keys not re-read, keeping the old ones: "
                                        "{why}", why=f.getErrorMessage()))


class SighupReloader(Service):
    """SIGHUP re-reads the client keys file and the admin token file, and logs what it did.

    It runs whatever is configured: without a handler SIGHUP's default action ends the
    process, and operators send it as a matter of course.
    """

    def __init__(self, reactor, *, keys: ClientKeyService, admin: AdminAuth,
                 admin_token_file: str | None) -> None:
        self._reactor = reactor
        self.keys = keys
        self.admin = admin
        self.admin_token_file = admin_token_file
        self._previous: Any = None  # the SIGHUP handler we replaced

    def startService(self) -> None:
        super().startService()
        previous = self._previous = signal.getsignal(signal.SIGHUP)

        def on_hup(signum, frame):
            self._reactor.callFromThread(self.reload)
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGHUP, on_hup)

    def stopService(self):
        signal.signal(signal.SIGHUP, self._previous or signal.SIG_DFL)
        return super().stopService()

    def reload(self):
        from twisted.internet.defer import gatherResults, succeed

        what = []
        if self.keys.path:
            what.append(f"client API keys from {self.keys.path}")
        if self.admin_token_file:
            what.append(f"the admin token from {self.admin_token_file}")
        if not what:
            log.info("SIGHUP: nothing to re-read (no --api-keys-file or --admin-token-file)")
            return succeed(None)
        log.info("SIGHUP: re-reading {what}", what=" and ".join(what))
        work = [self.keys.reload()] if self.keys.path else []
        if self.admin_token_file:
            work.append(self._reload_admin_token())
        return gatherResults(work)

    def _reload_admin_token(self):
        from twisted.internet.threads import deferToThread

        assert self.admin_token_file is not None  # only called when one is set
        from .setting_values import read_admin_token_file

        def loaded(token: str) -> None:
            self.admin.set_token(token)
            log.info("admin token re-read from {path}", path=self.admin_token_file)

        return deferToThread(read_admin_token_file, self.admin_token_file).addCallbacks(
            loaded, lambda f: log.error("admin token not re-read, keeping the old one: {why}",
                                        why=f.getErrorMessage()))
