"""Shared test plumbing: real loopback servers, a daemon in a subprocess, binary checks.

Tests that drive real sockets use pytest-twisted's reactor (``@pytest_twisted.inlineCallbacks``
or ``ensureDeferred``); blocking clients (the openai SDK, urllib) run in a thread with
``deferToThread`` so the reactor keeps serving them.
"""

from __future__ import annotations

import signal
import subprocess

import pytest
import pytest_twisted

from support.processes import (
    Daemon,
    bin_path,
    free_port,
    http,
    wait_for,
)


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
        # The status page's probes would be bridge traffic the tests do not expect.
        overrides.setdefault("probe_interval", 0.0)
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


@pytest.fixture
def redis_server(tmp_path):
    """A redis-server of the test's own, durable (AOF, fsync always), killed at the end."""
    from support.redis import RedisServer

    server = RedisServer(tmp_path).start()
    yield server
    if server.process.poll() is None:
        server.kill()


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
