"""Does a huge JSON body stall the reactor? ``/health`` probed while million-key bodies arrive.

    .venv/bin/python bench/json_bodies.py                 # about a minute
    .venv/bin/python bench/json_bodies.py --keys 200000 --rounds 1 --json

Starts a gateway daemon (``twistd -n lmgateway``, as in production) in front of a sink
bridge (a separate process that reads each body and answers a fixed completion without
parsing it, so the figures are the gateway's own), then for each case sends 1 or 4
concurrent bodies with ``--keys`` keys (1 000 000: about 17 MiB) to
``/v1/chat/completions`` and to ``/session/register`` while a probe asks ``GET /health``
every ``--interval-ms`` on a kept-alive connection. It prints, per case, the longest and
the p99 wait of the probes sent while the bodies were in flight, and the machine's load.
``--gateway-arg`` passes options to the daemon (``--gateway-arg=--body-workers=0``: the
reactor parses every body itself, as before the parse pool).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import Proc, free_port, get, register, start_gateway, started  # noqa: E402

ANSWER = json.dumps({"id": "chatcmpl-sink", "object": "chat.completion", "created": 0,
                     "model": "fake-model", "choices": [{"index": 0, "message": {
                         "role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                               "total_tokens": 2}}).encode()


class _Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802  (http.server's name)
        self._answer(json.dumps({"object": "list", "data": [{"id": "fake-model"}]}).encode())

    def do_POST(self) -> None:  # noqa: N802
        left = int(self.headers.get("Content-Length", "0"))
        while left > 0:
            left -= len(self.rfile.read(min(left, 1 << 20)))
        self._answer(ANSWER)

    def log_message(self, *args) -> None:
        pass


def sink(port: int) -> None:
    ThreadingHTTPServer(("127.0.0.1", port), _Sink).serve_forever()


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


class Probe(threading.Thread):
    """GET /health every ``interval`` seconds; records (sent at, wait) for each."""

    def __init__(self, port: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self.failures = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stopping.is_set():
            sent = time.monotonic()
            try:
                connection.request("GET", "/health")
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            wait = time.monotonic() - sent
            if ok:
                self.samples.append((sent, wait))
            else:
                self.failures += 1
            time.sleep(max(0.0, self.interval - wait))
        connection.close()

    def during(self, start: float, end: float) -> list[float]:
        return [wait for sent, wait in self.samples if start <= sent <= end]


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


def run_case(port: int, probe: Probe, path: str, kind: str, body: bytes,
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
    waits = probe.during(start, end)
    return {"path": path, "body": kind, "concurrency": concurrency,
            "answers": sorted({f"{s} {c}" if c else str(s) for s, c, _ in results}),
            "seconds": round(end - start, 3), "probes": len(waits),
            "max_ms": round(max(waits) * 1000, 1) if waits else None,
            "p99_ms": round(percentile(waits, 99) * 1000, 1) if waits else None}


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
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)  # the bridge's own process
    args = parser.parse_args()
    if args.sink:
        sink(args.sink)
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="lmgw-bodies-bench-"))
    bridge_port = free_port()
    bridge = Proc("sink", [sys.executable, __file__, "--sink", str(bridge_port)], workdir)
    bridge_url = f"http://127.0.0.1:{bridge_port}"
    gateway = None
    try:
        started(bridge, lambda: bridge.check() or get(bridge_url + "/v1/models")[0] == 200,
                20, "the sink bridge")
        # Big bodies are the point: allow the largest the gateway ever allows.
        gateway, url = start_gateway(workdir, "gateway", bridge_url, workdir / "s.sqlite3",
                                     extra=("--max-body", "20MiB", *args.gateway_arg))
        register(url)
        port = int(url.rsplit(":", 1)[1])
        keys = million_keys(args.keys)
        bodies = {"keys": keys, "string": one_string(len(keys))}
        probe = Probe(port, args.interval_ms / 1000)
        probe.start()
        time.sleep(1.0)
        idle = [w for _, w in probe.samples]
        report: dict = {"keys": args.keys, "body_mib": round(len(keys) / 2**20, 1),
                        "nproc": os.cpu_count(), "load_before": loadavg(),
                        "gateway_args": args.gateway_arg,
                        "idle": {"probes": len(idle), "max_ms": round(max(idle) * 1000, 1),
                                 "p99_ms": round(percentile(idle, 99) * 1000, 1)},
                        "cases": []}
        for path in args.routes.split(","):
            for kind in args.bodies.split(","):
                if path == "/session/register" and kind == "string":
                    continue  # the same 413 as the keys: nothing new
                for concurrency in (1, 4):
                    for _ in range(args.rounds):
                        report["cases"].append(run_case(port, probe, path, kind, bodies[kind],
                                                        concurrency))
                        gateway.check()
        probe.stopping.set()
        probe.join()
        report["load_after"] = loadavg()
        report["probe_failures"] = probe.failures
    finally:
        if gateway is not None:
            gateway.stop()
        bridge.stop()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['body_mib']} MiB bodies ({args.keys} keys, or one string); "
          f"{report['nproc']} CPUs, "
          f"load {report['load_before']} -> {report['load_after']}; "
          f"gateway args: {' '.join(args.gateway_arg) or '(defaults)'}")
    print(f"idle /health: max {report['idle']['max_ms']} ms, p99 {report['idle']['p99_ms']} ms")
    print(f"{'route':22} {'body':6} {'n':>2} {'answers':24} {'seconds':>8} {'probes':>6} "
          f"{'max ms':>8} {'p99 ms':>8}")
    for case in report["cases"]:
        print(f"{case['path']:22} {case['body']:6} {case['concurrency']:>2} "
              f"{', '.join(case['answers']):24} "
              f"{case['seconds']:>8} {case['probes']:>6} {case['max_ms']!s:>8} "
              f"{case['p99_ms']!s:>8}")
    if report["probe_failures"]:
        print(f"{report['probe_failures']} probes failed")
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    sys.exit(main())
