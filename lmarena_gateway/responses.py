"""``POST /v1/responses`` over the chat path: a request in, chat chunks back, events out.

The Responses request becomes a chat request and goes through exactly the route
``/v1/chat/completions`` takes, whatever the upstream. What comes back (one
``chat.completion``, or a stream of ``chat.completion.chunk`` events) is translated on
its way to the client by :class:`Translator`, which stands in for the request: the relay
writes to it, and it writes Responses objects and events to the client. A stream is
translated event by event as it arrives (only an unfinished event is ever held), and
the relay's producer and cancellation stay wired to the real request, so backpressure
and a client that leaves work as they do for chat.
"""

from __future__ import annotations

import json
import uuid

from twisted.logger import Logger

from .errors import ApiError, envelope

log = Logger()
MAX_ANSWER = 16 * 1024 * 1024  # a non-streamed chat answer is one JSON document

# Fields LMArena cannot honour: each answers 400 with a code naming it, never a silent drop.
_UNSUPPORTED = {
    "tools": "LMArena models cannot call tools through the gateway",
    "previous_response_id": "responses are not stored; send the whole conversation in 'input'",
    "conversation": "conversations are not stored; send the whole conversation in 'input'",
    "background": "background responses are not supported",
    "prompt": "stored prompt templates are not supported",
    "reasoning": "reasoning settings cannot be passed to LMArena",
    "include": "extra output ('include') is not available",
    "top_logprobs": "log probabilities are not available",
}
# Passed on to the chat request under the chat name.
_SAMPLING = {"temperature": "temperature", "top_p": "top_p",
             "max_output_tokens": "max_tokens", "user": "user"}
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def _unsupported(field: str, why: str) -> ApiError:
    return ApiError(400, f"UNSUPPORTED_{field.upper().replace('.', '_')}",
                    f"'{field}' is not supported: {why}")


def _invalid(message: str) -> ApiError:
    return ApiError(400, "INVALID_REQUEST", message)


def _present(value) -> bool:
    return value not in (None, False, [], {}, "")


def _content(content, where: str):
    """A message's content as chat content: a string when it is only text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise _invalid(f"{where}.content must be a string or a non-empty list of parts")
    parts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            image = {"url": part["image_url"]}
            if part.get("detail") in ("low", "high", "auto"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        elif kind == "input_image":
            raise _unsupported("input_image.file_id", "give images as image_url (a URL or data URL)")
        elif kind in ("input_file", "input_audio", "refusal"):
            raise _unsupported(kind, "only text and images reach LMArena")
        else:
            raise _invalid(f"{where}.content[{index}] is not a text or image part")
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _messages(body: dict) -> list[dict]:
    messages = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _invalid("'instructions' must be a string")
        if instructions:
            messages.append({"role": "system", "content": instructions})
    given = body.get("input")
    if isinstance(given, str):
        if not given:
            raise _invalid("'input' must not be empty")
        messages.append({"role": "user", "content": given})
        return messages
    if not isinstance(given, list) or not given:
        raise _invalid("'input' must be a string or a non-empty list of message items")
    for index, item in enumerate(given):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise _invalid(f"{where} must be an object")
        kind = item.get("type", "message")
        if kind != "message":
            if kind in ("function_call", "function_call_output", "custom_tool_call",
                        "custom_tool_call_output"):
                raise _unsupported("tools", _UNSUPPORTED["tools"])
            if kind == "item_reference":
                raise _unsupported("item_reference", _UNSUPPORTED["previous_response_id"])
            raise _unsupported(f"input.{kind}" if isinstance(kind, str) else "input",
                               "only message items reach LMArena")
        role = _ROLES.get(str(item.get("role")))
        if role is None:
            raise _invalid(f"{where}.role must be one of user, assistant, system, developer")
        messages.append({"role": role, "content": _content(item.get("content"), where)})
    return messages


def chat_request(body: dict) -> dict:
    """The chat request a Responses request stands for; ApiError for what it cannot be."""
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _invalid("'model' must be a string")
    for field, why in _UNSUPPORTED.items():
        if _present(body.get(field)):
            raise _unsupported(field, why)
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise _unsupported("tool_choice", _UNSUPPORTED["tools"])
    text = body.get("text")
    if text is not None:
        form = text.get("format") if isinstance(text, dict) else "?"
        if form is not None and (not isinstance(form, dict) or form.get("type") != "text"):
            raise _unsupported("text.format", "structured output cannot be enforced on LMArena")
    if body.get("truncation") not in (None, "disabled", "auto"):
        raise _invalid("'truncation' must be 'disabled' or 'auto'")
    chat = {"model": body["model"], "messages": _messages(body)}
    for ours, theirs in _SAMPLING.items():
        if body.get(ours) is not None:
            chat[theirs] = body[ours]
    if body.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}  # usage, if the upstream has it
    return chat


def usage_of(chat_usage) -> dict | None:
    """Chat usage in Responses names; None when the upstream gave none (never invented)."""
    if not isinstance(chat_usage, dict):
        return None
    usage = {"input_tokens": chat_usage.get("prompt_tokens", 0),
             "output_tokens": chat_usage.get("completion_tokens", 0)}
    usage["total_tokens"] = chat_usage.get("total_tokens",
                                           usage["input_tokens"] + usage["output_tokens"])
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    reasoning = (chat_usage.get("completion_tokens_details") or {}).get("reasoning_tokens")
    usage["input_tokens_details"] = {"cached_tokens": cached or 0}
    usage["output_tokens_details"] = {"reasoning_tokens": reasoning or 0}
    return usage


_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


class ResponseShape:
    """The Response object one request builds up: ids, echoed settings, output, usage."""

    def __init__(self, body: dict, clock) -> None:
        self.id = "resp_" + uuid.uuid4().hex
        self.message_id = "msg_" + uuid.uuid4().hex
        self.reasoning_id = "rs_" + uuid.uuid4().hex
        self.created_at = int(clock.seconds())
        self.body = body
        self.model = body["model"]

    def message(self, text: str, status: str) -> dict:
        return {"type": "message", "id": self.message_id, "status": status,
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}

    def reasoning(self, text: str, status: str) -> dict:
        """The upstream's ``reasoning_content`` as OpenAI's reasoning item: its raw text
        in ``content``, no summary (LMArena gives none), nothing encrypted."""
        return {"type": "reasoning", "id": self.reasoning_id, "status": status, "summary": [],
                "content": [{"type": "reasoning_text", "text": text}],
                "encrypted_content": None}

    def response(self, status: str, *, output: list, usage=None, finish=None) -> dict:
        body = self.body
        reason = _INCOMPLETE.get(finish)
        if reason and status == "completed":
            status = "incomplete"
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": status, "model": self.model, "output": output,
            "output_text": "".join(part["text"] for item in output if item["type"] == "message"
                                   for part in item["content"]),
            "usage": usage, "error": None,
            "incomplete_details": {"reason": reason} if reason else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "temperature": body.get("temperature"), "top_p": body.get("top_p"),
            "parallel_tool_calls": False, "tool_choice": "none", "tools": [],
            "text": {"format": {"type": "text"}}, "truncation": body.get("truncation") or "disabled",
            "previous_response_id": None, "reasoning": None,
            "store": False,  # nothing is kept: GET /v1/responses/{id} cannot answer
            "metadata": body.get("metadata") or {}, "user": body.get("user"),
        }


class Translator:
    """Stands in for the client's request: chat answers in, Responses answers out.

    Everything but the body (headers, status, the producer, the connection) passes
    straight through to the real request.
    """

    def __init__(self, request, body: dict, clock, *, stream: bool) -> None:
        self._request = request
        self._shape = ResponseShape(body, clock)
        self._stream = stream
        self._pending = b""  # the unfinished SSE event, or the JSON answer so far
        self._text: list[str] = []
        self._thought: list[str] = []
        self._indexes: dict[str, int] = {}  # "reasoning"/"message": its output_index, once open
        self._usage: dict | None = None
        self._finish = None
        self._sequence = 0
        self._started = False
        self._closed = False

    def __getattr__(self, name):
        return getattr(self._request, name)

    # --- what the relay writes ---

    def write(self, data: bytes) -> None:
        if self._closed:
            return
        if not self._stream:
            self._pending += data
            if len(self._pending) > MAX_ANSWER:
                self._closed = True
                self._request.loseConnection()
            return
        if not self._started:
            self._start()
        if not data:
            self._request.write(b"")  # the relay's push of the headers
            return
        self._pending += data
        while True:
            cut = _event_end(self._pending)
            if cut is None:
                return
            raw, self._pending = self._pending[:cut[0]], self._pending[cut[1]:]
            self._event(raw)
            if self._closed:
                return

    def finish(self) -> None:
        if self._stream:
            if not self._closed:  # ended without [DONE] or an error: say so
                self._error("BRIDGE_STREAM_LOST", "the answer ended before it was complete")
        elif not self._closed:
            self._answer()
        self._request.finish()

    # --- non-streamed ---

    def _answer(self) -> None:
        request = self._request
        try:
            chat = json.loads(self._pending)
            choice = chat["choices"][0]
            text = choice["message"].get("content") or ""
            thought = choice["message"].get("reasoning_content") or ""
            if not isinstance(text, str) or not isinstance(thought, str):
                raise TypeError("content is not text")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            request.setResponseCode(502)
            request.setHeader(b"Content-Type", b"application/json")
            request.write(json.dumps(envelope(
                "the upstream sent a chat answer the gateway cannot read",
                "BRIDGE_BAD_RESPONSE", "bridge_error")).encode())
            return
        if isinstance(chat.get("model"), str):
            self._shape.model = chat["model"]
        finish = choice.get("finish_reason")
        output = [self._shape.message(text, "completed")]
        if thought:
            output.insert(0, self._shape.reasoning(thought, "completed"))
        reply = self._shape.response("completed", output=output,
                                     usage=usage_of(chat.get("usage")), finish=finish)
        request.setHeader(b"Content-Type", b"application/json")
        request.write(json.dumps(reply).encode())

    # --- streamed ---

    def _send(self, kind: str, **fields) -> None:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        self._request.write(f"event: {kind}\ndata: {json.dumps(event)}\n\n".encode())

    def _start(self) -> None:
        self._started = True
        shape = self._shape
        self._send("response.created", response=shape.response("in_progress", output=[]))
        self._send("response.in_progress", response=shape.response("in_progress", output=[]))

    def _open(self, kind: str) -> int:
        """The output_index of the reasoning or message item, added on its first piece:
        reasoning that comes first is item 0 and the answer item 1, as OpenAI orders them."""
        index = self._indexes.get(kind)
        if index is not None:
            return index
        index = self._indexes[kind] = len(self._indexes)
        shape = self._shape
        part: dict[str, object]
        if kind == "reasoning":
            item, part = shape.reasoning("", "in_progress"), {"type": "reasoning_text", "text": ""}
            item_id = shape.reasoning_id
        else:
            item, part = shape.message("", "in_progress"), {"type": "output_text", "text": "",
                                                             "annotations": []}
            item_id = shape.message_id
        self._send("response.output_item.added", output_index=index, item=dict(item, content=[]))
        self._send("response.content_part.added", item_id=item_id, output_index=index,
                   content_index=0, part=part)
        return index

    def _event(self, raw: bytes) -> None:
        data = [line[5:].lstrip() for line in raw.replace(b"\r\n", b"\n").split(b"\n")
                if line.startswith(b"data:")]
        if not data:
            if raw.startswith(b":"):
                self._request.write(raw + b"\n\n")  # keep-alive comments keep proxies open
            return
        payload = b"\n".join(data)
        if payload.strip() == b"[DONE]":
            self._complete()
            return
        try:
            chunk = json.loads(payload)
        except ValueError:
            log.info("unreadable chat chunk skipped: {chunk!r}", chunk=payload[:200])
            return
        if not isinstance(chunk, dict):
            return
        if isinstance(chunk.get("error"), dict):
            error = chunk["error"]
            self._error(str(error.get("code") or "BRIDGE_ERROR"),
                        str(error.get("message") or "the upstream failed"))
            return
        if isinstance(chunk.get("model"), str):
            self._shape.model = chunk["model"]
        if chunk.get("usage"):
            self._usage = usage_of(chunk["usage"])
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = {}
            thought = delta.get("reasoning_content")
            if isinstance(thought, str) and thought:
                self._thought.append(thought)
                self._send("response.reasoning_text.delta", item_id=self._shape.reasoning_id,
                           output_index=self._open("reasoning"), content_index=0, delta=thought)
            piece = delta.get("content")
            if isinstance(piece, str) and piece:
                self._text.append(piece)
                self._send("response.output_text.delta", item_id=self._shape.message_id,
                           output_index=self._open("message"), content_index=0, delta=piece,
                           logprobs=[])
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]

    def _complete(self) -> None:
        shape = self._shape
        self._open("message")  # an empty answer is still one message
        output: list[dict] = []
        for kind, index in sorted(self._indexes.items(), key=lambda pair: pair[1]):
            if kind == "reasoning":
                text = "".join(self._thought)
                self._send("response.reasoning_text.done", item_id=shape.reasoning_id,
                           output_index=index, content_index=0, text=text)
                self._send("response.content_part.done", item_id=shape.reasoning_id,
                           output_index=index, content_index=0,
                           part={"type": "reasoning_text", "text": text})
                item = shape.reasoning(text, "completed")
            else:
                text = "".join(self._text)
                self._send("response.output_text.done", item_id=shape.message_id,
                           output_index=index, content_index=0, text=text, logprobs=[])
                self._send("response.content_part.done", item_id=shape.message_id,
                           output_index=index, content_index=0,
                           part={"type": "output_text", "text": text, "annotations": []})
                item = shape.message(text, "completed")
            self._send("response.output_item.done", output_index=index, item=item)
            output.append(item)
        final = shape.response("completed", output=output, usage=self._usage,
                               finish=self._finish)
        self._send("response.incomplete" if final["status"] == "incomplete"
                   else "response.completed", response=final)
        self._closed = True

    def _error(self, code: str, message: str) -> None:
        self._send("error", code=code, message=message, param=None)
        self._closed = True


def _event_end(buffer: bytes) -> tuple[int, int] | None:
    """Where the first complete SSE event ends: (end of event, start of the next)."""
    ends = [(i, i + len(sep)) for sep in (b"\n\n", b"\r\n\r\n") if (i := buffer.find(sep)) >= 0]
    return min(ends) if ends else None


def serve(proxy, request, clock):
    """The route's work; raises ApiError before anything is sent upstream."""
    def routed(route):
        def parsed(result):
            body, _ = result
            chat = chat_request(body)
            translator = Translator(request, body, clock, stream=chat.get("stream") is True)
            return route.upstream.chat(translator, route, chat, None)

        return proxy.read_json_body(request, required=()).addCallback(parsed)

    return proxy.routed(request, required=True).addCallback(routed)
