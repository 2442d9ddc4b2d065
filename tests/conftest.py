"""Shared test plumbing: real loopback servers, a daemon in a subprocess, binary checks.

Tests that drive real sockets use pytest-twisted's reactor (``@pytest_twisted.inlineCallbacks``
or ``ensureDeferred``); blocking clients (the openai SDK, urllib) run in a thread with
``deferToThread`` so the reactor keeps serving them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import pytest_twisted

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


@pytest.fixture
def daemon_factory(tmp_path):
    started: list[Daemon] = []

    def make(*args, env=None, port=None, start=True) -> Daemon:
        daemon = Daemon(tmp_path, args, env, port)
        started.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in started:
        daemon.stop(signal.SIGKILL)


@pytest.fixture
def fake_bridge_process(tmp_path):
    """``lmgateway fake-bridge`` in a subprocess; yields its base URL."""
    port = free_port()
    log_path = tmp_path / "fake-bridge.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([bin_path("lmgateway"), "fake-bridge", "--listen",
                                    f"tcp:{port}:interface=127.0.0.1", "--delay-ms", "5"],
                                   stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return http("GET", url + "/v1/models", timeout=1)[0] == 200
        except OSError:
            return False

    wait_for(up, 15, what="the fake bridge")
    yield url
    process.kill()
    process.wait()


# --- in-process servers on the real reactor ---


@pytest.fixture
def reactor():
    from twisted.internet import reactor as _reactor

    return _reactor


@pytest_twisted.async_yield_fixture
async def listen(reactor):
    """``await listen(resource)`` serves a twisted.web resource on a loopback port; returns its URL."""
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.web.server import Site

    ports = []

    async def serve(resource_or_site) -> str:
        site = resource_or_site if isinstance(resource_or_site, Site) else Site(resource_or_site)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        ports.append(port)
        return f"http://127.0.0.1:{port.getHost().port}"

    yield serve
    for port in ports:
        await port.stopListening()


@pytest_twisted.async_yield_fixture
async def gateway_factory(reactor, tmp_path, listen):
    """``await gateway_factory(**config)``: a whole gateway service on the real reactor.

    Listens on a free loopback port, stores sessions under tmp_path, and by default sends
    bridge traffic to an in-process FakeBridge (``gw.bridge``) on its own loopback port.
    """
    from attrs import evolve

    from lmarena_gateway.config import GatewayConfig
    from lmarena_gateway.fakebridge import FakeBridge
    from lmarena_gateway.service import make_service

    services = []

    class Running:
        pass

    async def make(bridge=None, **overrides):
        running = Running()
        if bridge is None:
            bridge = FakeBridge(reactor, chunks=4, delay=0.001)
        running.bridge = bridge
        if "bridge_url" not in overrides:
            overrides["bridge_url"] = await listen(bridge.app.resource())
        overrides.setdefault("storage", str(tmp_path / f"sessions-{len(services)}.sqlite3"))
        config = evolve(GatewayConfig(), listen=("tcp:0:interface=127.0.0.1",), **overrides)
        service = make_service(config, reactor)
        service.startService()
        services.append(service)
        running.config = config
        running.service = service
        running.store = service.getServiceNamed("store")
        port = service.getServiceNamed("listen-0").port.getHost().port  # bound at start
        running.url = f"http://127.0.0.1:{port}"
        return running

    yield make
    for service in services:
        await service.stopService()


SESSION = {
    "domain": "lmarena.ai",
    "session_name": "team-alpha",
    "session_id": "12345678-1234-1234-1234-123456789abc",
    "message_id": "87654321-4321-4321-4321-cba987654321",
}


async def call(method: str, url: str, body=None, headers=None):
    """treq on the reactor: (status, headers, parsed JSON or bytes)."""
    import treq

    kwargs = {"headers": headers or {}}
    if body is not None:
        kwargs["data"] = body if isinstance(body, bytes) else json.dumps(body).encode()
        kwargs["headers"] = {"Content-Type": "application/json", **kwargs["headers"]}
    response = await treq.request(method, url, **kwargs)
    raw = await treq.content(response)
    try:
        return response.code, response.headers, json.loads(raw)
    except ValueError:
        return response.code, response.headers, raw


# --- tiers: markers from what a test uses, so -m selects the in-memory unit tier ---

TIERS = {
    "process": {"daemon_factory", "fake_bridge_process", "target", "wheelhouse", "fresh_venv"},
    "redis": {"redis_server"},
    "browser": {"browser", "browsing"},
    "wheel": {"wheelhouse", "fresh_venv"},
}


def pytest_collection_modifyitems(items):
    for item in items:
        used = set(item.fixturenames)  # the whole fixture closure
        for marker, fixtures in TIERS.items():
            if used & fixtures:
                item.add_marker(marker)
        module = item.module.__name__ if item.module else ""
        for marker in ("redis", "browser"):
            if marker in module:
                item.add_marker(marker)
        if module.endswith("test_daemon"):  # every test there runs twistd or systemd-analyze
            item.add_marker("process")


@pytest.fixture(autouse=True)
def _processes_are_marked(request, monkeypatch):
    """A test outside the process tier that starts a process fails and says how to fix it,
    so ``-m "not process and not redis and not browser"`` stays in memory."""
    if any(request.node.get_closest_marker(m) for m in ("process", "redis", "browser")):
        return

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} starts a process: mark it "
                             "@pytest.mark.process (see TIERS in tests/conftest.py)")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
