"""Real processes for the tests: binaries CI must install, ports, polling, a twistd daemon."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REQUIRE_ALL = os.environ.get("LMGW_REQUIRE_ALL") == "1"
SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


def require_binary(name: str, *candidates: str) -> str:
    """The binary's path; skips on a laptop without it, fails in CI (LMGW_REQUIRE_ALL=1)."""
    for candidate in (name, *candidates):
        found = shutil.which(candidate)
        if found:
            return found
    message = f"{name} is not installed"
    if REQUIRE_ALL:
        pytest.fail(message + " (CI must install it: see .ci/run)")
    pytest.skip(message)


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
IANA_EPHEMERAL = (49152, 65535)  # where the kernel has no such file (BSDs, macOS mostly)
PORT_SPAN = 16384


def listening_range(ephemeral: Path = EPHEMERAL_RANGE) -> range:
    """Ports the kernel never picks as the source of an outgoing connection: up to
    ``PORT_SPAN`` of them just below its ephemeral range, else above it."""
    try:
        first, last = (int(word) for word in ephemeral.read_text().split())
    except (OSError, ValueError):
        first, last = IANA_EPHEMERAL
    below = range(max(1024, first - PORT_SPAN), first)
    above = range(last + 1, min(65536, last + 1 + PORT_SPAN))
    for ports in (below, above):
        if len(ports) >= 1024:
            return ports
    return range(1024, 65536)  # next to no port is outside it: only the bind check is left


def bindable(port: int) -> bool:
    """Whether nothing holds the loopback port (a listener, a connection, TIME_WAIT): a bind
    without SO_REUSEADDR says so."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pid_offset(pid: int, span: int) -> int:
    """Where a process starts in a span of ``span`` ports: the pid's Fibonacci hash, so that
    pytest runs with near pids start far apart."""
    return ((pid * 2654435769) % 2**32) * span >> 32


class PortAllocator:
    """Hands out each port of ``ports`` at most once, in turn from ``start``, skipping any
    port that is held when its turn comes."""

    def __init__(self, ports: range, start: int | None = None) -> None:
        start = ports.start if start is None else start
        if start not in ports:
            raise ValueError(f"{start} is not one of the ports to hand out")
        self.ports = ports
        self._next = start
        self._turns = len(ports)
        self._lock = threading.Lock()  # free_port is also called from worker threads

    def take(self) -> int:
        with self._lock:
            while self._turns:
                port = self._next
                self._turns -= 1
                self._next = port + 1 if port + 1 < self.ports.stop else self.ports.start
                if bindable(port):
                    return port
        raise RuntimeError(f"every port from {self.ports.start} to {self.ports.stop - 1} was "
                           "handed out or held")


_PORTS = listening_range()
_allocator = PortAllocator(_PORTS, _PORTS.start + pid_offset(os.getpid(), len(_PORTS)))


def free_port() -> int:
    """A loopback port for a server a test starts later (often in another process).

    A port the kernel gave to a bind on port 0 is from its ephemeral range, where any
    process's outgoing connection may take it before the server binds it; these come from
    below that range instead, once each, from a place set by this process's pid.
    """
    return _allocator.take()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll until ``predicate()`` is truthy, with a deadline; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def http(method: str, url: str, body=None, headers=None, timeout: float = 10.0):
    """A blocking HTTP call: (status, headers, parsed JSON or raw bytes). For threads and subprocess tests."""
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and "Content-Type" not in (headers or {}):
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, head, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        status, head, raw = e.code, e.headers, e.read()
    try:
        return status, head, json.loads(raw)
    except ValueError:
        return status, head, raw


def python_bin() -> str:
    """The interpreter whose environment has the gateway installed."""
    return sys.executable


def bin_path(name: str) -> str:
    return str(Path(sys.executable).parent / name)


class Daemon:
    """``twistd -n lmgateway`` in a subprocess on a free loopback port."""

    def __init__(self, tmp_path: Path, args=(), env=None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"daemon-{self.port}.log"
        self.storage = str(tmp_path / "sessions.sqlite3")
        self.args = list(args)
        self.env = dict(os.environ, **(env or {}))
        self.env.setdefault("STORAGE_PATH", self.storage)
        self.cwd = tmp_path
        self.process: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "Daemon":
        command = [bin_path("twistd"), "-n", "--pidfile=", "lmgateway",
                   "--listen", f"tcp:{self.port}:interface=127.0.0.1", *self.args]
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=self.env, cwd=self.cwd)
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 15.0) -> None:
        def healthy():
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited with {self.process.returncode}:\n{self.log()}")
            try:
                return http("GET", self.url + "/health", timeout=1)[0] == 200
            except OSError:
                return False

        wait_for(healthy, timeout, what="the daemon's /health")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self._log.close()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)
