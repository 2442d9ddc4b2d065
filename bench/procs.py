"""The processes a benchmark run starts: fake bridges, the gateway, nginx; and /proc reads.

Every process gets its own files under one temporary directory, listens on loopback
only, and is stopped by its own pid when the run ends.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV_BIN = Path(sys.executable).parent
FD_LIMIT = 1 << 17  # 10 000 streams through a proxy hold 20 000 sockets in it


def raise_fd_limit(wanted: int = FD_LIMIT) -> int:
    """Raise RLIMIT_NOFILE for this process and so for every child; returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:  # only root may raise the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            wanted = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


def server_ports(range_file: Path = Path("/proc/sys/net/ipv4/ip_local_port_range"),
                 pid: int | None = None) -> list[int]:
    """The ports a run's servers may take, in the order it tries them.

    The run's own clients open up to 20 000 connections, each from a port of the kernel's
    ephemeral range, so a server's port must come from outside it: the 8192 just below it
    (all unprivileged ones where that leaves too few), rotated by the pid so that two runs
    at once start apart.
    """
    try:
        first = int(range_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first = 49152  # IANA's start of the range, which most other kernels keep
    low = max(1024, first - 8192)
    ports = list(range(low, first)) if first - low >= 1024 else list(range(1024, 65536))
    turn = (os.getpid() if pid is None else pid) * 40503 % len(ports)
    return ports[turn:] + ports[:turn]


_unused_ports = iter(server_ports())


def free_port() -> int:
    """A port no process holds (a bind without SO_REUSEADDR passes), never the same twice."""
    for port in _unused_ports:
        with socket.socket() as probe:  # SO_REUSEADDR is off on a new socket
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free loopback port is left below the ephemeral range")


def get(url: str, headers=None, timeout: float = 2.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post_json(url: str, payload: dict, timeout: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def started(proc: "Proc", check, timeout: float, what: str) -> None:
    """Wait for a child to serve; stop it if it never does, so nothing is left running."""
    try:
        wait_until(check, timeout, what)
    except BaseException:
        proc.stop()
        raise


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


def proc_stats(pid: int) -> dict:
    """RSS in KiB and CPU seconds (user + system) of one process."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return {"rss_kib": rss, "cpu_s": (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")}


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class Proc:
    """A child process with its output in a log file."""

    def __init__(self, name: str, command: list[str], workdir: Path, env=None) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        environment = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env=environment, cwd=workdir)
        self.pid = self.process.pid
        self.workers: tuple[int, ...] = ()  # a gateway's worker processes (--workers)

    def check(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n"
                               + self.log_path.read_text(errors="replace")[-2000:])

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def start_bridge(workdir: Path, name: str, *, chunks: int, delay_ms: float) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(name, [str(VENV_BIN / "lmgateway"), "fake-bridge", "--listen",
                       f"tcp:{port}:interface=127.0.0.1:backlog=4096",
                       "--chunks", str(chunks), "--delay-ms", str(delay_ms)], workdir)
    url = f"http://127.0.0.1:{port}"

    def up():
        proc.check()
        return get(url + "/v1/models")[0] == 200

    started(proc, up, 20, f"the fake bridge {name}")
    return proc, url


def start_gateway(workdir: Path, name: str, bridge_url: str, storage: Path,
                  timeout: float = 120.0, extra: tuple[str, ...] = (),
                  workers: int = 1) -> tuple[Proc, str]:
    """The gateway; with ``workers`` > 1 it returns once every worker has answered."""
    port = free_port()
    if workers > 1:
        extra = (*extra, "--workers", str(workers))
    proc = Proc(name, [str(VENV_BIN / "twistd"), "-n", "--pidfile=", "lmgateway",
                       "--listen", f"tcp:{port}:interface=127.0.0.1:backlog=4096",
                       "--bridge-url", bridge_url, "--storage", str(storage), *extra], workdir)
    url = f"http://127.0.0.1:{port}"
    answered: set[int] = set()

    def up():
        proc.check()
        status, body = get(url + "/health")
        if status != 200:
            return False
        if workers > 1:
            answered.add(json.loads(body)["worker"]["pid"])
        return len(answered) >= workers or workers == 1

    started(proc, up, timeout, f"the gateway {name}")
    if workers > 1:
        proc.workers = tuple(children(proc.pid))
        if len(proc.workers) != workers - 1:
            proc.stop()
            raise RuntimeError(f"{name}: expected {workers - 1} workers, found {proc.workers}")
    return proc, url


def register(gateway_url: str, name: str = "bench") -> None:
    status, body = post_json(gateway_url + "/session/register", {
        "domain": "lmarena.ai", "session_name": name,
        "session_id": "11111111-2222-4333-8444-555555555555",
        "message_id": "66666666-7777-4888-9999-000000000000"})
    if status != 200:
        raise RuntimeError(f"registering the benchmark session failed: {status} {body[:200]!r}")


def nginx_config(workdir: Path, port: int, bridge_port: int) -> str:
    """Debian's nginx as a plain reverse proxy: one worker, buffering off, own paths."""
    template = (BENCH / "nginx.conf.template").read_text()
    user = ""
    if os.geteuid() == 0:  # as root, nginx would drop its workers to "nobody"
        user = (f"user {pwd.getpwuid(os.geteuid()).pw_name} "
                f"{grp.getgrgid(os.getegid()).gr_name};")
    return template.format(user=user, dir=workdir, port=port, bridge_port=bridge_port,
                           fd_limit=FD_LIMIT, connections=FD_LIMIT // 2)


def start_nginx(workdir: Path, name: str, bridge_url: str) -> tuple[Proc, str, int]:
    """Returns the master, the URL and the worker's pid (the process doing the work)."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    home = workdir / name
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = home / "nginx.conf"
    conf.write_text(nginx_config(home, port, int(bridge_url.rsplit(":", 1)[1])))
    proc = Proc(name, [binary, "-p", str(home), "-c", str(conf), "-e", str(home / "error.log")],
                workdir)
    url = f"http://127.0.0.1:{port}"

    def up():
        proc.check()
        return get(url + "/v1/models")[0] == 200 and children(proc.pid)

    started(proc, up, 20, f"nginx {name}")
    return proc, url, children(proc.pid)[0]
