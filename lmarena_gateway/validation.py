"""The grammars every input is checked against, written once.

Settings, registrations, userscripts and headers all name URLs, host names and tokens;
each used to carry its own regex, with slightly different rules. Checks here return a
problem or raise ValueError; callers turn that into their own error (a ConfigError
line, a 400 envelope) and keep their own wording of *which* value was wrong.
Every pattern is used with ``fullmatch``: a ``$`` would let a trailing newline through.
"""

from __future__ import annotations

import re
from functools import lru_cache
from urllib.parse import urlsplit

# One DNS label; "_" is allowed because real LAN host names carry it.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
HOST_NAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*")
# A host as a URL or a Host header names it: a name, or a bracketed IPv6 literal.
HOST = rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]{{2,45}}\])"
HOST_PORT = re.compile(rf"({HOST})(?::([0-9]{{1,5}}))?")
# RFC 3986 characters a plain URL may use, minus "'" (it would end a quoted literal).
_URL_CHARACTERS = re.compile(r"[A-Za-z0-9._~:/?#\[\]@!$&()*+,;=%-]+")
# An HTTP token (RFC 9110): what a header name may be.
HTTP_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@lru_cache(maxsize=None)
def printable(low: int, high: int) -> re.Pattern[str]:
    """Printable ASCII without spaces, ``low``..``high`` characters: keys, ids, prefixes."""
    return re.compile(rf"[\x21-\x7e]{{{low},{high}}}")


def is_printable(value: object, low: int, high: int) -> bool:
    return isinstance(value, str) and printable(low, high).fullmatch(value) is not None


def is_host_name(value: object) -> bool:
    return isinstance(value, str) and HOST_NAME.fullmatch(value) is not None


def http_url(value: object) -> str:
    """A plain absolute http(s) URL, without its trailing "/"; ValueError saying why not.

    Plain means what a bridge, a public URL or a userscript's target needs and nothing a
    URL could smuggle: printable characters only, a host, a port in range, and no user
    info, query or fragment.
    """
    if not isinstance(value, str) or not value:
        raise ValueError("must be an absolute http or https URL")
    if not _URL_CHARACTERS.fullmatch(value):
        raise ValueError("must be plain characters (printable ASCII, no spaces or quotes)")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http or https URL")
    if "@" in parts.netloc or "?" in value or "#" in value:
        raise ValueError("must not carry user info, a query or a fragment")
    if not re.fullmatch(rf"{HOST}(?::[0-9]{{1,5}})?", parts.netloc):
        raise ValueError("does not name a valid host")
    try:
        port = parts.port  # raises for a port out of range
    except ValueError:
        raise ValueError("has an invalid port") from None
    if port == 0:
        raise ValueError("has port 0")
    return value.rstrip("/")
