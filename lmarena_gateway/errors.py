"""The OpenAI error envelope: the only error shape OpenAI clients can read."""

from __future__ import annotations

import json

from attrs import frozen


def envelope(message: str, code: str, type: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type, "code": code}}


@frozen
class ApiError(Exception):
    """A refusal we answer with: status, stable code, and a message for a person."""

    status: int
    code: str
    message: str
    type: str = "invalid_request_error"

    def body(self) -> bytes:
        return json.dumps(envelope(self.message, self.code, self.type)).encode()

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


def write_json(request, status: int, payload) -> bytes:
    """Set status and JSON content type; return the body for Klein to write."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(payload).encode()


def render_error(request, error: ApiError) -> bytes:
    request.setResponseCode(error.status)
    request.setHeader(b"Content-Type", b"application/json")
    return error.body()
