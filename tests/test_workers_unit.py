"""``--workers``: the pool's restarts and stops on a Clock, the worker's side of the pipe,
the setting and what it refuses, and tab mode answering 503 with several workers."""

from __future__ import annotations

import os
import signal
import socket

import pytest
import pytest_twisted
import twisted
from attrs import evolve
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from lmarena_gateway import workers
from lmarena_gateway.config import ConfigError, GatewayConfig, build_config
from lmarena_gateway.workers import (
    CONFIG_FD,
    MAX_RESTART_DELAY,
    RESTART_DELAY,
    STOP_TIMEOUT,
    WORKER_ENV,
    WorkerPool,
    WorkerRole,
    encode_config,
    read_config,
    role_from_environment,
    unshareable,
)

from support.stub import StubGateway

PEM = os.path.join(os.path.dirname(twisted.__file__), "test", "server.pem")


class FakeProcess:
    """What spawnProcess returns, as far as the pool uses it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.written: dict[int, bytes] = {}
        self.signals: list[str] = []
        self.exited = False

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.written[fd] = self.written.get(fd, b"") + data

    def signalProcess(self, name: str) -> None:
        if self.exited:
            raise ProcessExitedAlready()
        self.signals.append(name)


class FakePort:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


class FakeListener:
    def __init__(self, fd: int) -> None:
        self.port = FakePort(fd)


class Spawner:
    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.next_pid = 1000

    def __call__(self, protocol, executable, args, env, childFDs):
        self.next_pid += 1
        process = FakeProcess(self.next_pid)
        self.calls.append({"protocol": protocol, "process": process, "executable": executable,
                           "args": args, "env": env, "fds": childFDs})
        protocol.makeConnection(process)
        return process

    def end(self, call: dict, reason=None) -> None:
        call["process"].exited = True
        call["protocol"].processEnded(Failure(reason or ProcessTerminated(signal=9)))


@pytest.fixture
def pool():
    clock = Clock()
    spawner = Spawner()
    config = evolve(GatewayConfig(), workers=3, listen=("tcp:1", "tcp:2"))
    environ = {"PATH": "/bin", "LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "x"}
    made = WorkerPool(clock, config, [FakeListener(7), FakeListener(9)], spawn=spawner,
                      environ=environ)
    made.startService()
    yield made, clock, spawner
    if made.running:
        made.stopService()


def test_the_pool_starts_n_minus_one_workers_with_the_sockets_and_the_config(pool):
    made, _, spawner = pool
    assert [c["env"][WORKER_ENV] for c in spawner.calls] == ["3/1:4,5", "3/2:4,5"]
    first = spawner.calls[0]
    assert first["fds"] == {0: "w", 1: "r", 2: "r", CONFIG_FD: "w", 4: 7, 5: 9}
    # systemd's variables describe the parent's descriptors, not the worker's
    assert not any(k.startswith("LISTEN_") for k in first["env"]) and first["env"]["PATH"] == "/bin"
    assert first["args"][0] == first["executable"] and "lmgateway" in first["args"]
    read, write = os.pipe()
    os.write(write, first["process"].written[CONFIG_FD])
    os.close(write)
    assert read_config(read) == (made.config, ())
    os.close(read)
    assert sorted(made.pids()) == [1001, 1002]


def test_a_dead_worker_is_started_again_after_a_pause_that_grows_while_it_dies_young(pool):
    made, clock, spawner = pool
    delays = []
    for _ in range(7):
        spawner.end(spawner.calls[-1] if len(spawner.calls) > 2 else spawner.calls[0])
        before = len(spawner.calls)
        delay = made.pending[1].getTime() - clock.seconds()
        clock.advance(delay - 0.01)
        assert len(spawner.calls) == before  # not yet
        clock.advance(0.02)
        assert len(spawner.calls) == before + 1
        assert spawner.calls[-1]["env"][WORKER_ENV] == "3/1:4,5"  # the same slot
        delays.append(delay)
    assert delays == pytest.approx([RESTART_DELAY, 2, 4, 8, 16, MAX_RESTART_DELAY,
                                    MAX_RESTART_DELAY])
    clock.advance(60)  # this one lived long enough: the next restart is quick again
    spawner.end(spawner.calls[-1])
    assert made.pending[1].getTime() - clock.seconds() == pytest.approx(RESTART_DELAY)
    assert made.restarts == 8


def test_stopping_sends_sigterm_waits_for_every_worker_then_kills_stragglers(pool):
    made, clock, spawner = pool
    stopped = made.stopService()
    assert [c["process"].signals for c in spawner.calls] == [["TERM"], ["TERM"]]
    fired: list = []
    stopped.addBoth(fired.append)
    spawner.end(spawner.calls[0], ProcessDone(0))
    assert fired == [] and spawner.calls[0]["protocol"].alive is False
    clock.advance(STOP_TIMEOUT)
    assert spawner.calls[1]["process"].signals == ["TERM", "KILL"]
    spawner.end(spawner.calls[1])
    assert fired == [None]
    assert len(spawner.calls) == 2 and not made.pending  # nothing restarted while stopping


def test_stopping_cancels_a_pending_restart(pool):
    made, clock, spawner = pool
    spawner.end(spawner.calls[0])
    call = made.pending[1]
    made.stopService()
    assert not call.active()
    clock.advance(MAX_RESTART_DELAY)
    assert len(spawner.calls) == 2


def test_the_pool_forwards_sighup_and_gives_the_handler_back(pool):
    made, _, spawner = pool
    made.signal_all("HUP")
    assert [c["process"].signals for c in spawner.calls] == [["HUP"], ["HUP"]]
    spawner.calls[0]["process"].exited = True
    made.signal_all("HUP")  # one that already ended is skipped, not an error
    assert spawner.calls[1]["process"].signals == ["HUP", "HUP"]
    assert signal.getsignal(signal.SIGHUP) is not made._previous_hup
    made.stopService()
    assert signal.getsignal(signal.SIGHUP) == (made._previous_hup or signal.SIG_DFL)


def test_worker_output_goes_into_the_parent_log_line_by_line_without_its_stamp(pool, monkeypatch):
    _, _, spawner = pool
    seen = []
    monkeypatch.setattr(workers.log, "info", lambda fmt, **kw: seen.append(kw))
    protocol = spawner.calls[0]["protocol"]
    protocol.childDataReceived(1, b"2026-12-02T01:51:38+0000 [ns#info] one\n2026-12-02T01:5")
    protocol.childDataReceived(1, b"1:39+0000 [ns#info] two\n")
    assert [kw["line"] for kw in seen] == ["[ns#info] one", "[ns#info] two"]
    assert {kw["index"] for kw in seen} == {1}


def test_a_worker_reads_its_role_and_its_config():
    assert role_from_environment({}) is None
    role = role_from_environment({WORKER_ENV: "4/2:4,5"})
    assert role == WorkerRole(2, 4, (4, 5)) and not role.parent
    assert WorkerRole(0, 2).parent
    assert WorkerRole(1, 2).health() == {"index": 1, "pid": os.getpid(), "workers": 2}
    config = evolve(GatewayConfig(), workers=2, admin_token="a-secret-admin-token")
    read, write = os.pipe()
    os.write(write, encode_config(config)[:5])
    os.close(write)
    with pytest.raises(SystemExit, match="parent went away"):
        read_config(read)  # a parent that died mid-way: one line, not a pickle error
    os.close(read)


@pytest_twisted.inlineCallbacks
def test_a_worker_stops_its_reactor_when_the_parent_pipe_closes(reactor):
    read, write = os.pipe()
    stopped = Deferred()

    class Reactor:
        """The real reactor for reading, a stand-in for stopping."""

        def __getattr__(self, name):
            return getattr(reactor, name)

        def stop(self):
            stopped.callback(None)

    lifeline = workers.Lifeline(Reactor(), read)
    lifeline.startService()
    os.write(write, b"ignored")
    os.close(write)  # the parent is gone
    yield stopped
    lifeline.stopService()
    with pytest.raises(OSError):
        os.fstat(read)  # closed


def test_plain_tcp_endpoints_get_an_address_of_their_own_in_each_worker():
    """Twisted's private endpoint attributes: this fails loudly if an upgrade renames them."""
    assert workers.reuse_port_for("tcp:8080:interface=127.0.0.1:backlog=77") == \
        workers.ReusePort(socket.AF_INET, "127.0.0.1", 8080, 77)
    assert workers.reuse_port_for("tcp6:0:interface=\\:\\:1") == \
        workers.ReusePort(socket.AF_INET6, "::1", 0, 50)
    assert workers.reuse_port_for("unix:/run/lmgw.sock") is None  # handed on as it is


@pytest_twisted.inlineCallbacks
def test_reuse_port_listeners_share_one_port_and_tell_the_workers_which(reactor):
    from twisted.internet.protocol import Factory, Protocol

    factory = Factory.forProtocol(Protocol)
    first = workers.ReusePortListener(reactor, workers.ReusePort(socket.AF_INET, "127.0.0.1",
                                                                 0, 5), factory)
    first.privilegedStartService()
    chosen = first.spec.port
    assert chosen != 0  # tcp:0: the port the parent got, for the workers to join
    second = workers.ReusePortListener(reactor, first.spec, factory)
    second.privilegedStartService()
    assert second.port.getHost().port == chosen
    with socket.socket() as probe:  # anyone not in the group is refused
        with pytest.raises(OSError):
            probe.bind(("127.0.0.1", chosen))
    yield first.stopService()
    yield second.stopService()


def test_the_pool_hands_reuse_port_addresses_in_the_config_not_as_sockets():
    spec = workers.ReusePort(socket.AF_INET, "127.0.0.1", 8080, 50)
    listener = workers.ReusePortListener(Clock(), spec, None)
    spawner = Spawner()
    made = WorkerPool(Clock(), evolve(GatewayConfig(), workers=2), [listener, FakeListener(7)],
                      spawn=spawner, environ={})
    made.startService()
    (call,) = spawner.calls
    assert call["fds"] == {0: "w", 1: "r", 2: "r", CONFIG_FD: "w", 4: 7}
    read, write = os.pipe()
    os.write(write, call["process"].written[CONFIG_FD])
    os.close(write)
    assert read_config(read)[1] == (spec,)
    os.close(read)
    made.stopService()


@pytest.mark.parametrize("description, refused", [
    ("tcp:8080:interface=127.0.0.1", False), ("tcp6:8080", False), ("8080", False),
    ("unix:/run/lmgw.sock", False), ("systemd:domain=INET:name=lmgateway", False),
    ("ssl:8443:privateKey=k.pem", True), ("TLS:8443", True), ("le:/x:tcp:80", True),
])
def test_which_endpoints_workers_can_share(description, refused):
    assert unshareable(description) is refused


def test_the_workers_setting_and_the_endpoints_it_refuses():
    assert build_config({}, {}).workers == 1
    assert build_config({"workers": "4"}, {}).workers == 4
    assert build_config({}, {"GATEWAY_WORKERS": "2"}).workers == 2
    for bad in ("0", "65", "two", "-1"):
        with pytest.raises(ConfigError, match="^--workers: .* is not a whole number from 1 to 64"):
            build_config({"workers": bad}, {})
    tls = f"ssl:8443:privateKey={PEM}"  # a real key: the endpoint must parse
    with pytest.raises(ConfigError) as refused:
        build_config({"workers": "2", "listen": (tls,)}, {})
    assert str(refused.value).startswith(f"--workers 2: {tls!r} cannot be shared by worker "
                                         "processes")
    # one process may listen on anything
    assert build_config({"listen": (tls,)}, {}).workers == 1


def test_with_several_workers_tab_routes_and_tab_only_sessions_answer_503():
    gw = StubGateway(workers=2)
    answer = gw.call("POST", "/tab/poll", {"session_name": "team-alpha"})
    assert (answer.status, answer.code) == (503, "TAB_MODE_OFF")
    assert "--workers 1" in answer.json()["error"]["message"]
    gw.register(upstream="tab")
    answer = gw.call("POST", "/v1/chat/completions",
                     {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                     {"X-Session-Name": "team-alpha", "Content-Type": "application/json"})
    assert (answer.status, answer.code) == (503, "TAB_MODE_OFF")
    # one process without a tab registry keeps its plain 404
    assert StubGateway().call("POST", "/tab/poll", {}).status == 404


class _Counting:
    """A factory that counts the connections its port accepted."""

    def __init__(self) -> None:
        self.built = 0

    def doStart(self) -> None:  # noqa: N802 (Twisted's names)
        pass

    def doStop(self) -> None:  # noqa: N802
        pass

    def buildProtocol(self, addr):  # noqa: N802
        from twisted.internet.protocol import Protocol

        self.built += 1
        return Protocol()


@pytest_twisted.inlineCallbacks
def test_a_shared_port_accepts_one_connection_per_wake_up(reactor):
    """Pins Twisted's accept loop: ``doRead`` takes up to ``numberAccepts`` connections.

    If an upgrade renames or ignores it, the bounded port takes all three at once here.
    """
    bounded, unbounded = _Counting(), _Counting()
    ports = {"bounded": reactor.listenTCP(0, bounded, interface="127.0.0.1"),
             "unbounded": reactor.listenTCP(0, unbounded, interface="127.0.0.1")}
    workers.accept_in_turn(ports["bounded"])
    clients = []
    try:
        for port in ports.values():
            port.stopReading()  # the test, not the reactor, calls doRead
            for _ in range(3):
                client = socket.create_connection(("127.0.0.1", port.getHost().port))
                clients.append(client)
        ports["unbounded"].doRead()
        assert unbounded.built == 3  # Twisted's own loop: the whole queue at once
        ports["bounded"].doRead()
        assert bounded.built == 1
        ports["bounded"].doRead()
        ports["bounded"].doRead()
        assert bounded.built == 3
    finally:
        for client in clients:
            client.close()
        for port in ports.values():
            yield port.stopListening()


def test_accept_in_turn_refuses_a_port_without_an_accept_loop():
    with pytest.raises(TypeError):
        workers.accept_in_turn(object())


def _listening_unix_socket(path: str, mode: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, mode)
    sock.listen(8)
    sock.setblocking(False)
    return sock


def _queued_connections(path: str, count: int) -> int:
    """How many of ``count`` connections the listening socket queues (none accepted)."""
    queued = []
    try:
        for _ in range(count):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            try:
                client.connect(path)
            except BlockingIOError:  # the backlog is full
                client.close()
                break
            queued.append(client)
        return len(queued)
    finally:
        for client in queued:
            client.close()


@pytest_twisted.inlineCallbacks
def test_an_adopted_unix_socket_keeps_its_mode_and_gets_the_largest_backlog(reactor, tmp_path):
    """Twisted's own adoption chmods the socket to 0o666 and re-listens with a backlog of
    50; ours keeps the mode systemd (or the parent) gave it. Pins the private constructor."""
    ours, theirs = str(tmp_path / "ours.sock"), str(tmp_path / "theirs.sock")
    sockets = [_listening_unix_socket(ours, 0o600), _listening_unix_socket(theirs, 0o600)]
    factory = _Counting()
    kept = workers.adopt_stream_port(reactor, sockets[0].fileno(), socket.AF_UNIX, factory)
    stock = reactor.adoptStreamPort(sockets[1].fileno(), socket.AF_UNIX, factory)
    for sock in sockets:
        sock.close()
    try:
        assert os.stat(ours).st_mode & 0o777 == 0o600
        assert os.stat(theirs).st_mode & 0o777 == 0o666  # why we do not use it
        kept.stopReading()
        stock.stopReading()
        assert _queued_connections(ours, 200) == 200
        assert _queued_connections(theirs, 200) < 200
    finally:
        yield kept.stopListening()
        yield stock.stopListening()


@pytest_twisted.inlineCallbacks
def test_endpoints_adopt_through_the_socket_keeping_reactor(reactor, tmp_path):
    """systemd's endpoint adopts with the reactor it was given: ours keeps the mode."""
    from twisted.internet.endpoints import AdoptedStreamServerEndpoint

    path = str(tmp_path / "systemd.sock")
    fd = _listening_unix_socket(path, 0o660).detach()  # the endpoint closes it
    endpoint = AdoptedStreamServerEndpoint(workers.KeepSocketsReactor(reactor), fd,
                                           socket.AF_UNIX)
    port = yield endpoint.listen(_Counting())
    try:
        assert os.stat(path).st_mode & 0o777 == 0o660
        assert workers.KeepSocketsReactor(reactor).seconds() > 0  # everything else is the reactor's
    finally:
        yield port.stopListening()
