"""The Tampermonkey userscript of a session: its tab serves the session (tab mode) and
registers the legacy LMArena ids with this gateway. The code is userscript.js.

Everything a request or the configuration puts into the script is either checked against
a strict pattern (metadata lines) or embedded as an escaped JSON literal (the code), so no
Host header, parameter or setting can add a metadata line or a line of script.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from urllib.parse import quote, urlsplit

from .errors import ApiError
from .sessions import SESSION_NAME, check_session_name
from .validation import HOST_PORT, http_url, is_host_name

# Bump when the script's code changes shape; @version is "<this>.<hash of the text>".
TEMPLATE_REVISION = 2
NAMESPACE = "lmarena-gateway"
VERSION_MARK = "@@VERSION@@"



def js_literal(value) -> str:
    """A JSON literal that is also safe inside HTML and old JavaScript parsers."""
    text = json.dumps(value, ensure_ascii=True)  # U+2028/2029 and all non-ASCII become \\uXXXX
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def check_gateway_url(url: str) -> str:
    """The URL the script posts to; raises ValueError unless it is a plain http(s) URL."""
    try:
        return http_url(url)
    except ValueError as e:
        raise ValueError(f"{url!r} is not a plain http(s) URL: it {e}") from None


def check_host(value: str, source: str) -> str:
    """A ``host[:port]`` header value, lowercased; 400 INVALID_HOST otherwise."""
    match = HOST_PORT.fullmatch(value)
    if not match or (match.group(2) and not 0 < int(match.group(2)) < 65536):
        raise ApiError(400, "INVALID_HOST",
                       f"{source} is not a valid host[:port]; "
                       "the gateway's URL can be set with --public-url")
    return value.lower()


def _first(request, name: bytes) -> str | None:
    """The first value of a (possibly comma-joined) header set by proxies."""
    raw = request.getHeader(name)
    if raw is None:
        return None
    return raw.decode("latin-1").split(",")[0].strip()


def gateway_url_for(request, config) -> str:
    """Where browsers reach this gateway: --public-url, else the request's own address.

    X-Forwarded-Proto/-Host are honoured only with --trust-proxy-headers: any client can
    send them, and the script would otherwise post session ids wherever they point.
    """
    if config.public_url:
        try:
            return check_gateway_url(config.public_url)
        except ValueError as e:
            raise ApiError(500, "INVALID_PUBLIC_URL", f"--public-url: {e}",
                           "server_error") from None
    scheme = "https" if request.isSecure() else "http"
    host, source = None, "the Host header"
    if config.trust_proxy_headers:
        proto = _first(request, b"x-forwarded-proto")
        if proto is not None:
            if proto.lower() not in ("http", "https"):
                raise ApiError(400, "INVALID_FORWARDED_PROTO",
                               "X-Forwarded-Proto must be http or https")
            scheme = proto.lower()
        host = _first(request, b"x-forwarded-host")
        source = "X-Forwarded-Host"
    if host is None:
        raw = request.getHeader(b"host")
        source = "the Host header"
        if raw is None:  # HTTP/1.0 without Host: the address we were reached on
            address = request.getHost()
            name = f"[{address.host}]" if ":" in address.host else address.host
            raw = f"{name}:{address.port}".encode()
        host = raw.decode("latin-1")
    return f"{scheme}://{check_host(host, source)}"


def _metadata(session_name: str, gateway_url: str, domains: tuple[str, ...],
              registration_token: str | None) -> list[str]:
    update = f"{gateway_url}/userscript/{session_name}.user.js"
    if registration_token is not None:
        # the update check has no admin token: the script's own token lets it fetch itself
        update += f"?registration_token={quote(registration_token, safe='')}"
    connect = urlsplit(gateway_url).hostname
    lines = [
        "// ==UserScript==",
        # managers know a script by @name and @namespace: keep both, or updates break
        f"// @name         LMArena registrar: {session_name}",
        f"// @namespace    {NAMESPACE}",
        f"// @version      {VERSION_MARK}",
        f"// @description  Serves the gateway's session {session_name} from this "
        "logged-in LMArena tab",
    ]
    for domain in domains:
        lines += [f"// @match        https://{domain}/*", f"// @match        https://*.{domain}/*"]
    lines += [
        "// @run-at       document-start",
        "// @noframes",
        "// @grant        GM_xmlhttpRequest",
        "// @grant        unsafeWindow",
        f"// @connect      {connect}",
        f"// @updateURL    {update}",
        f"// @downloadURL  {update}",
        "// ==/UserScript==",
    ]
    return lines


def render_script(*, session_name: str, gateway_url: str, domains: tuple[str, ...],
                  registration_token: str | None = None) -> str:
    """The userscript text; raises ValueError for a value that could break its metadata."""
    if not isinstance(session_name, str) or not SESSION_NAME.fullmatch(session_name):
        raise ValueError(f"{session_name!r} is not a session name")
    gateway_url = check_gateway_url(gateway_url)
    domains = tuple(d.lower() if isinstance(d, str) else d for d in domains)
    for domain in domains:
        if not is_host_name(domain):
            raise ValueError(f"{domain!r} is not a host name")
    if registration_token is not None and not isinstance(registration_token, str):
        raise ValueError("registration_token must be a string")
    settings = "\n".join([
        f"  var SESSION_NAME = {js_literal(session_name)};",
        f"  var GATEWAY_URL = {js_literal(gateway_url)};",
        f"  var DOMAINS = {js_literal(list(domains))};",
        f"  var REGISTRATION_TOKEN = {js_literal(registration_token)};",
    ])
    text = "\n".join(_metadata(session_name, gateway_url, domains, registration_token)) \
        + "\n\n" \
        + _code().replace("/*SETTINGS*/", settings)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return text.replace(VERSION_MARK, f"{TEMPLATE_REVISION}.{int(digest[:8], 16)}", 1)


def serve(request, config, raw_name: str, tokens=None) -> bytes:
    """The script for ``raw_name`` as a download (once the caller has checked access)."""
    name = check_session_name(raw_name)
    gateway_url = gateway_url_for(request, config)
    try:
        text = render_script(session_name=name, gateway_url=gateway_url, domains=config.domains,
                             registration_token=tokens.token_for(name) if tokens else None)
    except ValueError as e:
        raise ApiError(500, "INVALID_CONFIG", f"cannot build the userscript: {e}",
                       "server_error") from None
    request.setResponseCode(200)
    request.setHeader(b"Content-Type", b"text/javascript; charset=utf-8")
    request.setHeader(b"Content-Disposition",
                      f'attachment; filename="lmarena-registrar-{name}.user.js"'.encode())
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    return text.encode("utf-8")


def _code() -> str:
    """The script's code, from the package's userscript.js."""
    return resources.files(__package__).joinpath("userscript.js").read_text(encoding="utf-8")
