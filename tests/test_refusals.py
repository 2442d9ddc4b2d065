"""Every row of LMArena's refusal table, as the client is told it."""

import pytest

from lmarena_gateway.refusals import refusal

ROWS = [
    (403, {}, '{"error":"recaptcha validation failed"}', 502, "ARENA_RECAPTCHA_FAILED", "recaptcha"),
    (403, {}, "<!DOCTYPE html><title>Just a moment...</title>", 503, "ARENA_CHALLENGE", None),
    (401, {}, '{"error":"Unauthorized"}', 401, "ARENA_NOT_SIGNED_IN", "fresh"),
    (429, {"Retry-After": "7"}, "{}", 429, "ARENA_RATE_LIMITED", None),
    (422, {}, '{"error":"Request rejected: Content violates our terms of use"}', 400,
     "ARENA_CONTENT_REJECTED", None),
    (400, {}, '{"success":false,"error":{"issues":[{"path":["userMessage","content"]}]}}', 502,
     "ARENA_SCHEMA_CHANGED", None),
    (400, {}, '{"error":"Message already has feedback, cannot retry"}', 502,
     "ARENA_BAD_REQUEST", "fresh"),
    (302, {}, "", 502, "ARENA_REDIRECTED", None),
    (500, {}, "oops", 502, "ARENA_ERROR", None),
]


@pytest.mark.parametrize("status, headers, body, answer, code, retry", ROWS,
                         ids=[row[4] + f"-{row[0]}" for row in ROWS])
def test_each_refusal_has_its_code_and_says_what_to_do(status, headers, body, answer, code,
                                                       retry):
    found = refusal(status, headers, body, "team-alpha", "arena.ai")
    assert (found.status, found.code, found.retry) == (answer, code, retry)
    assert found.message


def test_the_rate_limit_waits_as_long_as_the_arena_says():
    assert refusal(429, {"retry-after": "42"}, "", "a", "arena.ai").headers == {"Retry-After": "42"}
    found = refusal(429, {"ratelimit": "limit=3000, remaining=0, reset=17"}, "", "a", "arena.ai")
    assert found.headers == {"Retry-After": "17"}


def test_the_schema_change_names_the_paths():
    found = refusal(400, {}, '{"success":false,"error":{"issues":[{"path":["a","b"]},'
                             '{"path":["modality"]}]}}', "a", "arena.ai")
    assert "a.b, modality" in found.message
