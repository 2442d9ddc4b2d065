"""Talking to a gateway from a test on the reactor."""

from __future__ import annotations

import json

SESSION = {
    "domain": "lmarena.ai",
    "session_name": "team-alpha",
    "session_id": "12345678-1234-1234-1234-123456789abc",
    "message_id": "87654321-4321-4321-4321-cba987654321",
}


async def call(method: str, url: str, body=None, headers=None):
    """treq on the reactor: (status, headers, parsed JSON or bytes)."""
    import treq

    kwargs = {"headers": headers or {}}
    if body is not None:
        kwargs["data"] = body if isinstance(body, bytes) else json.dumps(body).encode()
        kwargs["headers"] = {"Content-Type": "application/json", **kwargs["headers"]}
    response = await treq.request(method, url, **kwargs)
    raw = await treq.content(response)
    try:
        return response.code, response.headers, json.loads(raw)
    except ValueError:
        return response.code, response.headers, raw
