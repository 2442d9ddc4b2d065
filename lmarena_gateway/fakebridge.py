"""A stand-in for LMArenaBridge: its three endpoints with canned answers.

It lets a new user watch the whole path work without a browser, and gives tests a real
HTTP upstream. Models named ``fake-error-STATUS`` answer with the bridge's error for
that status, so error handling can be seen too.
"""

from __future__ import annotations

import json
import re
import sys

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.web.server import Site

MODELS = ("fake-model", "claude-3-5-sonnet-20241022", "gpt-4o")
TEXT = "Hello from the fake bridge! Every word you read came through the gateway, chunk by chunk."
_ERRORS = {  # the shapes the real bridge uses for each status
    400: {"detail": "no valid session ID or message ID"},
    401: {"detail": "Invalid or missing API key"},
    404: {"error": "model not found"},
    413: {"error": {"message": "attachment too large", "type": "invalid_request_error",
                    "code": "payload_too_large"}},
    500: {"error": {"message": "processing error", "type": "internal_server_error", "code": None}},
    503: {"detail": "Browser client not connected; open LMArena with the userscript running."},
}


def split_text(text: str, parts: int) -> list[str]:
    """The text in ``parts`` pieces that join back to it exactly."""
    parts = max(1, min(parts, len(text)))
    size, extra = divmod(len(text), parts)
    pieces, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        pieces.append(text[start:end])
        start = end
    return pieces


def chunk_event(model: str, delta: dict, finish: str | None, created: int) -> bytes:
    chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": created,
             "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


class FakeBridge:
    app = Klein()

    def __init__(self, clock, *, chunks: int = 8, delay: float = 0.05,
                 api_key: str | None = None, text: str = TEXT) -> None:
        self.clock = clock
        self.chunks = chunks
        self.delay = delay
        self.api_key = api_key
        self.text = text
        self.seen: list[dict] = []  # what each request carried, for tests and --debug demos

    def _note(self, request, body) -> None:
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.seen.append({"method": request.method.decode(), "path": request.path.decode(),
                          "headers": headers, "body": body})

    def _refuse(self, request):
        if self.api_key is None:
            return None
        if request.getHeader(b"authorization") != f"Bearer {self.api_key}".encode():
            return self._json(request, 401, _ERRORS[401])
        return None

    @staticmethod
    def _json(request, status: int, payload) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(payload).encode()

    @app.route("/v1/models", methods=["GET"])
    def models(self, request):
        self._note(request, None)
        refused = self._refuse(request)
        if refused is not None:
            return refused
        created = int(self.clock.seconds())
        return self._json(request, 200, {"object": "list", "data": [
            {"id": m, "object": "model", "created": created, "owned_by": "LMArenaBridge"}
            for m in MODELS]})

    def _body(self, request):
        try:
            return json.loads(request.content.read())
        except ValueError:
            return None

    def _error_model(self, request, body):
        match = re.fullmatch(r"fake-error-(\d{3})", str(body.get("model", "")))
        if match:
            status = int(match.group(1))
            return self._json(request, status, _ERRORS.get(status, {"detail": f"error {status}"}))
        return None

    def _admit(self, request):
        """Read, note and vet a POST as the bridge does: (body, None) or (body, refusal)."""
        body = self._body(request)
        self._note(request, body)
        refused = self._refuse(request)
        if refused is None and not isinstance(body, dict):
            refused = self._json(request, 400, {"detail": "Invalid JSON request body"})
        if refused is None:
            refused = self._error_model(request, body)
        return body, refused

    @app.route("/v1/chat/completions", methods=["POST"])
    def chat(self, request):
        body, refused = self._admit(request)
        if refused is not None:
            return refused
        model = str(body.get("model"))
        created = int(self.clock.seconds())
        if body.get("stream") is not True:
            return self._json(request, 200, {
                "id": "chatcmpl-fake", "object": "chat.completion", "created": created,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.text},
                             "finish_reason": "stop"}],
                "usage": self._usage()})
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-cache")
        events = [chunk_event(model, {"role": "assistant", "content": piece} if i == 0
                              else {"content": piece}, None, created)
                  for i, piece in enumerate(split_text(self.text, self.chunks))]
        events.append(chunk_event(model, {}, "stop", created))
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            # As OpenAI does: one more chunk, with no choices, carrying the usage.
            usage = {"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                     "created": created, "model": model, "choices": [],
                     "usage": self._usage()}
            events.append(b"data: " + json.dumps(usage).encode() + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return self._play(request, events)

    def _usage(self) -> dict:
        return {"prompt_tokens": 1, "completion_tokens": self.chunks,
                "total_tokens": 1 + self.chunks}

    def _play(self, request, events: list[bytes]) -> Deferred:
        pending: list = []

        def cancel(_):
            for call in pending:
                if call.active():
                    call.cancel()

        done: Deferred = Deferred(cancel)

        def send(index: int) -> None:
            request.write(events[index])
            if index + 1 == len(events):
                done.callback(None)
            else:
                pending[:] = [self.clock.callLater(self.delay, send, index + 1)]

        send(0)
        return done

    @app.route("/v1/images/generations", methods=["POST"])
    def images(self, request):
        body, refused = self._admit(request)
        if refused is not None:
            return refused
        return self._json(request, 200, {"created": int(self.clock.seconds()), "data": [
            {"url": "https://example.invalid/fake-image.png",
             "revised_prompt": str(body.get("prompt", ""))}]})


def main(listen: str, chunks: int, delay_ms: float, api_key: str | None) -> int:
    from twisted.internet.endpoints import serverFromString

    def run(reactor):
        from twisted.internet.error import CannotListenError

        bridge = FakeBridge(reactor, chunks=chunks, delay=delay_ms / 1000.0, api_key=api_key)
        try:
            port = yield serverFromString(reactor, listen).listen(Site(bridge.app.resource()))
        except CannotListenError as e:
            why = getattr(e.socketError, "strerror", None) or e.socketError
            # react() exits with a SystemExit's message: one line, status 1
            raise SystemExit(f"lmgateway fake-bridge: cannot listen on "
                             f"{e.interface or '*'}:{e.port}: {why}") from None
        address = port.getHost()
        print(f"fake bridge listening on http://{address.host}:{address.port}", flush=True)
        yield Deferred()  # until interrupted

    from twisted.internet.defer import inlineCallbacks

    react(inlineCallbacks(run))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "tcp:5102", 8, 50.0, None))
