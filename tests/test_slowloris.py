"""Slow clients do not starve the rest: a real daemon held to 1024 descriptors.

1020 connections each send a byte a second, as slowloris does, and are reopened when the
gateway closes them; meanwhile chats through a real fake bridge must all succeed. Before
the header deadline and the connection cap, the slow connections took every descriptor
and no chat got through. Every loop is bounded in count and time; loopback only.
"""

from __future__ import annotations

import resource
import socket
import subprocess
import threading
import time

from support.processes import Daemon, bin_path, http

SLOW = 1020
CHATS = 20
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
SESSION = {"domain": "lmarena.ai", "session_name": "default",
           "session_id": "12345678-1234-1234-1234-123456789abc",
           "message_id": "87654321-4321-4321-4321-cba987654321"}


class LimitedDaemon(Daemon):
    """The daemon with soft and hard RLIMIT_NOFILE at 1024: it cannot raise its own."""

    def start(self, wait: bool = True) -> "LimitedDaemon":
        command = [bin_path("twistd"), "-n", "--pidfile=", "lmgateway",
                   "--listen", f"tcp:{self.port}:interface=127.0.0.1:backlog=1024", *self.args]
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)))
        if wait:
            self.wait_healthy()
        return self


class Slowloris:
    """Keeps ``count`` connections open, each sending one header byte a second."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.count = count
        self.sockets: list[socket.socket] = []
        self.reopened = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self) -> socket.socket | None:
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", self.port))
            s.sendall(b"GET /health HTTP/1.1\r\n")
            s.setblocking(False)
            return s
        except OSError:
            s.close()
            return None

    def start(self, deadline: float) -> None:
        while len(self.sockets) < self.count and time.monotonic() < deadline:
            s = self._open()
            if s is not None:
                self.sockets.append(s)
        self.thread.start()

    def _run(self) -> None:
        end = time.monotonic() + 120  # bounded, whatever the test does
        while not self.stop.is_set() and time.monotonic() < end:
            for index, s in enumerate(self.sockets):
                try:
                    s.send(b"X")
                    try:
                        if s.recv(4096) == b"":
                            raise OSError("closed")
                    except BlockingIOError:
                        pass
                except OSError:
                    s.close()
                    again = self._open()
                    if again is not None:
                        self.sockets[index] = again
                        self.reopened += 1
            self.stop.wait(1.0)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        for s in self.sockets:
            s.close()


def test_chats_keep_working_under_slow_connections_at_1024_descriptors(tmp_path, fake_bridge_process):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < SLOW + 200:  # this process holds the slow ends itself
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    daemon = LimitedDaemon(tmp_path, ["--bridge-url", fake_bridge_process],
                           {"GATEWAY_HEADER_TIMEOUT": "3"})
    daemon.start()
    slow = Slowloris(daemon.port, SLOW)
    try:
        assert http("POST", daemon.url + "/session/register", SESSION)[0] == 200
        slow.start(time.monotonic() + 60)
        assert len(slow.sockets) >= 1000
        statuses = []
        for _ in range(CHATS):
            try:
                statuses.append(http("POST", daemon.url + "/v1/chat/completions", CHAT,
                                     timeout=10)[0])
            except OSError as e:
                statuses.append(repr(e))
        assert statuses == [200] * CHATS, (statuses, daemon.log()[-3000:])
        assert daemon.process.poll() is None
    finally:
        slow.close()
        daemon.stop()
