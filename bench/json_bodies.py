"""Does a huge JSON body stall the reactor? ``/health`` probed while million-key bodies arrive.

    .venv/bin/python bench/json_bodies.py                 # about a minute, one command
    .venv/bin/python bench/json_bodies.py --keys 200000 --rounds 1 --json

Starts a gateway daemon (``twistd -n lmgateway``, as in production) in front of a sink
bridge (nginx, which reads and discards each body and answers a fixed completion, so the
bridge costs the two CPUs next to nothing), then for each case sends 1 or 4 concurrent
bodies with ``--keys`` keys (1 000 000: about 17 MiB) to ``/v1/chat/completions`` and to
``/session/register``. Meanwhile two probes, each a process of its own, ask every
``--interval-ms`` on a kept-alive connection: one ``GET /health`` of the gateway, the
other (the control) a fixed 200 from a second nginx that has nothing to do with the
gateway. The control's waits are the machine's own noise floor in the same window: what
the gateway's exceed it by is the gateway's. It prints, per case, the longest and the
p99 wait of each probe's requests sent while the bodies were in flight, and the load.
``--gateway-arg`` passes options to the daemon (``--gateway-arg=--body-workers=0``: the
reactor parses every body itself, as before the parse pool).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import Proc, free_port, get, register, start_gateway, started  # noqa: E402

ANSWER = json.dumps({"id": "chatcmpl-sink", "object": "chat.completion", "created": 0,
                     "model": "fake-model", "choices": [{"index": 0, "message": {
                         "role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                               "total_tokens": 2}}).encode()


NGINX = """daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    client_max_body_size 0;
    default_type application/json;
    server {{
        listen 127.0.0.1:{port};
        location = /v1/models {{ return 200 '{models}'; }}
        location / {{ return 200 '{answer}'; }}
    }}
}}
"""


def start_static(workdir: Path, name: str, answer: bytes) -> tuple[Proc, int]:
    """An nginx answering a fixed 200 to everything (POST bodies read and dropped)."""
    home = workdir / name
    home.mkdir()
    port = free_port()
    conf = home / "nginx.conf"
    conf.write_text(NGINX.format(dir=home, port=port, answer=answer.decode(),
                                 models=json.dumps({"object": "list",
                                                    "data": [{"id": "fake-model"}]})))
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = Proc(name, [binary, "-p", str(home), "-c", str(conf), "-e", str(home / "error.log")],
                workdir)
    started(proc, lambda: proc.check() or get(f"http://127.0.0.1:{port}/v1/models")[0] == 200,
            20, f"nginx {name}")
    return proc, port


def million_keys(keys: int) -> bytes:
    """A valid chat request, plus ``keys`` top-level keys that mean nothing."""
    head = b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]'
    return head + b"".join(b', "key%07d": 0' % i for i in range(keys)) + b"}"


def one_string(size: int) -> bytes:
    """A legitimate large prompt of about ``size`` bytes: one string in one message."""
    text = ("The quick brown fox jumps over the lazy dog. " * (size // 45 + 1))[:size]
    return json.dumps({"model": "fake-model",
                       "messages": [{"role": "user", "content": text}]}).encode()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(p / 100 * len(ordered))) - 1))]


def probe_main(port: int, path: str, interval: float) -> None:
    """A probe's own process: one line "sent wait ok" per request, until stdin closes."""
    stopping = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stopping.set()), daemon=True).start()
    out = sys.stdout
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while not stopping.is_set():
        sent = time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            ok = response.status == 200
        except (OSError, http.client.HTTPException):
            ok = False
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        wait = time.monotonic() - sent
        out.write(f"{sent:.6f} {wait:.6f} {int(ok)}\n")
        out.flush()
        time.sleep(max(0.0, interval - wait))


class Probe:
    """``probe_main`` in a child process, its lines read back by a thread here."""

    def __init__(self, port: int, path: str, interval: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--probe", f"{port},{path},{interval}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.samples: list[tuple[float, float]] = []
        self.failures = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            sent, wait, ok = line.split()
            if ok == "1":
                self.samples.append((float(sent), float(wait)))
            else:
                self.failures += 1

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(10)

    def during(self, start: float, end: float) -> list[float]:
        return [wait for sent, wait in self.samples if start <= sent <= end]


def summary(waits: list[float]) -> dict:
    return {"probes": len(waits),
            "max_ms": round(max(waits) * 1000, 1) if waits else None,
            "p99_ms": round(percentile(waits, 99) * 1000, 1) if waits else None}


def send(port: int, path: str, body: bytes, results: list, index: int) -> None:
    """One body on its own connection; the status, or the error if the gateway hung up."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    started_at = time.monotonic()
    try:
        connection.request("POST", path, body, {"Content-Type": "application/json",
                                                "X-Session-Name": "bench"})
        response = connection.getresponse()
        payload = response.read()
        code = None
        if response.status >= 400:
            try:
                code = json.loads(payload)["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = "?"
        results[index] = (response.status, code, time.monotonic() - started_at)
    except (OSError, http.client.HTTPException) as e:
        results[index] = (type(e).__name__, None, time.monotonic() - started_at)
    finally:
        connection.close()


def run_case(port: int, probe: Probe, control: Probe, path: str, kind: str, body: bytes,
             concurrency: int) -> dict:
    results: list = [None] * concurrency
    threads = [threading.Thread(target=send, args=(port, path, body, results, i))
               for i in range(concurrency)]
    time.sleep(0.2)  # a few probes before, as the floor
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    end = time.monotonic()
    time.sleep(0.1)
    return {"path": path, "body": kind, "concurrency": concurrency,
            "answers": sorted({f"{s} {c}" if c else str(s) for s, c, _ in results}),
            "seconds": round(end - start, 3), "load": loadavg(),
            **summary(probe.during(start, end)),
            "control": summary(control.during(start, end))}


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--interval-ms", type=float, default=10.0)
    parser.add_argument("--gateway-arg", action="append", default=[])
    parser.add_argument("--routes", default="/v1/chat/completions,/session/register")
    parser.add_argument("--bodies", default="keys,string",
                        help="keys: --keys top-level keys; string: one prompt of the same size")
    parser.add_argument("--json", action="store_true", help="one JSON object, not a table")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # a probe's own process
    args = parser.parse_args()
    if args.probe:
        port, path, interval = args.probe.split(",")
        probe_main(int(port), path, float(interval))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="lmgw-bodies-bench-"))
    gateway = bridge = quiet = None
    probes: list[Probe] = []
    try:
        bridge, bridge_port = start_static(workdir, "sink", ANSWER)
        bridge_url = f"http://127.0.0.1:{bridge_port}"
        quiet, quiet_port = start_static(workdir, "control", b'{"status": "ok"}')
        # Big bodies are the point: allow the largest the gateway ever allows.
        gateway, url = start_gateway(workdir, "gateway", bridge_url, workdir / "s.sqlite3",
                                     extra=("--max-body", "20MiB", *args.gateway_arg))
        register(url)
        port = int(url.rsplit(":", 1)[1])
        keys = million_keys(args.keys)
        bodies = {"keys": keys, "string": one_string(len(keys))}
        probe = Probe(port, "/health", args.interval_ms / 1000)
        control = Probe(quiet_port, "/health", args.interval_ms / 1000)
        probes = [probe, control]
        time.sleep(1.5)
        idle_end = time.monotonic()
        idle = [w for sent, w in probe.samples if sent <= idle_end]
        idle_control = control.during(0, idle_end)
        report: dict = {"keys": args.keys, "body_mib": round(len(keys) / 2**20, 1),
                        "nproc": os.cpu_count(), "load_before": loadavg(),
                        "gateway_args": args.gateway_arg,
                        "idle": {**summary(idle), "control": summary(idle_control)},
                        "cases": []}
        for path in args.routes.split(","):
            for kind in args.bodies.split(","):
                if path == "/session/register" and kind == "string":
                    continue  # the same 413 as the keys: nothing new
                for concurrency in (1, 4):
                    for _ in range(args.rounds):
                        report["cases"].append(run_case(port, probe, control, path, kind,
                                                        bodies[kind], concurrency))
                        gateway.check()
        for each in probes:
            each.stop()
        report["load_after"] = loadavg()
        report["probe_failures"] = probe.failures
        report["control_failures"] = control.failures
    finally:
        for each in probes:
            each.stop()
        for proc in (gateway, bridge, quiet):
            if proc is not None:
                proc.stop()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['body_mib']} MiB bodies ({args.keys} keys, or one string); "
          f"{report['nproc']} CPUs, "
          f"load {report['load_before']} -> {report['load_after']}; "
          f"gateway args: {' '.join(args.gateway_arg) or '(defaults)'}")
    idle = report["idle"]
    print(f"idle /health: max {idle['max_ms']} ms, p99 {idle['p99_ms']} ms; "
          f"control: max {idle['control']['max_ms']} ms, p99 {idle['control']['p99_ms']} ms")
    print(f"{'route':22} {'body':6} {'n':>2} {'answers':24} {'seconds':>7} {'probes':>6} "
          f"{'max ms':>7} {'p99 ms':>7} {'ctl max':>7} {'ctl p99':>7}  load")
    for case in report["cases"]:
        print(f"{case['path']:22} {case['body']:6} {case['concurrency']:>2} "
              f"{', '.join(case['answers']):24} "
              f"{case['seconds']:>7} {case['probes']:>6} {case['max_ms']!s:>7} "
              f"{case['p99_ms']!s:>7} {case['control']['max_ms']!s:>7} "
              f"{case['control']['p99_ms']!s:>7}  {case['load']}")
    for name in ("probe", "control"):
        if report[f"{name}_failures"]:
            print(f"{report[f'{name}_failures']} {name} requests failed")
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    sys.exit(main())
