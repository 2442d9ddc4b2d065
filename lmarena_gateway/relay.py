"""The bridge's answer on its way to the client: chunk by chunk, errors in the envelope.

The relay is a small protocol given to ``response.deliverBody``: each chunk is written to
the client the moment it arrives (no re-assembly of lines), and the bridge connection is
the request's producer, so a client that reads slowly pauses the bridge instead of
filling the gateway's memory.
"""

from __future__ import annotations

import json
import time
from http import HTTPStatus
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from .errors import envelope, note_error
from .site import request_id

log = Logger()
DONE = b"data: [DONE]"


def sse_error(message: str, code: str, kind: str = "bridge_error") -> bytes:
    """An error event and the end of the stream: what OpenAI clients can read mid-stream."""
    event = json.dumps(envelope(message, code, kind))
    return f"data: {event}\n\n".encode() + DONE + b"\n\n"


class Relay(Protocol):
    """Writes the bridge's body to the client as it arrives; never re-assembles it."""

    transport: Any  # the bridge connection: a producer we pause, resume and stop

    def __init__(self, request, clock, *, sse: bool, idle_timeout: float,
                 keepalive: float, upstream_url: str, finished: Deferred,
                 label: str = "the bridge", metrics=None, sent_at: float = 0.0,
                 codes: tuple[str, str] = ("BRIDGE_TIMEOUT", "BRIDGE_STREAM_LOST")) -> None:
        self.request = request
        self.metrics = metrics
        self.sent_at = sent_at  # when the bridge request left: the first byte's clock
        self.clock = clock
        self.sse = sse
        self.idle_timeout = idle_timeout
        self.keepalive = keepalive if sse else 0
        self.upstream_url = upstream_url  # for the log only
        self.label = label  # names the bridge in messages a client shows
        self.timeout_code, self.lost_code = codes  # of its silence, of its loss
        self.finished = finished
        self.tail = b"\n\n"  # the last bytes written: are we between two events?
        self.seen_done = False
        self.stopped = False
        self.bytes = 0
        self._idle: Any = None  # IDelayedCall, from connectionMade on
        self._ping: Any = None

    def connectionMade(self) -> None:
        if self.sse:
            self.request.write(b"")  # send our headers now: clients wait for them
        self.request.registerProducer(self.transport, True)
        self._idle = self.clock.callLater(self.idle_timeout, self._idle_expired)
        if self.keepalive:
            self._ping = self.clock.callLater(self.keepalive, self._send_keepalive)

    def dataReceived(self, data: bytes) -> None:
        if self.stopped:
            return
        self.request.write(data)
        if self.metrics is not None:
            if not self.bytes:
                self.metrics.first_byte(time.monotonic() - self.sent_at, stream=self.sse)
            self.metrics.relayed(len(data))
        self.bytes += len(data)
        if self.sse and not self.seen_done:
            self.seen_done = DONE in self.tail[-len(DONE):] + data
        self.tail = (self.tail + data)[-16:]
        self._idle.reset(self.idle_timeout)
        if self._ping is not None and self._ping.active():
            self._ping.reset(self.keepalive)

    def _between_events(self) -> bool:
        return self.tail.endswith(b"\n\n") or self.tail.endswith(b"\r\n\r\n")

    def _send_keepalive(self) -> None:
        if self._between_events():
            self.request.write(b": keep-alive\n\n")
        self._ping = self.clock.callLater(self.keepalive, self._send_keepalive)

    def _idle_expired(self) -> None:
        self._end_with_error(
            f"{self.label} sent nothing for {self.idle_timeout:g} s", self.timeout_code,
        )
        self.transport.stopProducing()

    def _end_with_error(self, message: str, code: str) -> None:
        if self.metrics is not None:
            self.metrics.upstream_error(code)
        note_error(self.request, code)
        self.stopped = True
        self._cancel_timers()
        log.info("bridge {url} {code}: {message}", url=self.upstream_url, code=code,
                 message=message, request_id=request_id(self.request))
        if self.sse:
            prefix = b"" if self._between_events() else b"\n\n"
            self.request.write(prefix + sse_error(message, code))
            self._finish()
        elif not self.bytes:
            # Nothing sent yet (a JSON answer's headers go with its first bytes): the
            # client can still be told, in the envelope.
            self.request.unregisterProducer()
            set_status(self.request, 504 if code == "BRIDGE_TIMEOUT" else 502)
            self.request.setHeader(b"Content-Type", b"application/json")
            self.finished.callback(json.dumps(envelope(message, code, "bridge_error")).encode())
        else:
            # A JSON body cut short must not look complete. Finishing the request (or a
            # plain close, which flushes what Klein writes next) would send the chunked
            # terminator; an abort discards everything written after it, so Klein may
            # finish the request into the void.
            log.warn("bridge body lost after {bytes} bytes, client connection aborted: "
                     "{message}", bytes=self.bytes, message=message)
            self.request.unregisterProducer()
            self.request.transport.abortConnection()
            self.finished.callback(None)

    def _cancel_timers(self) -> None:
        for call in (self._idle, self._ping):
            if call is not None and call.active():
                call.cancel()

    def _finish(self) -> None:
        self.request.unregisterProducer()
        self.request.finish()
        self.finished.callback(None)

    def stop(self) -> None:
        """The client went away: drop the bridge connection too."""
        if self.stopped:
            return
        self.stopped = True
        self._cancel_timers()
        self.transport.stopProducing()
        if not self.finished.called:
            self.finished.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.stopped:
            return
        clean = reason.check(ResponseDone)
        if self.sse and not self.seen_done:
            why = "closed the stream" if clean else "was lost"
            self._end_with_error(
                f"{self.label} {why} before the answer was complete", self.lost_code,
            )
        elif not self.sse and not clean:
            self._end_with_error(f"{self.label} was lost mid-answer", self.lost_code)
        else:
            self.stopped = True
            self._cancel_timers()
            self._finish()


def set_status(request, status: int) -> None:
    """Twisted's table lacks some reasons (429 comes out as "Unknown Status")."""
    try:
        phrase = HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = None
    request.setResponseCode(status, phrase)
