"""Client JSON bodies: large ones parsed off the reactor, and none of absurd structure.

``json.loads`` holds the GIL, so a thread does not help: a 17 MiB body of a million keys
stalled every other request for 1-5 s. Every route that parses a JSON body asks
:class:`Bodies`. A body of at most :data:`THRESHOLD` bytes is parsed on the reactor (a
few milliseconds at most); a larger one goes to one of a few child processes
(:class:`BodyPool`, ``--body-workers``), which parse it and send the value back pickled.

The reactor never holds a large body whole for this: a body still in twisted.web's
temporary file (:class:`FileBody`) is written to the worker in 64 KiB pieces as the pipe
drains, the answer is unpickled from the receive buffer without a copy, and a model
alias that rewrites the body for the bridge is applied in the worker, which sends the
rewritten bytes back (re-serialising 16 MiB on the reactor took 46 ms).

Sending back a million-key value would cost the reactor as much as parsing it, so a
body of more than :data:`MAX_VALUES` JSON values (objects, arrays, strings, numbers,
...) is refused, whatever its size, with 413 ``BODY_TOO_COMPLEX``. A legitimate request
is far below that: a long conversation is a few values a message, and a 10 MiB prompt
is one string, whose round trip costs a copy.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import sys
from collections import deque
from typing import Any, Union

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from .errors import ApiError, parse_json

log = Logger()
THRESHOLD = 256 * 1024  # larger bodies are parsed by a worker process
PARSE_TIMEOUT = 30.0  # seconds a worker may take over one body (--body-parse-timeout)
MAX_VALUES = 100_000  # JSON values a body may hold, on every route
WORKER_NICENESS = 10  # on a busy machine the reactor gets the CPU first
_FRAME = struct.Struct("!Q")
CHUNK = 64 * 1024  # what the reactor copies of a large body at a time


@frozen
class FileBody:
    """A body left in the file twisted.web received it into, read in pieces, never whole
    on the reactor; ``read`` gives it whole, for the few places that need bytes."""

    file: Any
    size: int

    @classmethod
    def of(cls, content) -> "FileBody":
        content.seek(0, io.SEEK_END)
        size = content.tell()
        content.seek(0)
        return cls(content, size)

    def read(self) -> bytes:
        self.file.seek(0)
        return self.file.read(self.size)

    def __len__(self) -> int:
        return self.size


Body = Union[bytes, FileBody]


def rewritten(value: Any, aliases: dict[str, str] | None) -> bytes | None:
    """The body as the bridge gets it when its model is one of the session's aliases."""
    model = value.get("model") if isinstance(value, dict) else None
    if not aliases or not isinstance(model, str) or model not in aliases:
        return None
    return json.dumps(dict(value, model=aliases[model])).encode()


def decode(raw: bytes) -> Any:
    """The body's value, or the ApiError a client gets for it: the same in a worker."""
    value = parse_json(raw)
    # Each value takes at least two bytes ("0,"), so a shorter body cannot hold too many.
    if len(raw) > 2 * MAX_VALUES and _more_values_than(value, MAX_VALUES):
        raise ApiError(413, "BODY_TOO_COMPLEX",
                       f"the body holds more than {MAX_VALUES} JSON values (objects, arrays, "
                       "strings, numbers); no request needs that many")
    return value


def _more_values_than(value: Any, limit: int) -> bool:
    count, stack = 0, [value]
    while stack:  # not recursive: a body may nest as deep as json.loads allows
        item = stack.pop()
        count += 1
        if count > limit:
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _answer(raw: bytes, aliases: dict[str, str] | None = None) -> bytes:
    """What a worker sends back for one body: a pickled ("ok", value, rewritten) or
    ("error", ...)."""
    try:
        value = decode(raw)
        result: tuple = ("ok", value, rewritten(value, aliases))
    except ApiError as e:
        result = ("error", e.status, e.code, e.message)
    return pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)


def _result(payload) -> tuple[Any, bytes | None]:
    """``payload`` is any buffer: the worker's answer is unpickled where it arrived."""
    kind, *rest = pickle.loads(payload)
    if kind == "ok":
        return rest[0], rest[1]
    raise ApiError(*rest)


def _inline(body: Body, aliases: dict[str, str] | None) -> Deferred:
    try:
        value = decode(body.read() if isinstance(body, FileBody) else body)
        return succeed((value, rewritten(value, aliases)))
    except ApiError as e:
        return fail(e)


class IBodyPool(Interface):
    """Parses bodies somewhere other than the reactor thread."""

    running = Attribute("whether it takes jobs now")

    def submit(body: Body, aliases: dict[str, str] | None = None) -> Deferred:
        """Fires with (value, the body rewritten for an alias or None), or fails with its
        ApiError."""
        raise NotImplementedError


@implementer(IBodyPool)
class InlinePool:
    """Parses on the caller's thread: for tests that need a pool's surface, and 0 workers."""

    running = True

    def submit(self, body: Body, aliases: dict[str, str] | None = None) -> Deferred:
        return _inline(body, aliases)


class Bodies:
    """The one way a route turns a body into its value."""

    def __init__(self, pool: Any = None, *, threshold: int = THRESHOLD) -> None:
        """``pool`` provides IBodyPool; without one, every body is parsed on the reactor."""
        self.pool = pool
        self.threshold = threshold

    def parse(self, body: Body) -> Deferred:
        return self.parse_for_bridge(body).addCallback(lambda parsed: parsed[0])

    def parse_for_bridge(self, body: Body, aliases: dict[str, str] | None = None) -> Deferred:
        """Fires with (value, what to forward): the body itself, or, when its model is one
        of ``aliases``, the body rewritten to the alias's target."""
        if len(body) > self.threshold and self.pool is not None and self.pool.running:
            parsed = self.pool.submit(body, aliases)
        else:
            parsed = _inline(body, aliases)
        return parsed.addCallback(lambda result: (result[0], result[1] or body))


@implementer(IPullProducer)
class _Feed:
    """Writes one body to a worker's stdin, a piece each time the pipe has drained."""

    def __init__(self, transport, source: FileBody) -> None:
        self.transport = transport
        self.source = source
        self.left = source.size

    def resumeProducing(self) -> None:
        try:
            chunk = self.source.file.read(min(CHUNK, self.left)) if self.left else b""
        except (ValueError, OSError):  # closed: the client left, its job is dropped
            chunk = b""
        self.left -= len(chunk)
        if len(chunk) == 0 and self.left:  # the file is shorter than it said: pad it so
            chunk, self.left = b" " * self.left, 0  # the frame still ends (a parse error)
        if chunk:
            self.transport.write(chunk)
        if not self.left:
            self.transport.unregisterProducer()

    def stopProducing(self) -> None:
        self.left = 0


class _Worker(ProcessProtocol):
    """One child process; one body at a time, as length-prefixed frames both ways."""

    transport: Any

    def __init__(self, pool: "BodyPool") -> None:
        self.pool = pool
        self.job: Deferred | None = None
        self._buffer = bytearray()
        self._deadline: Any = None
        self.hung = False
        self.ended: Deferred = Deferred()

    def send(self, body: Body, aliases: dict[str, str] | None, job: Deferred) -> None:
        self.job = job
        self._deadline = self.pool.clock.callLater(self.pool.timeout, self._too_slow)
        options = pickle.dumps(aliases or {}, protocol=pickle.HIGHEST_PROTOCOL)
        self.transport.write(_FRAME.pack(len(options)) + options + _FRAME.pack(len(body)))
        source = body if isinstance(body, FileBody) else FileBody(io.BytesIO(body), len(body))
        source.file.seek(0)
        # Written as the pipe drains, a piece at a time: the reactor never waits, and never
        # joins the whole body into its write buffer.
        self.transport.registerProducer(_Feed(self.transport, source), False)

    def _too_slow(self) -> None:
        """Stopped, swapping, stuck: a worker that is alive but does not answer is killed.

        Its body fails now, and the pool forgets it at once, so the next body gets a new
        worker without waiting for this one's end to be noticed.
        """
        self._deadline = None
        self.hung = True
        job, self.job = self.job, None
        log.warn("a body parser process took over {timeout:g} s over one body: killed",
                 timeout=self.pool.timeout)
        self.pool._forget_worker(self)
        try:
            self.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass
        if job is not None and not job.called:
            job.errback(ApiError(503, "BODY_PARSER_UNAVAILABLE",
                                 f"the gateway's body parser did not finish this body in "
                                 f"{self.pool.timeout:g} s (--body-parse-timeout); retry",
                                 "server_error"))

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) < _FRAME.size:
            return
        (size,) = _FRAME.unpack_from(self._buffer)
        if len(self._buffer) < _FRAME.size + size:
            return
        end = _FRAME.size + size
        self._cancel_deadline()
        job, self.job = self.job, None
        error: ApiError | None = None
        result = None
        if job is not None and not job.called:  # a cancelled job's answer is dropped
            with memoryview(self._buffer) as view, view[_FRAME.size:end] as payload:
                try:
                    result = _result(payload)
                except ApiError as e:
                    error = e
        if len(self._buffer) == end:
            self._buffer = bytearray()
        else:
            del self._buffer[:end]
        self.pool._idle(self)
        if job is None or job.called:
            return
        if error is not None:
            job.errback(error)
        else:
            job.callback(result)

    def errReceived(self, data: bytes) -> None:
        log.warn("body parser: {text}", text=data.decode("utf-8", "replace").rstrip()[-2000:])

    def processEnded(self, reason: Failure) -> None:
        self._cancel_deadline()
        job, self.job = self.job, None
        if job is not None and not job.called:
            job.errback(ApiError(503, "BODY_PARSER_UNAVAILABLE",
                                 "the gateway's body parser process ended while parsing this "
                                 "body; retry", "server_error"))
        self.pool._ended(self, reason)
        self.ended.callback(None)


@implementer(IBodyPool)
class BodyPool(Service):
    """Up to ``workers`` child processes that parse large bodies; more bodies wait their turn.

    A worker is started when a body needs one, and then stays: a gateway that never sees
    a large body runs none. One that ends (killed, out of memory), or that takes more
    than ``timeout`` seconds over one body (and is then killed), fails its body with 503
    ``BODY_PARSER_UNAVAILABLE``, and the next body starts another.
    """

    def __init__(self, reactor, workers: int, *, timeout: float = PARSE_TIMEOUT,
                 clock=None) -> None:
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.timeout = timeout
        self.workers = workers
        self._all: list[_Worker] = []
        self._idle_workers: deque[_Worker] = deque()
        self._queue: deque[tuple[Body, dict[str, str] | None, Deferred]] = deque()
        self._killed: list[_Worker] = []  # hung workers killed, until their end is seen

    def stopService(self):
        super().stopService()
        for _body, _aliases, job in list(self._queue):
            job.cancel()
        self._queue.clear()
        waits = [w.ended for w in self._all + self._killed]
        for worker in self._all:
            worker.transport.closeStdin()  # the worker exits at the end of its input
        return DeferredList(waits)

    def submit(self, body: Body, aliases: dict[str, str] | None = None) -> Deferred:
        job: Deferred = Deferred(self._forget)
        self._queue.append((body, aliases, job))
        self._next()
        return job

    def _forget(self, job: Deferred) -> None:
        self._queue = deque(entry for entry in self._queue if entry[2] is not job)

    def _start(self) -> _Worker:
        worker = _Worker(self)
        # env=None: the gateway's own environment, so the child imports this same package.
        self.reactor.spawnProcess(worker, sys.executable,
                                  [sys.executable, "-m", "lmarena_gateway.bodies"], env=None)
        self._all.append(worker)
        return worker

    def _next(self) -> None:
        while self._queue:
            if not self._idle_workers:
                if len(self._all) >= self.workers or not self.running:
                    return
                self._idle_workers.append(self._start())
            body, aliases, job = self._queue.popleft()
            if not job.called:
                self._idle_workers.popleft().send(body, aliases, job)

    def _idle(self, worker: _Worker) -> None:
        if worker in self._all:
            self._idle_workers.append(worker)
            self._next()

    def _forget_worker(self, worker: _Worker) -> None:
        self._all.remove(worker)
        if worker in self._idle_workers:
            self._idle_workers.remove(worker)
        self._killed.append(worker)
        self._next()

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        if worker in self._killed:
            self._killed.remove(worker)
            return  # already replaced when it was killed
        self._all.remove(worker)
        if worker in self._idle_workers:
            self._idle_workers.remove(worker)
        if self.running:
            log.warn("a body parser process ended: {why}", why=reason.getErrorMessage())
            self._next()

    @property
    def processes(self) -> int:
        return len(self._all)


def _read_frame(source) -> bytes | None:
    head = source.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None
    (size,) = _FRAME.unpack(head)
    data = source.read(size)
    return data if len(data) == size else None


def worker_main() -> None:
    """A worker: bodies in on stdin, answers out on stdout, until stdin ends."""
    try:
        os.nice(WORKER_NICENESS)
    except OSError:
        pass
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    while True:
        options = _read_frame(source)
        raw = _read_frame(source)
        if options is None or raw is None:
            return
        answer = _answer(raw, pickle.loads(options))
        sink.write(_FRAME.pack(len(answer)))
        sink.write(answer)
        sink.flush()
        del raw, answer


if __name__ == "__main__":
    worker_main()
