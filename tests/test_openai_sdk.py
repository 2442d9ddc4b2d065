"""The official openai SDK, unchanged, against a real gateway in front of a real bridge socket.

The SDK is synchronous: each call runs in a thread while the reactor serves it.
"""

import openai
import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from lmarena_gateway.fakebridge import TEXT

from bridges import ErrorBridge, HeldBridge, event
from support.client import SESSION, call
from support.processes import free_port

MESSAGES = [{"role": "user", "content": "Hello!"}]


async def sdk_for(gateway_factory, session_name="team-alpha", **config):
    gw = await gateway_factory(**config)
    await call("POST", gw.url + "/session/register",
               dict(SESSION, session_name=session_name, models={"gpt-4": "fake-model"}))
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-anything", max_retries=0,
                           timeout=20, default_headers={"X-Session-Name": session_name,
                                                        "X-Target-Domain": "lmarena.ai"})
    return gw, client


@pytest_twisted.ensureDeferred
async def test_models_list(gateway_factory):
    gw, client = await sdk_for(gateway_factory)
    models = await deferToThread(lambda: [m.id for m in client.models.list()])
    assert "fake-model" in models and "gpt-4" in models


@pytest_twisted.ensureDeferred
async def test_chat_without_stream(gateway_factory):
    gw, client = await sdk_for(gateway_factory)
    completion = await deferToThread(client.chat.completions.create, model="gpt-4", messages=MESSAGES)
    assert completion.choices[0].message.content == TEXT
    assert completion.model == "fake-model"  # the alias reached the bridge as its target
    assert gw.bridge.seen[-1]["body"]["model"] == "fake-model"


@pytest_twisted.ensureDeferred
async def test_chat_streamed(gateway_factory):
    gw, client = await sdk_for(gateway_factory)

    def stream():
        deltas = []
        for chunk in client.chat.completions.create(model="gpt-4", messages=MESSAGES, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                deltas.append(chunk.choices[0].delta.content)
        return deltas

    deltas = await deferToThread(stream)
    assert len(deltas) > 1
    assert "".join(deltas) == TEXT


@pytest_twisted.ensureDeferred
async def test_images(gateway_factory):
    gw, client = await sdk_for(gateway_factory)
    result = await deferToThread(client.images.generate, model="gpt-4", prompt="a red fox")
    assert result.data[0].url.endswith(".png")
    assert gw.bridge.seen[-1]["body"]["model"] == "fake-model"


@pytest_twisted.ensureDeferred
async def test_unknown_session_is_not_found(gateway_factory):
    gw, client = await sdk_for(gateway_factory)
    other = client.with_options(default_headers={"X-Session-Name": "nobody"})
    with pytest.raises(openai.NotFoundError) as caught:
        await deferToThread(other.chat.completions.create, model="m", messages=MESSAGES)
    assert caught.value.code == "SESSION_NOT_FOUND"
    assert "/session/register" in caught.value.message


@pytest_twisted.ensureDeferred
async def test_bad_request(gateway_factory):
    gw, client = await sdk_for(gateway_factory)
    with pytest.raises(openai.BadRequestError) as caught:
        await deferToThread(client.chat.completions.create, model="m", messages=[])
    assert caught.value.code == "INVALID_REQUEST"


@pytest_twisted.ensureDeferred
async def test_bridge_not_ready_on_a_stream(gateway_factory, listen):
    bridge = ErrorBridge(503, {"detail": "Browser client not connected"})
    gw, client = await sdk_for(gateway_factory, bridge_url=await listen(bridge))
    with pytest.raises(openai.InternalServerError) as caught:
        await deferToThread(lambda: list(client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True)))
    assert caught.value.status_code == 503
    assert caught.value.code == "BRIDGE_NOT_READY"
    assert "Browser client not connected" in caught.value.message


@pytest_twisted.ensureDeferred
async def test_bridge_unreachable(gateway_factory):
    gw, client = await sdk_for(gateway_factory, bridge_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(openai.InternalServerError) as caught:
        await deferToThread(client.chat.completions.create, model="m", messages=MESSAGES)
    assert caught.value.status_code == 502 and caught.value.code == "BRIDGE_ERROR"


@pytest_twisted.ensureDeferred
async def test_bridge_lost_mid_stream_raises_in_the_sdk(gateway_factory, listen):
    bridge = HeldBridge()
    gw, client = await sdk_for(gateway_factory, bridge_url=await listen(bridge))
    received = []

    def stream():
        for chunk in client.chat.completions.create(model="m", messages=MESSAGES, stream=True):
            received.append(chunk.choices[0].delta.content)

    streaming = deferToThread(stream)
    held = await bridge.arrivals.get()
    held.write(event("partial"))
    held.channel.transport.loseConnection()
    with pytest.raises(openai.APIError) as caught:
        await streaming
    assert received == ["partial"]
    assert caught.value.body["code"] == "BRIDGE_STREAM_LOST"


@pytest_twisted.ensureDeferred
async def test_models_retrieve(gateway_factory):
    gw, client = await sdk_for(gateway_factory)
    model = await deferToThread(client.models.retrieve, "gpt-4")
    assert model.id == "gpt-4" and "fake-model" in model.owned_by
    with pytest.raises(openai.NotFoundError) as caught:
        await deferToThread(client.models.retrieve, "no-such-model")
    assert caught.value.code == "MODEL_NOT_FOUND"


@pytest_twisted.ensureDeferred
async def test_legacy_completions_and_embeddings_say_what_to_use(gateway_factory):
    gw, client = await sdk_for(gateway_factory)
    with pytest.raises(openai.NotFoundError) as caught:
        await deferToThread(client.completions.create, model="gpt-4", prompt="Hi")
    assert caught.value.code == "UNSUPPORTED_ENDPOINT"
    assert "/v1/chat/completions" in caught.value.message
    with pytest.raises(openai.NotFoundError) as caught:
        await deferToThread(client.embeddings.create, model="gpt-4", input="Hi")
    assert caught.value.code == "UNSUPPORTED_ENDPOINT"


@pytest_twisted.ensureDeferred
async def test_the_sdk_does_not_retry_a_bridge_without_a_browser(gateway_factory):
    gw, client = await sdk_for(gateway_factory)
    retrying = client.with_options(max_retries=3)
    with pytest.raises(openai.InternalServerError) as caught:
        await deferToThread(retrying.chat.completions.create, model="fake-error-503",
                            messages=MESSAGES)
    assert caught.value.code == "BRIDGE_NOT_READY"
    assert len(gw.bridge.seen) == 1  # x-should-retry: false, honoured
    with pytest.raises(openai.InternalServerError):
        await deferToThread(retrying.with_options(timeout=60).chat.completions.create,
                            model="fake-error-502", messages=MESSAGES)
    assert len(gw.bridge.seen) == 1 + 4  # a 502 is retried as usual: the header mattered


@pytest_twisted.ensureDeferred
async def test_openwebui_base_url_with_a_trailing_slash(gateway_factory):
    gw, client = await sdk_for(gateway_factory)
    slashed = client.with_options(base_url=gw.url + "/v1//")
    completion = await deferToThread(slashed.chat.completions.create, model="gpt-4",
                                     messages=MESSAGES)
    assert completion.choices[0].message.content == TEXT


@pytest_twisted.ensureDeferred
async def test_usage_passes_through_a_stream_when_asked_for(gateway_factory):
    gw, client = await sdk_for(gateway_factory)

    def stream(**options):
        return list(client.chat.completions.create(model="gpt-4", messages=MESSAGES,
                                                   stream=True, **options))

    chunks = await deferToThread(stream, stream_options={"include_usage": True})
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 5
    chunks = await deferToThread(stream)
    assert all(chunk.usage is None for chunk in chunks)  # not asked for: none invented
