"""Bridges that tests steer by hand: hold a stream, write one chunk, die, or answer an error."""

from __future__ import annotations

import json

from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer


class HeldBridge(Resource):
    """Every request is parked in ``arrivals`` for the test to answer."""

    isLeaf = True

    def __init__(self, status: int = 200, content_type: bytes = b"text/event-stream") -> None:
        super().__init__()
        self.status = status
        self.content_type = content_type
        self.arrivals: DeferredQueue = DeferredQueue()

    def render(self, request):
        request.body = request.content.read()
        request.gone = Deferred()
        # fires True when the connection was lost before the response finished
        request.notifyFinish().addBoth(lambda result: request.gone.callback(result is not None))
        request.setResponseCode(self.status)
        request.setHeader(b"Content-Type", self.content_type)
        # send the headers now, as uvicorn does for a streaming response
        request.write(b"")
        self.arrivals.put(request)
        return NOT_DONE_YET


class ErrorBridge(Resource):
    isLeaf = True

    def __init__(self, status: int, body) -> None:
        super().__init__()
        self.status = status
        self.body = body if isinstance(body, bytes) else json.dumps(body).encode()

    def render(self, request):
        request.setResponseCode(self.status)
        request.setHeader(b"Content-Type", b"application/json")
        return self.body


class ChunkCollector(Protocol):
    """A client-side body reader that hands over each chunk as it arrives."""

    def __init__(self) -> None:
        self.chunks: DeferredQueue = DeferredQueue()
        self.received = b""
        self.done: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.chunks.put(data)

    def connectionLost(self, reason) -> None:
        self.done.callback(reason.value)


def event(content: str) -> bytes:
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


@implementer(IPushProducer)
class Flood:
    """A bridge that writes as fast as it is let: stops when its client stops reading."""

    def __init__(self, request, reactor, chunk: bytes, limit: int) -> None:
        self.request = request
        self.reactor = reactor
        self.chunk = chunk
        self.limit = limit
        self.produced = 0
        self.paused = False
        self.stopped = False
        request.registerProducer(self, True)
        self.reactor.callLater(0, self._pump)

    def _pump(self) -> None:
        for _ in range(64):  # a burst, then let the reactor breathe
            if self.paused or self.stopped or self.produced >= self.limit:
                return
            self.request.write(self.chunk)
            self.produced += len(self.chunk)
        self.reactor.callLater(0, self._pump)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self.reactor.callLater(0, self._pump)

    def stopProducing(self) -> None:
        self.stopped = True


class ReasoningBridge(Resource):
    """A bridge whose model thinks first: ``reasoning_content`` deltas, then the answer,
    as LMArena's reasoning models arrive through tab mode; the whole answer at once when
    the request does not stream."""

    isLeaf = True

    def __init__(self, thought: list[str], answer: list[str]) -> None:
        super().__init__()
        self.thought = thought
        self.answer = answer

    def render(self, request):
        body = json.loads(request.content.read())
        if body.get("stream") is not True:
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps({
                "id": "c", "object": "chat.completion", "created": 1, "model": "thinker",
                "choices": [{"index": 0, "finish_reason": "stop", "message": {
                    "role": "assistant", "content": "".join(self.answer),
                    "reasoning_content": "".join(self.thought)}}]}).encode()
        request.setHeader(b"Content-Type", b"text/event-stream")
        deltas = ([{"reasoning_content": piece} for piece in self.thought]
                  + [{"content": piece} for piece in self.answer])
        out = b""
        for delta in deltas:
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1,
                     "model": "thinker",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            out += b"data: " + json.dumps(chunk).encode() + b"\n\n"
        return out + b"data: [DONE]\n\n"
