"""A reactor's spawnProcess in memory: the child's stdin is recorded, its output and end are
delivered by the test, so a process pool runs on a Clock without a process."""

from __future__ import annotations

from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.python.failure import Failure


class FakeProcess:
    """The transport a ProcessProtocol gets: what was written, which signals were sent."""

    def __init__(self, protocol, pid: int) -> None:
        self.protocol = protocol
        self.pid = pid
        self.written: list[bytes] = []
        self.signals: list[str] = []
        self.stdin_closed = False
        self.ended = False
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writeSequence(self, data) -> None:
        self.written.extend(data)

    def registerProducer(self, producer, streaming: bool) -> None:
        """A pull producer is drained at once: this pipe never fills."""
        self.producer = producer
        while self.producer is not None:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self.producer = None

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, signal: str) -> None:
        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(signal)

    def end(self, signal: int | None = None) -> None:
        """The child has exited (by ``signal``, or cleanly)."""
        self.ended = True
        reason = ProcessDone(0) if signal is None else ProcessTerminated(signal=signal)
        self.protocol.processEnded(Failure(reason))


class ProcessReactor:
    """Only spawnProcess: the children it started, newest last."""

    def __init__(self) -> None:
        self.children: list[FakeProcess] = []

    def spawnProcess(self, protocol, executable, args=(), env=None, **kwargs):
        child = FakeProcess(protocol, 1000 + len(self.children))
        self.children.append(child)
        protocol.makeConnection(child)
        return child
