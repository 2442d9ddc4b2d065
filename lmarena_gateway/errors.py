"""The OpenAI error envelope: the only error shape OpenAI clients can read."""

from __future__ import annotations

import json

from attrs import field, frozen


def envelope(message: str, code: str, type: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type, "code": code}}


# Codes a client should not retry at once: both openai SDKs honour ``x-should-retry:
# false``, which spares a user waiting through their backoff on a condition only a person
# fixes (no browser tab connected). The one place the policy for a code is decided.
NO_RETRY = (("x-should-retry", "false"),)
RETRY_POLICY: dict[str, tuple[tuple[str, str], ...]] = {
    "BRIDGE_NOT_READY": NO_RETRY,
    "TAB_NOT_CONNECTED": NO_RETRY,
}


def _pairs(value) -> tuple[tuple[str, str], ...]:
    return tuple((str(k), str(v)) for k, v in (value.items() if isinstance(value, dict) else value))


@frozen
class ApiError(Exception):
    """A refusal we answer with: status, stable code, and a message for a person.

    ``headers`` are extra response headers (``Retry-After``, say); the code's retry
    policy from :data:`RETRY_POLICY` is added to them when the error is answered.
    """

    status: int
    code: str
    message: str
    type: str = "invalid_request_error"
    headers: tuple[tuple[str, str], ...] = field(default=(), converter=_pairs)

    def body(self) -> bytes:
        return json.dumps(envelope(self.message, self.code, self.type)).encode()

    def response_headers(self) -> tuple[tuple[str, str], ...]:
        named = {k.lower() for k, _ in self.headers}
        policy = tuple(p for p in RETRY_POLICY.get(self.code, ()) if p[0].lower() not in named)
        return self.headers + policy

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


def retry_after(seconds: float) -> tuple[tuple[str, str], ...]:
    """A ``Retry-After`` header for a delay the gateway knows (whole seconds, at least 1)."""
    return (("Retry-After", str(max(1, int(seconds + 0.999)))),)


def set_error_headers(request, code: str, headers=()) -> None:
    """The headers an error with ``code`` carries, for answers not raised as ApiError."""
    for name, value in ApiError(500, code, "", headers=headers).response_headers():
        request.setHeader(name.encode("latin-1"), value.encode("latin-1"))


def write_json(request, status: int, payload) -> bytes:
    """Set status and JSON content type; return the body for Klein to write."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(payload).encode()


def note_error(request, code: str) -> None:
    """Remember the error code a request ended with, for the status page's counts."""
    request.error_code = code


def render_error(request, error: ApiError) -> bytes:
    note_error(request, error.code)
    request.setResponseCode(error.status)
    request.setHeader(b"Content-Type", b"application/json")
    for name, value in error.response_headers():
        request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
    return error.body()


def parse_json(raw: bytes):
    """A client's JSON body; nesting deeper than Python recurses is invalid JSON too.

    ``json.loads`` raises RecursionError, not ValueError, for a few KiB of brackets.
    """
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "INVALID_JSON", "the body is not valid JSON "
                       "(or nests deeper than the gateway parses)") from None
