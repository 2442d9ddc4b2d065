"""Added latency per chunk through a tab: from the tab pushing a line to the client
reading it as an OpenAI chunk.

Starts a gateway daemon (twistd, as in production) and stands in for the tab with a
Python client that speaks /tab/* as the userscript does (one push in flight, each line
pushed as soon as it is "read"). A streaming client asks for an answer; the tab pushes
``--chunks`` lines, one push each, ``--gap-ms`` apart; for each line the time from just
before its push left to the moment the client read its chunk is recorded. The browser's
own cost (GM_xmlhttpRequest's hop through the extension) is not in this figure.

    python bench/tab_latency.py [--chunks 200] [--gap-ms 20]

Prints one JSON object: median, p90, p99 and max in milliseconds, and the push round trip.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import get, start_gateway  # noqa: E402


def post(port: int, path: str, body: dict, timeout: float = 30.0) -> tuple[int, dict | None]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else None
    finally:
        connection.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--gap-ms", type=float, default=20.0)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="lmgw-tab-bench-"))
    gateway, url = start_gateway(workdir, "gateway", "http://127.0.0.1:9", workdir / "s.sqlite3",
                                 extra=("--domains", "arena.ai,lmarena.ai"))
    try:
        port = int(url.rsplit(":", 1)[1])
        script = get(url + "/userscript/bench.user.js")[1].decode()
        token = json.loads(re.search(r"var REGISTRATION_TOKEN = (.*);", script).group(1))
        ident = {"session_name": "bench", "domain": "arena.ai", "registration_token": token,
                 "tab_id": "tab-bench-0001"}
        page = ('{"initialModels":[{"id":"0199e8a0-0000-7000-8000-000000000001",'
                '"publicName":"fake-chat","capabilities":{"outputCapabilities":{"text":true}}}]}')
        status, _ = post(port, "/tab/connect", {**ident, "models_source": page})
        assert status == 200, status
        sent: dict[int, float] = {}
        read: dict[int, float] = {}
        push_rtt: list[float] = []

        def tab():
            status, job = post(port, "/tab/poll", {**ident, "timeout_seconds": 20})
            assert status == 200, status
            first = {"status": 200, "headers": {}}
            for index in range(args.chunks):
                time.sleep(args.gap_ms / 1000)
                sent[index] = time.perf_counter()
                post(port, "/tab/push", {**ident, "job_id": job["job_id"], **first,
                                         "text": f'a0:"<{index}>"\n'})
                push_rtt.append(time.perf_counter() - sent[index])
                first = {}
            post(port, "/tab/push", {**ident, "job_id": job["job_id"], "done": True,
                                     "text": 'ad:{"finishReason":"stop"}\n'})

        worker = threading.Thread(target=tab)
        worker.start()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("POST", "/v1/chat/completions", json.dumps({
            "model": "fake-chat", "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}),
            {"Content-Type": "application/json", "X-Session-Name": "bench",
             "X-Target-Domain": "arena.ai"})
        response = connection.getresponse()
        assert response.status == 200, response.status
        while True:
            line = response.fp.readline()
            if not line:
                break
            found = re.search(rb"<(\d+)>", line)
            if found:
                read[int(found.group(1))] = time.perf_counter()
            if line.startswith(b"data: [DONE]"):
                break
        worker.join()
        delays = sorted((read[i] - sent[i]) * 1000 for i in read)
        rtts = sorted(r * 1000 for r in push_rtt)

        def pct(values, p):
            return round(values[min(len(values) - 1, int(len(values) * p))], 2)

        print(json.dumps({
            "chunks": len(delays), "gap_ms": args.gap_ms, "cpus": os.cpu_count(),
            "load_1min": round(os.getloadavg()[0], 2),
            "push_to_client_ms": {"median": round(statistics.median(delays), 2),
                                  "p90": pct(delays, 0.9), "p99": pct(delays, 0.99),
                                  "max": round(delays[-1], 2)},
            "push_round_trip_ms": {"median": round(statistics.median(rtts), 2),
                                   "p99": pct(rtts, 0.99)},
        }, indent=2))
    finally:
        gateway.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
