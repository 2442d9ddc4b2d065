"""The session record and the rules a registration must pass, wherever it comes from.

The API, the CLI's ``import`` and every store backend validate through
:func:`validate_registration`, so a record that fails these rules is never stored.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Mapping

from attrs import evolve, field, frozen

from .errors import ApiError
from .validation import http_url, is_printable

SESSION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MAX_MODELS = 200
REQUIRED = ("domain", "session_name", "session_id", "message_id")


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value) -> float:
    """ISO-8601 (ours, or PHP's ``date('c')``) or epoch seconds, between 1970 and 9999."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a time")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{value!r} is not an ISO-8601 time") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        seconds = moment.timestamp()
    else:
        raise ValueError(f"{value!r} is not a time")
    if not 0 <= seconds < 253402300800:  # NaN and infinities fail this too
        raise ValueError(f"{value!r} is not a time between 1970 and 9999")
    return seconds


def _whole_seconds(value):
    """Times are kept to the second, as they are written (ISO-8601), so memory equals disk."""
    return None if value is None else float(int(value))


def session_key(domain: str, name: str) -> str:
    return f"{domain}/{name}"


UPSTREAMS = ("tab",)  # "upstream": absent means its tab when connected, else its bridge


@frozen
class SessionRecord:
    domain: str
    session_name: str
    # The legacy ids a userscript captured; None for a session its tab created.
    session_id: str | None
    message_id: str | None
    bridge_base_url: str | None = None
    bridge_api_key: str | None = field(default=None, repr=False)
    models: dict = field(factory=dict)
    created_at: float = field(default=0.0, converter=_whole_seconds)
    updated_at: float = field(default=0.0, converter=_whole_seconds)
    last_used_at: float | None = field(default=None, converter=_whole_seconds)
    upstream: str | None = None  # "tab": only a tab serves it (fails closed)

    @property
    def key(self) -> str:
        return session_key(self.domain, self.session_name)

    @property
    def last_activity(self) -> float:
        return max(self.updated_at, self.last_used_at or 0.0)

    def public(self) -> dict:
        """What /session/list shows: everything but the bridge key."""
        shown = self.to_json()
        del shown["bridge_api_key"]
        return {"domain": self.domain, "session_name": self.session_name, **shown,
                "has_bridge_api_key": self.bridge_api_key is not None}

    def to_json(self) -> dict:
        """The stored and exported form: the PHP gateway's fields plus ours."""
        data = {
            "session_id": self.session_id,
            "message_id": self.message_id,
            "bridge_base_url": self.bridge_base_url,
            "bridge_api_key": self.bridge_api_key,
            "models": dict(self.models),
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "last_used_at": iso(self.last_used_at) if self.last_used_at else None,
        }
        if self.upstream is not None:
            data["upstream"] = self.upstream
        return data

    @classmethod
    def from_json(cls, domain: str, name: str, data: Mapping) -> SessionRecord:
        return cls(
            domain=domain,
            session_name=name,
            session_id=data.get("session_id") or None,
            message_id=data.get("message_id") or None,
            bridge_base_url=data.get("bridge_base_url"),
            bridge_api_key=data.get("bridge_api_key"),
            models=dict(data.get("models") or {}),
            created_at=parse_time(data["created_at"]),
            updated_at=parse_time(data["updated_at"]),
            last_used_at=parse_time(data["last_used_at"]) if data.get("last_used_at") else None,
            upstream=data.get("upstream") if data.get("upstream") in UPSTREAMS else None,
        )

    def touched(self, now: float) -> SessionRecord:
        return evolve(self, last_used_at=now)


@frozen
class Registration:
    """A validated registration, not yet stamped with times."""

    domain: str
    session_name: str
    session_id: str | None
    message_id: str | None
    bridge_base_url: str | None = None
    bridge_api_key: str | None = field(default=None, repr=False)
    models: dict = field(factory=dict)
    upstream: str | None = None
    # A userscript's registration only renews the ids: the bridge, key and aliases an
    # admin set stay as they were.
    keep_bridge: bool = False

    def record(self, now: float, existing: SessionRecord | None) -> SessionRecord:
        """The upserted record: ``created_at`` and ``last_used_at`` survive an update."""
        source = existing if self.keep_bridge and existing is not None else self
        return SessionRecord(
            domain=self.domain,
            session_name=self.session_name,
            session_id=self.session_id,
            message_id=self.message_id,
            bridge_base_url=source.bridge_base_url,
            bridge_api_key=source.bridge_api_key,
            models=dict(source.models),
            created_at=existing.created_at if existing else now,
            updated_at=now,
            last_used_at=existing.last_used_at if existing else None,
            upstream=source.upstream,
        )


def _bad(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


def check_session_room(store, domain: str, name: str, limit: int) -> None:
    """409 SESSION_LIMIT when a new session would take ``domain`` past ``limit``."""
    if store.get(domain, name) is not None:
        return
    held = sum(1 for _ in store.records(domain))
    if held >= limit:
        raise ApiError(409, "SESSION_LIMIT",
                       f"{domain} holds {held} sessions, the most allowed "
                       "(--max-sessions-per-domain); delete some or raise the limit")


def check_domain(domain, domains) -> str:
    if not isinstance(domain, str) or domain.lower() not in domains:
        raise _bad("INVALID_DOMAIN", f"domain must be one of: {', '.join(domains)}")
    return domain.lower()


def check_session_name(name) -> str:
    if not isinstance(name, str) or not SESSION_NAME.fullmatch(name):
        raise _bad("INVALID_SESSION_NAME",
                   "session_name must be 1-64 characters of A-Z, a-z, 0-9, _ or -")
    return name


def check_bridge_url(url) -> str:
    if not isinstance(url, str):
        raise _bad("INVALID_URL", "bridge_base_url must be a string")
    try:
        return http_url(url)
    except ValueError as e:
        raise _bad("INVALID_URL", f"bridge_base_url {e}") from None


def trimmed(body):
    """Blanks around a value are a copy-paste slip, not a different value (PHP trims too)."""
    if not isinstance(body, dict):
        return body
    return {k: v.strip() if isinstance(v, str) else v for k, v in body.items()}


def validate_registration(body, domains, *, ids_optional: bool = False) -> Registration:
    """The rules of POST /session/register; raises ApiError with a stable code.

    The legacy ids may be left out together by a session its tab serves
    (``"upstream": "tab"``), or with ``ids_optional`` (a stored session its tab created).
    """
    if not isinstance(body, dict):
        # The PHP gateway's code: an empty or non-object body has none of the fields.
        raise _bad("MISSING_FIELDS", f"the body must be a JSON object with {', '.join(REQUIRED)}")
    body = trimmed(body)
    upstream = body.get("upstream")
    if upstream in (None, ""):
        upstream = None
    elif upstream not in UPSTREAMS:
        raise _bad("INVALID_UPSTREAM", "upstream must be \"tab\" or absent")
    required: tuple[str, ...] = REQUIRED
    without_ids = all(body.get(n) in (None, "") for n in ("session_id", "message_id"))
    if without_ids and (upstream == "tab" or ids_optional):
        required = ("domain", "session_name")
    missing = [name for name in required if body.get(name) in (None, "")]
    if missing:
        raise _bad("MISSING_FIELDS", f"missing required fields: {', '.join(missing)}")
    domain = check_domain(body["domain"], domains)
    name = check_session_name(body["session_name"])
    ids: list = []
    for field_name in ("session_id", "message_id"):
        value = body.get(field_name)
        if value in (None, "") and required is not REQUIRED:
            ids.append(None)
            continue
        if not isinstance(value, str) or not UUID.fullmatch(value.lower()):
            raise _bad("INVALID_UUID", f"{field_name} must be a UUID")
        ids.append(value.lower())
    url = body.get("bridge_base_url")
    url = None if url in (None, "") else check_bridge_url(url)
    key = body.get("bridge_api_key")
    if key in (None, ""):
        key = None
    elif not is_printable(key, 1, 512):
        raise _bad("INVALID_BRIDGE_API_KEY",
                   "bridge_api_key must be one token of printable ASCII, at most 512 characters")
    models = body.get("models")
    if models is None:
        models = {}
    if (
        not isinstance(models, dict)
        or len(models) > MAX_MODELS
        or not all(isinstance(k, str) and isinstance(v, str) and k and v
                   for k, v in models.items())
    ):
        raise _bad("INVALID_MODELS",
                   f"models must be an object of at most {MAX_MODELS} alias: model strings")
    return Registration(domain, name, ids[0], ids[1], url, key, dict(models), upstream)


def record_is_valid(record: SessionRecord, domains) -> bool:
    """Whether a stored record would pass registration today (for import and tests)."""
    try:
        validate_registration(
            {
                "domain": record.domain,
                "session_name": record.session_name,
                "session_id": record.session_id,
                "message_id": record.message_id,
                "bridge_base_url": record.bridge_base_url,
                "bridge_api_key": record.bridge_api_key,
                "models": record.models,
                "upstream": record.upstream,
            },
            domains,
            ids_optional=True,
        )
    except ApiError:
        return False
    return True


def encode_record(record: SessionRecord) -> tuple[str, str]:
    """(key, JSON): how every store holds a record, so the file and Redis hold the same."""
    data = record.to_json()
    data["domain"] = record.domain
    data["session_name"] = record.session_name
    return record.key, json.dumps(data, sort_keys=True)


def decode_record(value: str | bytes) -> SessionRecord:
    """The record :func:`encode_record` wrote; ValueError, KeyError or TypeError if broken."""
    data = json.loads(value)
    return SessionRecord.from_json(data["domain"], data["session_name"], data)
