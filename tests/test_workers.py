"""``--workers 2`` as real processes on loopback: both serve one port, share sessions and
tokens, stop with the parent, and a killed worker is replaced."""

from __future__ import annotations

import collections
import http.client
import json
import os
import re
import signal
import socket

from support.client import SESSION
from support.processes import wait_for

ADMIN = "workers-admin-token-0123456789"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
DEADLINE = 30.0  # generous: the SQLite store notices other processes' writes within 0.5 s


class Pinned:
    """One keep-alive connection: every request on it reaches the worker that accepted it."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def call(self, method: str, path: str, body=None, headers=None):
        data = json.dumps(body).encode() if body is not None else None
        head = {"Content-Type": "application/json"} if data is not None else {}
        self.conn.request(method, path, body=data, headers={**head, **(headers or {})})
        response = self.conn.getresponse()
        raw = response.read()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw

    def health(self) -> dict:
        status, body = self.call("GET", "/health")
        assert status == 200
        return body

    def close(self) -> None:
        self.conn.close()


def pinned_to_each_worker(port: int, count: int) -> dict[int, Pinned]:
    """{pid: a connection served by that worker}, opening connections until each answered."""
    found: dict[int, Pinned] = {}

    def more():
        conn = Pinned(port)
        try:
            pid = conn.health()["worker"]["pid"]
        except ConnectionResetError:
            # A connection the kernel queued for a worker that ended before accepting it
            # is reset (SO_REUSEPORT: each worker has its own queue); open another.
            conn.close()
            return False
        if pid in found:
            conn.close()
        else:
            found[pid] = conn
        return len(found) == count

    wait_for(more, DEADLINE, interval=0.01, what=f"connections served by {count} workers")
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_two_workers_serve_one_port_and_share_registrations_and_tokens(daemon_factory):
    daemon = daemon_factory("--workers", "2", env={"GATEWAY_ADMIN_TOKEN": ADMIN})
    conns = pinned_to_each_worker(daemon.port, 2)
    (pid_a, a), (pid_b, b) = sorted(conns.items())
    workers = {pid: conn.health()["worker"] for pid, conn in conns.items()}
    assert sorted(w["index"] for w in workers.values()) == [0, 1]
    assert {w["workers"] for w in workers.values()} == {2}
    parent = next(pid for pid, w in workers.items() if w["index"] == 0)
    assert parent == daemon.process.pid

    # A token issued by one worker registers through the other: one secret file.
    status, script = a.call("GET", "/userscript/team-alpha.user.js", headers=AS_ADMIN)
    assert status == 200
    token = re.search(rb"registration_token=([^\s&\"']+)", script).group(1).decode()
    status, body = b.call("POST", "/session/register", dict(SESSION, registration_token=token))
    assert status == 200, body

    # The worker that did not register sees the session, then its deletion through it.
    wait_for(lambda: a.health()["store"]["sessions"] == 1, DEADLINE,
             what="the registration through the other worker")
    status, body = a.call("DELETE", "/session/lmarena.ai/team-alpha", headers=AS_ADMIN)
    assert status == 200, body
    wait_for(lambda: b.health()["store"]["sessions"] == 0, DEADLINE,
             what="the deletion through the other worker")

    # Tab mode is off with several workers, in the envelope with a stable code.
    status, body = b.call("POST", "/tab/poll", {"session_name": "team-alpha"})
    assert status == 503 and body["error"]["code"] == "TAB_MODE_OFF"
    for conn in conns.values():
        conn.close()


def test_a_registration_through_one_worker_is_served_by_the_other_at_once(
        daemon_factory, fake_bridge_process):
    daemon = daemon_factory("--workers", "2", "--bridge-url", fake_bridge_process)
    conns = pinned_to_each_worker(daemon.port, 2)
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    wrong = []
    for i in range(10):
        # Each round a new session, registered through one worker and used at once
        # through the other (and through fresh connections, which land on either).
        (_, registrar), (_, other) = sorted(conns.items())[::1 if i % 2 else -1]
        name = f"worker{i}"
        status, body = registrar.call("POST", "/session/register", dict(SESSION, session_name=name))
        assert status == 200, body
        status, body = other.call("POST", "/v1/chat/completions", chat, {"X-Session-Name": name})
        if status != 200:
            wrong.append((name, status, body))
        for _ in range(8):
            fresh = Pinned(daemon.port)
            status, body = fresh.call("POST", "/v1/chat/completions", chat,
                                      {"X-Session-Name": name})
            fresh.close()
            if status != 200:
                wrong.append((name, status, body))
    assert wrong == []
    for conn in conns.values():
        conn.close()


def test_sigterm_stops_every_worker(daemon_factory):
    daemon = daemon_factory("--workers", "3")
    pids = set(pinned_to_each_worker(daemon.port, 3))
    assert daemon.process.pid in pids
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(20) == -signal.SIGTERM
    # The parent waits for its workers before it exits: none is left behind.
    assert [pid for pid in pids if alive(pid)] == []
    log = daemon.log()
    assert "worker 1: [twisted.scripts._twistd_unix.UnixAppLogger#info] Server Shut Down." in log
    assert "Traceback" not in log and "starting it again" not in log


def test_a_killed_worker_is_replaced(daemon_factory):
    daemon = daemon_factory("--workers", "2")
    conns = pinned_to_each_worker(daemon.port, 2)
    (child,) = [pid for pid in conns if pid != daemon.process.pid]
    for conn in conns.values():
        conn.close()
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: not alive(child), DEADLINE, what="the killed worker to end")
    replaced = pinned_to_each_worker(daemon.port, 2)
    assert daemon.process.pid in replaced and child not in replaced
    # once: the one killed, not a replacement dying in a loop
    assert daemon.log().count("starting it again") == 1, daemon.log()
    for conn in replaced.values():
        conn.close()


def test_workers_stop_when_the_parent_is_killed(daemon_factory):
    daemon = daemon_factory("--workers", "2")
    conns = pinned_to_each_worker(daemon.port, 2)
    (child,) = [pid for pid in conns if pid != daemon.process.pid]
    for conn in conns.values():
        conn.close()
    daemon.kill()  # SIGKILL: no stopService, only the closed pipe tells the worker
    wait_for(lambda: not alive(child), DEADLINE, what="the orphaned worker to stop")


def served_by(connect, count: int) -> collections.Counter:
    """{pid: connections} for ``count`` connections opened at once, before any request."""
    socks = [connect() for _ in range(count)]  # all queued on the listening socket at once
    request = b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n"  # 1.0: no chunking
    for sock in socks:
        sock.sendall(request)
    pids: collections.Counter = collections.Counter()
    for sock in socks:
        with sock, sock.makefile("rb") as reply:
            head, _, body = reply.read().partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
            pids[json.loads(body)["worker"]["pid"]] += 1
    return pids


def test_a_shared_unix_socket_spreads_connections_over_the_workers(daemon_factory, tmp_path):
    """systemd's and Unix sockets are one socket for all workers: each must take a share.

    Twisted's accept loop took all of a burst in the first process awake (200 of 200);
    accepting one per wake-up leaves the rest to the others.
    """
    path = str(tmp_path / "gw.sock")
    daemon = daemon_factory("--workers", "2", "--listen", f"unix:{path}:backlog=256")
    pinned_to_each_worker(daemon.port, 2)  # both workers up (on the TCP endpoint)

    def connect():
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(30)
        sock.connect(path)
        return sock

    pids = served_by(connect, 200)
    assert sum(pids.values()) == 200 and len(pids) == 2, pids
    assert min(pids.values()) >= 20, pids  # a share each, not a handful
