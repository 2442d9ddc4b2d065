"""/v1/responses: translated into the chat path, answered as a Response or its events.

The real openai SDK drives it over loopback; the translation of a stream is pinned in
memory too, chunk by chunk, with the chunks cut wherever the network may cut them.
"""

import json

import openai
import pytest
import pytest_twisted
import treq
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from lmarena_gateway.errors import ApiError
from lmarena_gateway.fakebridge import TEXT
from lmarena_gateway.responses import Translator, chat_request

from bridges import ChunkCollector, HeldBridge, ReasoningBridge, event
from support.client import SESSION, call

HEADERS = {"X-Session-Name": "team-alpha", "X-Target-Domain": "lmarena.ai"}


async def sdk_for(gateway_factory, **config):
    gw = await gateway_factory(**config)
    await call("POST", gw.url + "/session/register", dict(SESSION, models={"gpt-4": "fake-model"}))
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-anything", max_retries=0,
                           timeout=20, default_headers=HEADERS)
    return gw, client


# --- the request translation ---


def test_string_input_and_instructions_become_messages():
    chat = chat_request({"model": "m", "input": "Hi", "instructions": "Be brief.",
                         "max_output_tokens": 50, "temperature": 0.2})
    assert chat == {"model": "m", "max_tokens": 50, "temperature": 0.2, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}


def test_message_items_with_parts_become_messages():
    chat = chat_request({"model": "m", "stream": True, "input": [
        {"role": "developer", "content": "Rules."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"},
                                                        {"type": "input_text", "text": "b"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "earlier"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "see"},
                                     {"type": "input_image", "image_url": "data:image/png;base64,AA"}]},
    ]})
    assert chat["messages"] == [
        {"role": "system", "content": "Rules."},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "earlier"},
        {"role": "user", "content": [{"type": "text", "text": "see"}, {"type": "image_url",
                                      "image_url": {"url": "data:image/png;base64,AA"}}]},
    ]
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("extra, code", [
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "UNSUPPORTED_TOOLS"),
    ({"tool_choice": "required"}, "UNSUPPORTED_TOOL_CHOICE"),
    ({"previous_response_id": "resp_1"}, "UNSUPPORTED_PREVIOUS_RESPONSE_ID"),
    ({"conversation": "conv_1"}, "UNSUPPORTED_CONVERSATION"),
    ({"background": True}, "UNSUPPORTED_BACKGROUND"),
    ({"reasoning": {"effort": "high"}}, "UNSUPPORTED_REASONING"),
    ({"include": ["reasoning.encrypted_content"]}, "UNSUPPORTED_INCLUDE"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {}}}},
     "UNSUPPORTED_TEXT_FORMAT"),
    ({"top_logprobs": 3}, "UNSUPPORTED_TOP_LOGPROBS"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]},
     "UNSUPPORTED_TOOLS"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "UNSUPPORTED_ITEM_REFERENCE"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "UNSUPPORTED_INPUT_FILE"),
    ({"input": []}, "INVALID_REQUEST"),
    ({"input": [{"role": "tool", "content": "x"}]}, "INVALID_REQUEST"),
    ({"input": 5}, "INVALID_REQUEST"),
])
def test_what_cannot_be_honoured_is_refused_by_name(extra, code):
    with pytest.raises(ApiError) as refused:
        chat_request(dict({"model": "m", "input": "Hi"}, **extra))
    assert (refused.value.status, refused.value.code) == (400, code)


def test_harmless_settings_are_accepted():
    chat = chat_request({"model": "m", "input": "Hi", "store": False, "tool_choice": "auto",
                         "tools": [], "text": {"format": {"type": "text"}},
                         "metadata": {"k": "v"}, "truncation": "disabled", "include": []})
    assert chat["messages"] == [{"role": "user", "content": "Hi"}]


# --- the stream translation, in memory ---


class Sink:
    """The client's request as the translator sees it."""

    def __init__(self):
        self.written = b""
        self.finished = False
        self.headers = {}

    def write(self, data):
        self.written += data

    def finish(self):
        self.finished = True

    def setHeader(self, name, value):
        self.headers[name] = value


def events_of(raw: bytes) -> list[dict]:
    found = []
    for block in raw.split(b"\n\n"):
        lines = block.split(b"\n")
        data = [line[6:] for line in lines if line.startswith(b"data: ")]
        if data:
            kind = [line[7:].decode() for line in lines if line.startswith(b"event: ")]
            payload = json.loads(b"\n".join(data))
            assert kind == [payload["type"]]
            found.append(payload)
    return found


def chunk(content=None, finish=None, usage=None) -> bytes:
    body = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "fake-model",
            "choices": [] if usage else [{"index": 0, "delta": {"content": content} if content
                                          else {}, "finish_reason": finish}]}
    if usage:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def test_each_chunk_is_translated_as_it_arrives_even_cut_in_two():
    sink = Sink()
    translator = Translator(sink, {"model": "gpt-4", "input": "Hi"}, Clock(), stream=True)
    translator.write(b"")
    opening = events_of(sink.written)
    assert [e["type"] for e in opening] == ["response.created", "response.in_progress"]
    first = chunk("Hel")
    translator.write(first[:17])  # half an event: nothing yet
    assert events_of(sink.written) == opening
    translator.write(first[17:])
    # the message item opens with its first piece (a reasoning item may come before it)
    assert [e["type"] for e in events_of(sink.written)[2:]] == [
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta"]
    assert events_of(sink.written)[-1]["delta"] == "Hel"
    translator.write(chunk("lo") + chunk(finish="stop"))
    translator.write(chunk(usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}))
    translator.write(b"data: [DONE]\n\n")
    translator.finish()
    events = events_of(sink.written)
    assert [e["type"] for e in events[4:]] == [
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[6]["text"] == "Hello"
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["model"] == "fake-model"
    assert done["output"][0]["content"][0]["text"] == "Hello"
    assert done["usage"]["input_tokens"] == 3 and done["usage"]["output_tokens"] == 2
    assert sink.finished


def thinking(text: str) -> bytes:
    body = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "thinker",
            "choices": [{"index": 0, "delta": {"reasoning_content": text}, "finish_reason": None}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def test_reasoning_content_becomes_a_reasoning_item_before_the_message():
    sink = Sink()
    translator = Translator(sink, {"model": "m", "input": "Hi"}, Clock(), stream=True)
    translator.write(thinking("Let me ") + thinking("think."))
    translator.write(chunk("Hi") + chunk(" there"))
    translator.write(chunk(finish="stop") + b"data: [DONE]\n\n")
    translator.finish()
    events = events_of(sink.written)
    assert [(e["type"], e.get("output_index")) for e in events[2:]] == [
        ("response.output_item.added", 0), ("response.content_part.added", 0),
        ("response.reasoning_text.delta", 0), ("response.reasoning_text.delta", 0),
        ("response.output_item.added", 1), ("response.content_part.added", 1),
        ("response.output_text.delta", 1), ("response.output_text.delta", 1),
        ("response.reasoning_text.done", 0), ("response.content_part.done", 0),
        ("response.output_item.done", 0),
        ("response.output_text.done", 1), ("response.content_part.done", 1),
        ("response.output_item.done", 1), ("response.completed", None)]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    added = events[2]["item"]
    assert added["type"] == "reasoning" and added["id"].startswith("rs_")
    assert events[3]["part"] == {"type": "reasoning_text", "text": ""}
    assert [e["delta"] for e in events[4:6]] == ["Let me ", "think."]
    assert all(e["item_id"] == added["id"] for e in events[3:6])
    assert events[10]["text"] == "Let me think."
    final = events[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["reasoning", "message"]
    assert final["output"][0]["content"] == [{"type": "reasoning_text", "text": "Let me think."}]
    assert final["output"][0]["summary"] == [] and final["output"][0]["status"] == "completed"
    assert final["output_text"] == "Hi there"  # the answer's text only


def test_without_reasoning_the_message_is_item_zero_even_when_empty():
    sink = Sink()
    translator = Translator(sink, {"model": "m", "input": "Hi"}, Clock(), stream=True)
    translator.write(chunk(finish="stop") + b"data: [DONE]\n\n")
    translator.finish()
    events = events_of(sink.written)
    assert [(e["type"], e.get("output_index")) for e in events[2:-1]] == [
        ("response.output_item.added", 0), ("response.content_part.added", 0),
        ("response.output_text.done", 0), ("response.content_part.done", 0),
        ("response.output_item.done", 0)]
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == ""


@pytest.mark.parametrize("stream", [False, True])
@pytest_twisted.ensureDeferred
async def test_sdk_reads_reasoning_items(gateway_factory, listen, stream):
    bridge = ReasoningBridge(["Weighing ", "the options."], ["Take ", "the train."])
    gw, client = await sdk_for(gateway_factory, bridge_url=await listen(bridge))

    def ask():
        if not stream:
            return client.responses.create(model="gpt-4", input="How should I go?"), []
        with client.responses.stream(model="gpt-4", input="How should I go?") as events:
            seen = [e for e in events]
            return events.get_final_response(), seen

    final, events = await deferToThread(ask)
    assert final.output_text == "Take the train."
    reasoning, message = final.output
    assert reasoning.type == "reasoning" and message.type == "message"
    assert [part.text for part in reasoning.content] == ["Weighing the options."]
    if stream:
        deltas = [e.delta for e in events if e.type == "response.reasoning_text.delta"]
        assert deltas == ["Weighing ", "the options."]


def test_no_usage_from_the_upstream_is_none_not_invented():
    sink = Sink()
    translator = Translator(sink, {"model": "m", "input": "Hi"}, Clock(), stream=True)
    translator.write(chunk("x") + chunk(finish="stop") + b"data: [DONE]\n\n")
    translator.finish()
    assert events_of(sink.written)[-1]["response"]["usage"] is None


def test_an_error_event_from_the_relay_becomes_an_error_event():
    sink = Sink()
    translator = Translator(sink, {"model": "m", "input": "Hi"}, Clock(), stream=True)
    error = {"error": {"message": "lost", "type": "bridge_error", "code": "BRIDGE_STREAM_LOST"}}
    translator.write(chunk("par") + b"data: " + json.dumps(error).encode()
                     + b"\n\ndata: [DONE]\n\n")
    translator.finish()
    events = events_of(sink.written)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "BRIDGE_STREAM_LOST"
    assert "response.completed" not in [e["type"] for e in events]


def test_a_length_stop_is_incomplete():
    sink = Sink()
    translator = Translator(sink, {"model": "m", "input": "Hi"}, Clock(), stream=True)
    translator.write(chunk("x") + chunk(finish="length") + b"data: [DONE]\n\n")
    final = events_of(sink.written)[-1]
    assert final["type"] == "response.incomplete"
    assert final["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_keepalive_comments_pass_through():
    sink = Sink()
    translator = Translator(sink, {"model": "m", "input": "Hi"}, Clock(), stream=True)
    translator.write(b": keep-alive\n\n")
    assert sink.written.endswith(b": keep-alive\n\n")


# --- the real SDK over loopback ---


@pytest_twisted.ensureDeferred
async def test_sdk_responses_create(gateway_factory):
    gw, client = await sdk_for(gateway_factory)
    response = await deferToThread(client.responses.create, model="gpt-4", input="Hello!",
                                   instructions="Be brief.")
    assert response.output_text == TEXT
    assert response.status == "completed" and response.model == "fake-model"
    assert response.usage.input_tokens == 1 and response.usage.output_tokens == 4
    sent = gw.bridge.seen[-1]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["model"] == "fake-model"  # the session's alias applied
    assert sent["body"]["messages"] == [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Hello!"}]


@pytest_twisted.ensureDeferred
async def test_sdk_responses_streamed(gateway_factory):
    gw, client = await sdk_for(gateway_factory)

    def stream():
        return list(client.responses.create(model="gpt-4", input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Hello!"}]}],
            stream=True))

    events = await deferToThread(stream)
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == TEXT
    assert events[-1].response.output_text == TEXT
    assert events[-1].response.usage.total_tokens == 5  # the fake bridge's usage chunk
    assert gw.bridge.seen[-1]["body"]["stream_options"] == {"include_usage": True}


@pytest_twisted.ensureDeferred
async def test_sdk_stream_helper_accumulates(gateway_factory):
    gw, client = await sdk_for(gateway_factory)

    def run():
        with client.responses.stream(model="gpt-4", input="Hello!") as stream:
            for _ in stream:
                pass
            return stream.get_final_response()

    final = await deferToThread(run)
    assert final.output_text == TEXT


@pytest_twisted.ensureDeferred
async def test_sdk_sees_unsupported_features_by_code(gateway_factory):
    gw, client = await sdk_for(gateway_factory)
    with pytest.raises(openai.BadRequestError) as caught:
        await deferToThread(client.responses.create, model="gpt-4", input="Hi",
                            previous_response_id="resp_123")
    assert caught.value.code == "UNSUPPORTED_PREVIOUS_RESPONSE_ID"
    with pytest.raises(openai.BadRequestError) as caught:
        await deferToThread(client.responses.create, model="gpt-4", input="Hi", tools=[
            {"type": "function", "name": "f", "parameters": {"type": "object"}}])
    assert caught.value.code == "UNSUPPORTED_TOOLS"
    assert gw.bridge.seen == []  # refused before anything went upstream


@pytest_twisted.ensureDeferred
async def test_bridge_errors_keep_their_status_and_envelope(gateway_factory):
    gw, client = await sdk_for(gateway_factory)
    with pytest.raises(openai.InternalServerError) as caught:
        await deferToThread(client.responses.create, model="fake-error-503", input="Hi")
    assert caught.value.status_code == 503 and caught.value.code == "BRIDGE_NOT_READY"
    assert caught.value.response.headers["x-should-retry"] == "false"


@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_stops_the_upstream(gateway_factory, listen, reactor):
    bridge = HeldBridge()
    gw = await gateway_factory(bridge_url=await listen(bridge))
    await call("POST", gw.url + "/session/register", SESSION)
    response = await treq.post(gw.url + "/v1/responses", headers=HEADERS, unbuffered=True,
                               json={"model": "m", "input": "Hi", "stream": True})
    collector = ChunkCollector()
    response.deliverBody(collector)
    held = await bridge.arrivals.get()
    held.write(event("first"))
    seen = b""
    while b"response.output_text.delta" not in seen:
        seen += await collector.chunks.get()
    assert b'"delta": "first"' in seen  # translated while the bridge holds the rest
    collector.transport.stopProducing()
    assert await held.gone is True


@pytest_twisted.ensureDeferred
async def test_stored_responses_are_not_found(gateway_factory):
    gw = await gateway_factory()
    status, _, answer = await call("GET", gw.url + "/v1/responses/resp_123")
    assert status == 404 and answer["error"]["code"] == "RESPONSE_NOT_FOUND"
