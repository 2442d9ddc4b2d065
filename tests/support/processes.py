"""Real processes for the tests: binaries CI must install, ports, polling, a twistd daemon."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
