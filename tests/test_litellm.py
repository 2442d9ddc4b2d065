"""LiteLLM's Python SDK as its users set it up (``openai/<model>``, ``api_base``,
``extra_headers``) against a real gateway on loopback with two sessions, each on a fake
bridge of its own, so the answer's text tells which session served it.

LiteLLM is synchronous here: each call runs in a thread while the reactor serves it.
"""

from __future__ import annotations

import os

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from lmarena_gateway.fakebridge import TEXT

from support.client import sessions_on_two_bridges
from support.processes import REQUIRE_ALL

# LiteLLM fetches its model price list from the network at import unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
try:
    import litellm
except ImportError:
    if REQUIRE_ALL:
        raise
    pytest.skip("litellm is not installed (pip install '.[test]')", allow_module_level=True)

ALPHA_TEXT = "Team alpha's bridge answers this one, word by word, through the gateway."
MESSAGES = [{"role": "user", "content": "Hello!"}]


async def two_sessions(gateway_factory, listen, reactor):
    """``default`` on the gateway's default bridge, ``team-alpha`` on a bridge of its own;
    ``gpt-4`` an alias of ``fake-model`` in both."""
    return await sessions_on_two_bridges(gateway_factory, listen, reactor, "team-alpha",
                                         ALPHA_TEXT, {"gpt-4": "fake-model"})


def complete(url: str, session: str | None, **options):
    headers = {} if session is None else {"X-Session-Name": session}
    return litellm.completion(model=options.pop("model", "openai/gpt-4"), api_base=url + "/v1",
                              api_key="sk-litellm", messages=MESSAGES, extra_headers=headers,
                              **options)


@pytest_twisted.ensureDeferred
async def test_completion_goes_to_the_named_session(gateway_factory, listen, reactor):
    gw, alpha = await two_sessions(gateway_factory, listen, reactor)
    answer = await deferToThread(complete, gw.url, "team-alpha")
    assert answer.choices[0].message.content == ALPHA_TEXT
    assert answer.usage.prompt_tokens == 1 and answer.usage.completion_tokens == 4
    assert [s["path"] for s in alpha.seen] == ["/v1/chat/completions"]
    assert alpha.seen[0]["body"]["model"] == "fake-model"  # the session's alias, resolved
    assert gw.bridge.seen == []  # the default session's bridge was not asked
    # without the header: the session "default", on the default bridge
    answer = await deferToThread(complete, gw.url, None)
    assert answer.choices[0].message.content == TEXT
    assert [s["path"] for s in gw.bridge.seen] == ["/v1/chat/completions"]


@pytest_twisted.ensureDeferred
async def test_streamed_completion(gateway_factory, listen, reactor):
    gw, alpha = await two_sessions(gateway_factory, listen, reactor)

    def stream():
        pieces, usage = [], None
        for chunk in complete(gw.url, "team-alpha", stream=True,
                              stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            usage = getattr(chunk, "usage", None) or usage
        return pieces, usage

    pieces, usage = await deferToThread(stream)
    assert "".join(pieces) == ALPHA_TEXT and len(pieces) > 1
    assert usage.total_tokens == 5  # the bridge's usage chunk, passed on
    assert alpha.seen[0]["body"]["stream"] is True and gw.bridge.seen == []


def failing_call(url: str, stream: bool):
    # the fake bridge answers this model as a bridge without its LMArena tab does
    answer = complete(url, "team-alpha", model="openai/fake-error-503", stream=stream)
    return list(answer) if stream else answer


@pytest_twisted.ensureDeferred
async def test_bridge_not_ready_is_litellms_service_unavailable(gateway_factory, listen,
                                                                 reactor):
    gw, alpha = await two_sessions(gateway_factory, listen, reactor)
    for stream in (False, True):
        with pytest.raises(litellm.ServiceUnavailableError) as caught:
            await deferToThread(failing_call, gw.url, stream)
        error = caught.value
        assert error.status_code == 503
        # LiteLLM keeps the gateway's answer: its envelope, and its message in its own
        assert error.response.json()["error"]["code"] == "BRIDGE_NOT_READY"
        assert error.response.headers["x-should-retry"] == "false"
        assert "bridge: Browser client not connected" in error.message
    # LiteLLM's defaults, and x-should-retry: false: the openai client underneath did not
    # ask again (with num_retries=2 LiteLLM itself asks three more times)
    assert [bool(s["body"].get("stream")) for s in alpha.seen] == [False, True]


@pytest_twisted.ensureDeferred
async def test_unknown_session_is_litellms_not_found(gateway_factory, listen, reactor):
    gw, alpha = await two_sessions(gateway_factory, listen, reactor)
    with pytest.raises(litellm.NotFoundError) as caught:
        await deferToThread(complete, gw.url, "nobody", num_retries=0)
    assert caught.value.status_code == 404
    assert caught.value.response.json()["error"]["code"] == "SESSION_NOT_FOUND"
    assert "'nobody'" in caught.value.message and "/session/register" in caught.value.message
    assert alpha.seen == [] and gw.bridge.seen == []
