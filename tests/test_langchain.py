"""LangChain's ChatOpenAI as its users set it up, over chat completions and (with
``use_responses_api``) the Responses API, against a real gateway on loopback."""

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from lmarena_gateway.fakebridge import TEXT

from support.client import SESSION, call


def chat_model(url: str, **options):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model="gpt-4", base_url=url + "/v1", api_key="sk-langchain",
                      max_retries=0, default_headers={"X-Session-Name": "team-alpha"},
                      **options)


@pytest.mark.parametrize("responses", [False, True])
@pytest_twisted.ensureDeferred
async def test_chat_openai_invoke_and_stream(gateway_factory, responses):
    gw = await gateway_factory()
    await call("POST", gw.url + "/session/register", dict(SESSION, models={"gpt-4": "fake-model"}))
    model = chat_model(gw.url, use_responses_api=responses, stream_usage=True)
    answer = await deferToThread(model.invoke, "Hello!")
    assert answer.text == TEXT
    # the Response's own id when it went through /v1/responses, the chat one otherwise
    seen_id = answer.response_metadata.get("id") or answer.id
    assert seen_id.startswith("resp_" if responses else "chatcmpl-fake"), answer.response_metadata
    assert answer.usage_metadata["input_tokens"] == 1
    pieces = await deferToThread(lambda: [chunk.text for chunk in model.stream("Hello!")])
    assert "".join(pieces) == TEXT and len([p for p in pieces if p]) > 1
    path = gw.bridge.seen[-1]["path"]
    assert path == "/v1/chat/completions"  # /v1/responses is translated onto the chat path
