"""``--workers N``: one gateway process is one core; N processes share its listening sockets.

The parent (worker 0) binds every ``--listen`` endpoint as before (systemd sockets
included), then starts N-1 copies of the daemon with ``reactor.spawnProcess``. A plain
TCP endpoint gets one ``SO_REUSEPORT`` socket per process, which the kernel balances.
The others (systemd's sockets, Unix sockets) are handed to the workers as inherited
descriptors (adopted with ``reactor.adoptStreamPort``), and every process accepts one
connection per wake-up on them (:func:`accept_in_turn`), so a busy process leaves the
next connection to an idle one. The parent serves too.

A worker gets its configuration from the parent, pickled over a pipe (its fd 3), so
nothing is parsed or read twice and secrets never go through argv or the environment.
The same pipe is its lifeline: when the parent goes away, however it dies, the worker
reads end-of-file and stops. The parent stops its workers with SIGTERM when it stops,
forwards SIGHUP to them, and starts a worker again when one dies (after a pause that
grows while it keeps dying young).

Shared state needs no new machinery: every process opens the same store and the same
registration secret, which each process re-reads when it changes. A session missing
from a process's memory is read from the store before any 404, so a registration
through one worker is served by the next request to any other; updates and deletes
reach memory within half a second (the SQLite store's ``PRAGMA data_version`` poll) or
with Redis's pub/sub.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import socket
import stat
import struct
import sys
from typing import Any, Callable

from attrs import frozen
from twisted.application.service import Service
from twisted.internet import abstract, fdesc
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

log = Logger()
# Set in a worker's environment by its parent: "INDEX:FD,FD,...", the listening sockets.
WORKER_ENV = "LMGATEWAY_WORKER"
CONFIG_FD = 3  # the pipe a worker reads its configuration from, then watches for EOF
FIRST_LISTEN_FD = 4
RESTART_DELAY = 1.0  # seconds before a dead worker is started again...
MAX_RESTART_DELAY = 30.0  # ...doubling up to this while it keeps dying young
YOUNG = 10.0  # a worker that ran less than this long "died young"
STOP_TIMEOUT = 10.0  # SIGTERM, then SIGKILL after this long (systemd allows 15 s)
SHAREABLE = ("tcp:", "tcp6:", "unix:", "systemd:")
ACCEPTS_PER_WAKE = 1  # on a socket several processes share: see accept_in_turn
_LENGTH = struct.Struct("!Q")
_STAMP = re.compile(r"^\d{4}-\d\d-\d\dT[\d:]+[+-]\d{4} ")  # twistd's, the parent adds its own


def tab_mode_off(workers: int) -> str:
    """Why tab routes and tab-only sessions answer 503 TAB_MODE_OFF with several workers."""
    return (f"tab mode is off: this gateway runs {workers} worker processes (--workers), and "
            "a tab and its session's requests must meet in one; run it with --workers 1")


def unshareable(description: str) -> bool:
    """Whether a ``--listen`` endpoint cannot be handed to workers as a bare socket.

    A TLS endpoint's socket is only half of it (the TLS layer lives in the factory), and
    other plugins' endpoints may not be sockets at all.
    """
    lowered = description.strip().lower()
    return not (lowered.isdigit() or lowered.startswith(SHAREABLE))


@frozen
class ReusePort:
    """A TCP address every worker binds a socket of its own to, with SO_REUSEPORT."""

    family: int
    host: str
    port: int
    backlog: int


def reuse_port_for(description: str) -> ReusePort | None:
    """The address of a plain TCP endpoint, or None: its socket is handed on instead.

    With one shared listening socket every idle worker is woken for each connection and
    the first awake takes all that are queued (Twisted accepts in a loop), so in practice
    one worker takes nearly all of them. With SO_REUSEPORT the kernel spreads new
    connections over the workers' sockets evenly. systemd's and Unix sockets are shared.
    """
    from twisted.internet.endpoints import serverFromString

    if not hasattr(socket, "SO_REUSEPORT"):
        return None
    endpoint = serverFromString(None, description)
    families = {"TCP4ServerEndpoint": socket.AF_INET, "TCP6ServerEndpoint": socket.AF_INET6}
    family = families.get(type(endpoint).__name__)
    if family is None:
        return None
    # Twisted's private attributes (tests/test_workers_unit.py pins them): a KeyError
    # on an upgrade that renames them, never a silent wrong address.
    fields = vars(endpoint)
    host = fields["_interface"] or ("::" if family == socket.AF_INET6 else "")
    return ReusePort(family, host, fields["_port"], fields["_backlog"])


def accept_in_turn(port) -> None:
    """Make a listening port that other processes share accept one connection per wake-up.

    Every process polling a shared socket is woken for a new connection, and Twisted's
    accept loop takes up to ``numberAccepts`` of those queued (100 at first, growing by
    20 while they keep coming): the first process awake took all 200 of 200 connections
    opened at once. Accepting one at a time leaves the next connection to whichever
    process returns to its poll first, which is the least busy one. ``numberAccepts`` is
    an attribute of Twisted's ``tcp.Port`` (``unix.Port`` inherits it) that its
    ``doRead`` reads and rewrites; tests/test_workers_unit.py pins that it still does.
    """
    if not hasattr(port, "numberAccepts"):
        raise TypeError(f"cannot share {port!r}: it has no accept loop to bound")
    accept = port.doRead

    def doRead():
        port.numberAccepts = ACCEPTS_PER_WAKE
        return accept()

    port.doRead = doRead


def adopt_stream_port(reactor, fd: int, family: int, factory):
    """``reactor.adoptStreamPort``, except that a Unix socket keeps its mode and backlog.

    Twisted's Unix port runs ``chmod(path, 0o666)`` and ``listen(50)`` on the socket it
    adopts, as it does on one it creates: a systemd socket with ``SocketMode=0600`` would
    become writable by every local user, and the parent's backlog would shrink to 50 for
    all processes. So the port is built as ``adoptStreamPort`` builds it (a private
    constructor, pinned by tests/test_workers_unit.py) and given the socket's own mode
    and the largest backlog (the kernel caps it at ``net.core.somaxconn``; systemd's
    default ``Backlog=`` is the same).
    """
    if family != socket.AF_UNIX:
        return reactor.adoptStreamPort(fd, family, factory)
    from twisted.internet import unix

    probe = socket.socket(fileno=os.dup(fd))  # the path, from the socket: no private name
    path = probe.getsockname()
    probe.close()
    port = unix.Port._fromListeningDescriptor(reactor, fd, factory)
    if isinstance(path, str) and path:  # a name in the filesystem (abstract ones are bytes)
        port.mode = stat.S_IMODE(os.stat(path).st_mode)
    port.backlog = socket.SOMAXCONN
    port.startListening()
    return port


class KeepSocketsReactor:
    """The reactor, for endpoints: a socket they adopt (systemd's) keeps mode and backlog."""

    def __init__(self, reactor) -> None:
        self._reactor = reactor

    def __getattr__(self, name: str):
        return getattr(self._reactor, name)

    def adoptStreamPort(self, fd: int, family: int, factory):  # noqa: N802 (the interface's)
        return adopt_stream_port(self._reactor, fd, family, factory)


@frozen
class WorkerRole:
    """Which process this is: worker 0 is the parent; others adopt ``fds`` (inherited
    listening sockets) and bind their own sockets to ``reuse``."""

    index: int
    count: int
    fds: tuple[int, ...] = ()
    reuse: tuple[ReusePort, ...] = ()

    @property
    def parent(self) -> bool:
        return self.index == 0

    def health(self) -> dict:
        return {"index": self.index, "pid": os.getpid(), "workers": self.count}


def role_from_environment(environ) -> WorkerRole | None:
    """The role a parent gave this process, or None: not a worker."""
    value = environ.get(WORKER_ENV)
    if not value:
        return None
    index, _, fds = value.partition(":")
    count, _, index = index.partition("/")
    return WorkerRole(int(index), int(count), tuple(int(fd) for fd in fds.split(",") if fd))


# --- the worker's side ---


def read_config(fd: int = CONFIG_FD):
    """(the parent's GatewayConfig, the ReusePort addresses to bind); a blocking read,
    done before the reactor runs."""
    def exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = os.read(fd, size - len(data))
            if not chunk:
                raise SystemExit("lmgateway worker: the parent went away before sending "
                                 "the configuration")
            data += chunk
        return data

    (size,) = _LENGTH.unpack(exactly(_LENGTH.size))
    return pickle.loads(exactly(size))  # noqa: S301 - our own parent, over a private pipe


def encode_config(config, reuse: tuple[ReusePort, ...] = ()) -> bytes:
    data = pickle.dumps((config, reuse))
    return _LENGTH.pack(len(data)) + data


class _PipeEnd(abstract.FileDescriptor):
    """The read end of the parent's pipe: its end-of-file means the parent is gone."""

    def __init__(self, fd: int, reactor, lost: Callable[[], None]) -> None:
        super().__init__(reactor)
        self.fd = fd
        self.lost = lost
        fdesc.setNonBlocking(fd)

    def fileno(self) -> int:
        return self.fd

    def doRead(self):
        return fdesc.readFromFD(self.fd, lambda data: None)

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        os.close(self.fd)
        self.fd = -1
        self.lost()


class Lifeline(Service):
    """In a worker: stop the reactor when the parent's pipe closes."""

    def __init__(self, reactor, fd: int = CONFIG_FD) -> None:
        self.reactor = reactor
        self.fd = fd
        self.pipe: _PipeEnd | None = None

    def startService(self) -> None:
        super().startService()
        self.pipe = _PipeEnd(self.fd, self.reactor, self._parent_gone)
        self.pipe.startReading()

    def _parent_gone(self) -> None:
        if self.running:
            log.warn("worker: the parent process is gone; stopping")
            self.reactor.stop()

    def stopService(self):
        super().stopService()
        if self.pipe is not None and self.pipe.fd >= 0:
            self.pipe.stopReading()


class ReusePortListener(Service):
    """A TCP listener of this process's own, one of a SO_REUSEPORT group."""

    def __init__(self, reactor, spec: ReusePort, factory) -> None:
        self.reactor = reactor
        self.spec = spec
        self.factory = factory
        self.port: Any = None

    def privilegedStartService(self) -> None:
        from twisted.internet.error import CannotListenError

        super().privilegedStartService()
        sock = socket.socket(self.spec.family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted does
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.spec.host, self.spec.port))
            sock.listen(self.spec.backlog)
            sock.setblocking(False)
            self.port = self.reactor.adoptStreamPort(sock.fileno(), self.spec.family,
                                                     self.factory)
        except OSError as e:
            raise CannotListenError(self.spec.host, self.spec.port, e) from None
        finally:
            sock.close()  # adoptStreamPort made its own copy
        # tcp:0 picks a port: the workers must join the one the parent got.
        self.spec = ReusePort(self.spec.family, self.spec.host, self.port.getHost().port,
                              self.spec.backlog)
        log.info("listening on {address} (SO_REUSEPORT)", address=self.port.getHost())

    def stopService(self):
        super().stopService()
        return self.port.stopListening() if self.port is not None else succeed(None)


class AdoptedListener(Service):
    """In a worker: serve on a listening socket inherited from the parent."""

    def __init__(self, reactor, fd: int, factory) -> None:
        self.reactor = reactor
        self.fd = fd
        self.factory = factory
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        probe = socket.socket(fileno=os.dup(self.fd))  # the kernel knows the family
        family = probe.family
        probe.close()
        self.port = adopt_stream_port(self.reactor, self.fd, family, self.factory)
        os.close(self.fd)  # the port made its own copy
        accept_in_turn(self.port)

    def stopService(self):
        super().stopService()
        return self.port.stopListening() if self.port is not None else succeed(None)


# --- the parent's side ---


class _Worker(ProcessProtocol):
    transport: Any  # a twisted Process (its interface's stubs do not type-check)

    def __init__(self, pool: "WorkerPool", index: int) -> None:
        self.pool = pool
        self.index = index
        self.started = pool.reactor.seconds()
        self.ended: Deferred = Deferred()
        self.alive = True
        self.pid: int | None = None
        self._partial = {1: b"", 2: b""}

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.writeToChild(CONFIG_FD, encode_config(self.pool.config,
                                                             self.pool.reuse()))

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        # A worker logs to its stdout; its lines go into the parent's log, one by one.
        lines = (self._partial.get(childFD, b"") + data).split(b"\n")
        self._partial[childFD] = lines.pop()
        for line in lines:
            if line.strip():
                text = _STAMP.sub("", line.decode("utf-8", "replace").rstrip(), count=1)
                log.info("worker {index}: {line}", index=self.index, line=text)

    def processEnded(self, reason) -> None:
        self.alive = False
        self.pool.ended(self, reason)
        self.ended.callback(None)


def worker_command() -> list[str]:
    """The same daemon in the foreground, from the same interpreter and import path."""
    return [sys.executable, "-c",
            "import sys; sys.argv[0] = 'twistd'; "
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=", "lmgateway"]


class WorkerPool(Service):
    """In the parent: N-1 workers, restarted when they die, stopped with the parent.

    ``spawn`` is ``reactor.spawnProcess``'s signature (tests pass a double);
    ``listeners`` are the parent's Listener services, bound before this starts;
    ``environ`` is what the workers inherit, less systemd's socket variables.
    """

    def __init__(self, reactor, config, listeners, *, environ, spawn=None,
                 command: Callable[[], list[str]] = worker_command) -> None:
        self.reactor = reactor
        self.config = config
        self.listeners = listeners
        self.spawn = spawn if spawn is not None else reactor.spawnProcess
        self.command = command
        self.environ = environ  # the daemon's environment (tap.py reads it), for the workers
        self.workers: dict[int, _Worker] = {}
        self.delays: dict[int, float] = {}
        self.pending: dict[int, Any] = {}  # index -> the delayed call restarting it
        self.restarts = 0
        self._previous_hup: Any = None

    @property
    def count(self) -> int:
        return self.config.workers

    def startService(self) -> None:
        super().startService()
        self._previous_hup = signal.getsignal(signal.SIGHUP)
        previous = self._previous_hup

        def on_hup(signum, frame):
            if callable(previous):
                previous(signum, frame)
            self.reactor.callFromThread(self.signal_all, "HUP")

        signal.signal(signal.SIGHUP, on_hup)
        for index in range(1, self.count):
            self.start_worker(index)

    def fds(self) -> list[int]:
        """The listening sockets handed to workers as they are (systemd's, Unix ones)."""
        return [listener.port.fileno() for listener in self.listeners
                if not isinstance(listener, ReusePortListener)]

    def reuse(self) -> tuple[ReusePort, ...]:
        return tuple(listener.spec for listener in self.listeners
                     if isinstance(listener, ReusePortListener))

    def start_worker(self, index: int) -> _Worker:
        self.pending.pop(index, None)
        fds = self.fds()
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r", CONFIG_FD: "w"}
        for offset, fd in enumerate(fds):
            child_fds[FIRST_LISTEN_FD + offset] = fd
        listen = ",".join(str(FIRST_LISTEN_FD + n) for n in range(len(fds)))
        env = {k: v for k, v in self.environ.items()
               if k not in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")}
        env[WORKER_ENV] = f"{self.count}/{index}:{listen}"
        worker = _Worker(self, index)
        command = self.command()
        self.spawn(worker, command[0], command, env=env, childFDs=child_fds)
        self.workers[index] = worker
        log.info("worker {index} started (pid {pid})", index=index, pid=worker.pid)
        return worker

    def ended(self, worker: _Worker, reason) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if not self.running:
            return
        lived = self.reactor.seconds() - worker.started
        previous = self.delays.get(worker.index)
        if previous is None or lived >= YOUNG:
            delay = RESTART_DELAY
        else:
            delay = min(previous * 2, MAX_RESTART_DELAY)
        self.delays[worker.index] = delay
        self.restarts += 1
        log.warn("worker {index} (pid {pid}) ended ({why}); starting it again in {delay:g} s",
                 index=worker.index, pid=worker.pid, why=reason.value, delay=delay)
        self.pending[worker.index] = self.reactor.callLater(delay, self.start_worker,
                                                            worker.index)

    def signal_all(self, name: str) -> None:
        for worker in list(self.workers.values()):
            try:
                worker.transport.signalProcess(name)
            except (ProcessExitedAlready, OSError):
                pass  # it is ending already

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers.values() if w.pid is not None]

    def stopService(self):
        super().stopService()
        signal.signal(signal.SIGHUP, self._previous_hup or signal.SIG_DFL)
        for call in self.pending.values():
            if call.active():
                call.cancel()
        self.pending.clear()
        waiting = [w.ended for w in self.workers.values()]
        if not waiting:
            return succeed(None)
        self.signal_all("TERM")
        kill = self.reactor.callLater(STOP_TIMEOUT, self.signal_all, "KILL")

        def done(result):
            if kill.active():
                kill.cancel()
            return None

        return DeferredList(waiting).addBoth(done)
