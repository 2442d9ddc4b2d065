"""LMArena's refusals, each with its own stable code and what a person has to do.

docs/tab-mode.rst has the same table for users; tests pin every row.
"""

from __future__ import annotations

import json
import re

from attrs import field, frozen


@frozen
class Refusal:
    status: int  # what the client gets
    code: str
    message: str
    headers: dict = field(factory=dict)
    # what the gateway may still try before answering: "recaptcha" (fresh token, fresh
    # ids), "fresh" (a new evaluation with the packed history), or None
    retry: str | None = None


def _message(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:300]
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, str):
            return error
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
    return body.strip()[:300]


def _schema_paths(body: str) -> list[str]:
    try:
        issues = json.loads(body)["error"]["issues"]
    except (ValueError, KeyError, TypeError):
        return []
    paths = []
    for issue in issues if isinstance(issues, list) else []:
        if isinstance(issue, dict) and isinstance(issue.get("path"), list):
            paths.append(".".join(str(p) for p in issue["path"]) or "(root)")
    return paths


def retry_after(headers: dict) -> str | None:
    """Seconds to wait: the arena's Retry-After, else the reset of its ratelimit header."""
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    value = lowered.get("retry-after", "").strip()
    if value.isdigit():
        return value
    match = re.search(r"reset=(\d+)", lowered.get("ratelimit", ""))
    return match.group(1) if match else None


def refusal(status: int, headers: dict, body: str, session: str, domain: str) -> Refusal:
    """What the client is told when the arena answered ``status`` with ``body``."""
    text = _message(body)
    tab = f"the {domain} tab of session {session}"
    if 300 <= status < 400:
        return Refusal(502, "ARENA_REDIRECTED",
                       f"LMArena redirected the request (HTTP {status}); reload {tab}")
    if status == 403 and "recaptcha" in body.lower():
        return Refusal(502, "ARENA_RECAPTCHA_FAILED",
                       f"LMArena refused the reCAPTCHA token twice; reload {tab}, and if it "
                       "persists solve any check LMArena shows there", retry="recaptcha")
    if status == 403 and ("just a moment" in body.lower() or body.lstrip().startswith("<")):
        return Refusal(503, "ARENA_CHALLENGE", f"solve the check in {tab}", {"Retry-After": "30"})
    if status == 401:
        return Refusal(401, "ARENA_NOT_SIGNED_IN",
                       f"LMArena says the browser is not signed in: sign in to LMArena in {tab}",
                       retry="fresh")
    if status == 429:
        wait = retry_after(headers) or "60"
        return Refusal(429, "ARENA_RATE_LIMITED",
                       f"LMArena's rate limit for the account of {tab} is reached; "
                       f"retry in {wait} s", {"Retry-After": wait})
    if status == 422:
        return Refusal(400, "ARENA_CONTENT_REJECTED",
                       f"LMArena rejected the content: {text}; change the request")
    if status == 400 and "already has feedback" in body.lower():
        return Refusal(502, "ARENA_BAD_REQUEST",
                       f"LMArena refused to continue the conversation: {text}", retry="fresh")
    if status == 400:
        paths = _schema_paths(body)
        if paths:
            return Refusal(502, "ARENA_SCHEMA_CHANGED",
                           f"LMArena no longer accepts the request shape ({', '.join(paths)}); "
                           "the gateway needs an update")
        return Refusal(502, "ARENA_BAD_REQUEST", f"LMArena refused the request: {text}")
    return Refusal(502, "ARENA_ERROR", f"LMArena answered HTTP {status}: {text}")
