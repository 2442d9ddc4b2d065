"""A redis-server of our own for the tests, and a tiny blocking client to look inside it."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from support.processes import free_port, require_binary, wait_for


def resp(port: int, *args, timeout: float = 5.0):
    """One Redis command over a fresh socket; the reply as Python values.

    Blocking, even when called from the reactor in a test: the server is another
    process answering on loopback, so nothing here waits on the reactor.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        payload = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = str(arg).encode()
            payload.append(b"$%d\r\n%s\r\n" % (len(data), data))
        sock.sendall(b"".join(payload))
        return _reply(sock.makefile("rb"))


def _reply(stream):
    line = stream.readline()
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else stream.read(size + 2)[:-2].decode()
    if kind == b"*":
        size = int(rest)
        return None if size < 0 else [_reply(stream) for _ in range(size)]
    raise RuntimeError(f"unexpected reply {line!r}")


class RedisServer:
    """redis-server on a free loopback port, durable as the README asks: AOF, fsync always."""

    def __init__(self, directory: Path, extra=()) -> None:
        self.binary = require_binary("redis-server")
        self.port = free_port()
        self.dir = directory / f"redis-{self.port}"
        self.dir.mkdir()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.extra = list(extra)
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        log = open(self.dir / "redis.log", "ab")
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--dir", str(self.dir), "--daemonize", "no", *self.extra],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(self.answers, 10, what="redis-server to answer PING")
        return self

    def answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"redis-server exited: {(self.dir / 'redis.log').read_text()}")
        try:
            return resp(self.port, "PING", timeout=1) == "PONG"
        except OSError:
            return False
        except RuntimeError as e:
            if str(e).startswith("LOADING"):  # up, still replaying its AOF: not ready yet
                return False
            raise

    def kill(self) -> None:
        """SIGKILL: no shutdown save, so only what was fsynced survives."""
        self.process.kill()
        self.process.wait(10)

    def __call__(self, *args):
        return resp(self.port, *args)
