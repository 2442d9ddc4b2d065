"""How each setting's text becomes a value: one parser per kind of setting.

Each raises ValueError with a message that reads after the option's name
("--bridge-url: 'x' is not a plain http(s) URL ..."); config.SETTINGS pairs them with
options and variables.
"""

from __future__ import annotations

import os
import re

from .store import REDIS, backend_of
from .validation import http_url, is_host_name, is_printable


def split(value: str) -> tuple[str, ...]:
    return tuple(part for part in re.split(r"[,\s]+", value) if part)


def parse_http_url(value: str) -> str:
    try:
        return http_url(value)
    except ValueError as e:
        raise ValueError(f"{value!r} is not an absolute http(s) URL: it {e}") from None


def parse_listen(value: str | tuple[str, ...]) -> tuple[str, ...]:
    from twisted.internet.endpoints import serverFromString

    endpoints = split(value) if isinstance(value, str) else tuple(value)
    if not endpoints:
        raise ValueError("at least one endpoint is needed")
    for description in endpoints:
        try:
            # Parsing builds endpoint objects without listening; no reactor is used.
            serverFromString(None, description)
        except Exception as e:  # the parsers raise many kinds of error
            if isinstance(e, LookupError) and description.startswith("systemd:"):
                # Twisted looks name/index up among the sockets inherited from systemd.
                raise ValueError(f"{description!r}: systemd handed over no such socket "
                                 "(is its .socket unit running?)") from None
            raise ValueError(f"{description!r} is not a valid endpoint: {e}") from None
    return endpoints


def parse_nonneg(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number") from None
    if number != number or number < 0 or number == float("inf"):
        raise ValueError(f"{value!r} must be a finite number >= 0")
    return number


def parse_positive(value: str) -> float:
    number = parse_nonneg(value)
    if number == 0:
        raise ValueError(f"{value!r} must be greater than 0")
    return number


def parse_probe_interval(value: str) -> float:
    number = parse_nonneg(value)
    if 0 < number < 60:
        raise ValueError(f"{value!r} must be 0 (off) or at least 60: bridges are probed "
                         "at most once a minute")
    return number


def parse_size(value: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]i?[bB]?)?\s*", value)
    if not match:
        raise ValueError(f"{value!r} is not a size (e.g. 65536, 512KiB, 20MiB)")
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[(match.group(2) or "")[:1].lower()]
    size = int(match.group(1)) * scale
    if size <= 0:
        raise ValueError(f"{value!r} must be greater than 0")
    return size


def parse_domains(value: str) -> tuple[str, ...]:
    domains = tuple(d.lower() for d in split(value))
    if not domains:
        raise ValueError("at least one domain is needed")
    for domain in domains:
        if not is_host_name(domain):
            raise ValueError(f"{domain!r} is not a host name")
    return domains


def parse_origins(value: str) -> tuple[str, ...]:
    origins = split(value)
    if not origins:
        raise ValueError("at least one origin (or *) is needed")
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"[a-z][a-z0-9+.-]*://[A-Za-z0-9.\-\[\]:]+", origin):
            raise ValueError(f"{origin!r} is not an origin such as https://app.example.com")
    return origins


def parse_key(value: str) -> str | None:
    if not value:
        return None
    if not is_printable(value, 1, 512):
        raise ValueError("must be one token of printable ASCII, without spaces")
    return value


def parse_storage(value: str) -> str:
    if not value:
        raise ValueError("an empty path")
    if backend_of(value) == REDIS:
        from .store.redis_commands import parse_address

        parse_address(value)  # a bad Redis URL is a one-line error, not a traceback
        return value
    if os.path.isdir(value):
        raise ValueError(f"{value!r} is a directory, not a file")
    return value


def parse_redis_prefix(value: str) -> str:
    if not is_printable(value, 1, 64):
        raise ValueError("must be 1-64 printable ASCII characters without spaces")
    return value


def parse_public_url(value: str) -> str | None:
    return parse_http_url(value) if value else None


def read_admin_token_file(value: str) -> str:
    try:
        with open(value, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise ValueError(f"cannot read {value!r}: {e.strerror}") from None
    if not token:
        raise ValueError(f"{value!r} is empty")
    parsed = parse_admin_token(token)
    assert parsed is not None  # an empty token was refused above
    return parsed


def parse_admin_token(value: str) -> str | None:
    if not value:
        return None  # an empty variable is an unset one
    if not is_printable(value, 16, 512):
        raise ValueError("the admin token must be 16-512 printable ASCII characters, no spaces")
    return value


def parse_readable_file(value: str) -> str:
    if not os.path.isfile(value) or not os.access(value, os.R_OK):
        raise ValueError(f"{value!r} is not a readable file")
    return value


def parse_allow(value: str) -> tuple[str, ...]:
    entries = tuple(e.lower() for e in split(value))
    for entry in entries:
        if entry in ("loopback", "*"):
            if entry == "*":
                raise ValueError("'*' would allow any host; list hosts, *.suffix, CIDRs or 'loopback'")
            continue
        if "/" in entry:
            import ipaddress

            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not a network") from None
        elif not is_host_name(entry.removeprefix("*.")) and not is_ip(entry):
            raise ValueError(f"{entry!r} is not a host, *.suffix, CIDR or 'loopback'")
    return entries


def is_ip(value: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        return False
    return True


def parse_count(value: str) -> int:
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"{value!r} is not a whole number >= 1")
    return int(value)


def parse_nonneg_count(value: str) -> int:
    if not value.strip().isdigit():
        raise ValueError(f"{value!r} is not a whole number >= 0")
    return int(value)


def parse_secret_file(value: str) -> str | None:
    if not value:
        return None
    directory = os.path.dirname(os.path.abspath(value))
    if not os.path.isdir(directory):
        raise ValueError(f"directory {directory!r} does not exist")
    return value


MAX_WORKERS = 64


def parse_workers(value: str) -> int:
    if not value.strip().isdigit() or not 1 <= int(value) <= MAX_WORKERS:
        raise ValueError(f"{value!r} is not a whole number from 1 to {MAX_WORKERS}")
    return int(value)


def parse_queue(value: str) -> int:
    if not value.strip().isdigit():
        raise ValueError(f"{value!r} is not a whole number >= 0")
    return int(value)


def parse_pairs(value: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for entry in split(value):
        asked, _, tab = entry.lower().partition("=")
        if not (is_host_name(asked) and is_host_name(tab)) or asked == tab:
            raise ValueError(f"{entry!r} is not REQUESTED=TAB, two different host names "
                             "(e.g. lmarena.ai=arena.ai)")
        pairs.append((asked, tab))
    return tuple(pairs)


def parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not true or false")


