"""What the gateway is doing right now: requests in flight per session, recent counts.

The front door reports every request's start and end here; the status page reads it.
Prometheus has the long history; this holds only what an operator looks at during an
incident: the last few minutes, open streams, and each session's last error.
"""

from __future__ import annotations

from collections import deque

from attrs import define

# Monitoring itself is not traffic: a status page polling every few seconds would
# otherwise be most of what it counts.
UNCOUNTED = (b"/status", b"/health", b"/metrics")
# The routes whose requests hold a bridge (or tab) answer open while they run.
STREAMING = (b"/v1/chat/completions", b"/v1/images/generations")


@define
class Counts:
    requests: int = 0
    errors: int = 0  # the gateway or its upstream failed: 5xx, or a stream ended in error
    client_errors: int = 0  # refused as the client's mistake: 4xx


class RollingWindow:
    """Counts over the last ``span`` seconds, in ``step``-second buckets, on an injected clock."""

    def __init__(self, clock, span: float = 300.0, step: float = 10.0) -> None:
        self.clock = clock
        self.span = span
        self.step = step
        self._buckets: deque[tuple[int, Counts]] = deque()

    def _expire(self, now: float) -> None:
        oldest = int((now - self.span) // self.step)
        while self._buckets and self._buckets[0][0] <= oldest:
            self._buckets.popleft()

    def add(self, *, error: bool = False, client_error: bool = False) -> None:
        now = self.clock.seconds()
        self._expire(now)
        index = int(now // self.step)
        if not self._buckets or self._buckets[-1][0] != index:
            self._buckets.append((index, Counts()))
        counts = self._buckets[-1][1]
        counts.requests += 1
        counts.errors += error
        counts.client_errors += client_error

    def totals(self) -> Counts:
        self._expire(self.clock.seconds())
        total = Counts()
        for _, counts in self._buckets:
            total.requests += counts.requests
            total.errors += counts.errors
            total.client_errors += counts.client_errors
        return total


@define
class LastError:
    code: str
    at: float


def session_of(request) -> tuple[str, str]:
    """The (domain, name) a /v1 request names, with the defaults the proxy applies."""
    name = request.getHeader(b"x-session-name") or b"default"
    domain = request.getHeader(b"x-target-domain") or b"lmarena.ai"
    return domain.decode("latin-1").lower(), name.decode("latin-1")


class Activity:
    """Requests in flight and last errors, per session; the 5-minute window for all.

    Only sessions the store knows are tracked, so clients naming random sessions
    cannot grow this without bound.
    """

    def __init__(self, clock, known=lambda domain, name: True, *, span: float = 300.0) -> None:
        self.clock = clock
        self.known = known
        self.window = RollingWindow(clock, span)
        self.open: dict[tuple[str, str], int] = {}
        self.last_errors: dict[tuple[str, str], LastError] = {}

    @property
    def open_streams(self) -> int:
        return sum(self.open.values())

    def started(self, request) -> None:
        if request.method == b"POST" and request.path in STREAMING:
            key = session_of(request)
            if self.known(*key):
                request.activity_key = key
                self.open[key] = self.open.get(key, 0) + 1

    def finished(self, request, disconnected: bool) -> None:
        key = getattr(request, "activity_key", None)
        if key is not None:
            left = self.open.get(key, 1) - 1
            if left > 0:
                self.open[key] = left
            else:
                self.open.pop(key, None)
        if request.path.startswith(UNCOUNTED):
            return
        code = getattr(request, "error_code", None)
        status = request.code
        if disconnected and code is None:
            self.window.add()  # the client left: neither side failed
            return
        failed = status >= 500 or (code is not None and status < 400)
        self.window.add(error=failed, client_error=400 <= status < 500)
        if code is not None and request.path.startswith(b"/v1/"):
            key = key or session_of(request)
            if self.known(*key):
                self.last_errors[key] = LastError(code, self.clock.seconds())

    def forget(self, domain: str, name: str) -> None:
        """A deleted session's history goes with it."""
        self.last_errors.pop((domain, name), None)
