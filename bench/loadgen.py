"""The benchmark's streaming client: event-driven (asyncio protocols on raw sockets).

wrk times whole responses; streams need the time of each server-sent event. Two modes,
each printing one JSON object on stdout:

``stream``: C workers each keep one keep-alive connection and send streaming chat
requests back to back for D seconds; per stream: time to first event, total time, and
the gaps between events.

``open``: N streams opened gradually (R a second), each on its own connection, held
open together; every one must complete. The process ids given with ``--watch`` are
sampled from /proc (RSS and CPU) so the peak is seen while all streams are open, and
their main threads' scheduler statistics until the last stream's first event: how much
of the set-up they ran on a core and how much they waited for one.

The client's own CPU use is reported, so a reader can tell whether it was the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import sys
import time

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "benchmark"}],
        "stream": True}
DONE = b"data: [DONE]"


def build_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Accept: text/event-stream"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Response:
    """An incremental HTTP/1.1 response parser that timestamps every SSE event."""

    def __init__(self) -> None:
        self.buf = b""
        self.state = "head"
        self.status = 0
        self.chunked = False
        self.remaining: int | None = None
        self.keep_alive = True
        self.events: list[float] = []
        self.body_bytes = 0
        self.done_seen = False
        self.complete = False
        self._pending = b""

    def feed(self, data: bytes, now: float) -> bool:
        """Consume bytes received at ``now``; True once the response is complete."""
        self.buf += data
        while not self.complete:
            if not self._step(now):
                break
        return self.complete

    def _step(self, now: float) -> bool:
        """Advance one state; False when more bytes are needed."""
        buf = self.buf
        if self.state == "head":
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            self._head(buf[:end].decode("latin-1"))
            self.buf = buf[end + 4:]
        elif self.state == "size":
            end = buf.find(b"\r\n")
            if end < 0:
                return False
            size = int(buf[:end].split(b";")[0], 16)
            self.buf = buf[end + 2:]
            self.state, self.remaining = ("trailer", None) if size == 0 else ("data", size)
        elif self.state in ("data", "body"):
            if not buf:
                return False
            piece = buf if self.remaining is None else buf[:self.remaining]
            self.buf = buf[len(piece):]
            self._body(piece, now)
            if self.remaining is not None:
                self.remaining -= len(piece)
                if self.remaining == 0:
                    if self.state == "data":
                        self.state = "crlf"
                    else:
                        self.complete = True
        elif self.state == "crlf":
            if len(buf) < 2:
                return False
            self.buf = buf[2:]
            self.state = "size"
        elif self.state == "trailer":
            end = buf.find(b"\r\n")
            if end < 0:
                return False
            self.buf = buf[end + 2:]
            if end == 0:
                self.complete = True
        return True

    def _head(self, head: str) -> None:
        lines = head.split("\r\n")
        self.status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        self.keep_alive = headers.get("connection") != "close"
        if "chunked" in headers.get("transfer-encoding", ""):
            self.chunked, self.state = True, "size"
        else:
            length = headers.get("content-length")
            self.remaining = int(length) if length is not None else None
            self.state = "body"
            if self.remaining == 0:
                self.complete = True

    def _body(self, piece: bytes, now: float) -> None:
        self.body_bytes += len(piece)
        pending = self._pending + piece
        while True:
            end = pending.find(b"\n\n")
            if end < 0:
                break
            event, pending = pending[:end], pending[end + 2:]
            if event.startswith(b":"):
                continue  # an SSE comment (keep-alive), not an answer event
            self.events.append(now)
            if event.strip() == DONE:
                self.done_seen = True
        self._pending = pending

    def end_of_stream(self) -> None:
        """The server closed the connection: a body without a length ends here."""
        if self.state == "body" and self.remaining is None:
            self.complete = True


class Client(asyncio.Protocol):
    """One connection sending requests one after another (HTTP/1.1 keep-alive)."""

    def __init__(self) -> None:
        self.transport = None
        self.response: Response | None = None
        self.waiter: asyncio.Future | None = None
        self.sent_at = 0.0
        self.closed = False
        self.on_first_event = None  # called once, when the answer has begun streaming

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, request: bytes) -> asyncio.Future:
        self.response = Response()
        self.waiter = asyncio.get_running_loop().create_future()
        self.sent_at = time.perf_counter()
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        if self.response is None:
            return
        complete = self.response.feed(data, time.perf_counter())
        if self.on_first_event is not None and self.response.events:
            self.on_first_event, first = None, self.on_first_event
            first()
        if complete:
            self._settle(None)

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.response is not None:
            self.response.end_of_stream()
            self._settle(None if self.response.complete else ConnectionError("connection lost"))

    def _settle(self, error) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(self.response)
            else:
                waiter.set_exception(error)


def summarize(response: Response, sent_at: float, finished_at: float, expected: int) -> dict | str:
    """One stream's figures, or why it failed."""
    if response.status != 200:
        return f"status {response.status}"
    if not response.done_seen or len(response.events) < expected:
        return f"incomplete: {len(response.events)} of {expected} events"
    events = response.events
    return {"ttfb": events[0] - sent_at, "total": finished_at - sent_at,
            "gaps": [b - a for a, b in zip(events, events[1:], strict=False)], "bytes": response.body_bytes}


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank); None when there is nothing to rank."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100.0 * len(ordered))))
    return ordered[rank - 1]


def digest(streams: list[dict], errors: dict[str, int]) -> dict:
    """Percentiles in milliseconds over every stream of one run."""
    ttfb = [s["ttfb"] * 1000 for s in streams]
    total = [s["total"] * 1000 for s in streams]
    gaps = [g * 1000 for s in streams for g in s["gaps"]]
    return {"completed": len(streams), "failed": sum(errors.values()), "errors": errors,
            "ttfb_p50_ms": percentile(ttfb, 50), "ttfb_p99_ms": percentile(ttfb, 99),
            "total_p50_ms": percentile(total, 50), "total_p99_ms": percentile(total, 99),
            "gap_p50_ms": percentile(gaps, 50), "gap_p99_ms": percentile(gaps, 99),
            "bytes": sum(s["bytes"] for s in streams),
            "events": sum(len(s["gaps"]) + 1 for s in streams)}


async def _connect(host: str, port: int) -> Client:
    _, client = await asyncio.get_running_loop().create_connection(Client, host, port)
    return client


async def stream_mode(args, request: bytes) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.duration
    done: list[dict] = []
    errors: dict[str, int] = {}

    async def worker() -> None:
        client = None
        for _ in range(1_000_000):  # bounded; the deadline ends it long before
            if loop.time() >= deadline:
                break
            try:
                if client is None or client.closed:
                    client = await _connect(args.host, args.port)
                response = await asyncio.wait_for(client.send(request), args.timeout)
                result = summarize(response, client.sent_at, time.perf_counter(), args.events)
                if not response.keep_alive:
                    client.transport.close()
            except (OSError, asyncio.TimeoutError) as e:
                result = type(e).__name__
                if client is not None:
                    client.transport.close()
                client = None
            if isinstance(result, str):
                errors[result] = errors.get(result, 0) + 1
            else:
                done.append(result)
        if client is not None:
            client.transport.close()

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    result = digest(done, errors)
    if args.gaps:  # every gap, for pooling over runs (bench/chunk_delay.py)
        result["gaps_ms"] = [round(g * 1000, 4) for s in done for g in s["gaps"]]
    return result


def proc_sample(pid: int) -> dict:
    """RSS (KiB) and CPU seconds of one process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {"rss_kib": rss, "cpu_s": (int(fields[11]) + int(fields[12])) / ticks}


def sched_sample(pid: int) -> tuple[float, float, float]:
    """(now, seconds on a CPU, seconds runnable but waiting for one) of a process's main
    thread, from /proc/PID/schedstat (the reactor's thread: the one that matters)."""
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        running, waiting = f.read().split()[:2]
    return time.monotonic(), int(running) / 1e9, int(waiting) / 1e9


def sched_share(before: tuple, after: tuple) -> dict:
    """How much of a span a thread ran, and waited for a core while it could have run:
    together near 100 %, it was bound by CPU; a large wait, by CPU others held."""
    span = max(after[0] - before[0], 1e-9)
    return {"running_percent": round(100 * (after[1] - before[1]) / span, 1),
            "waiting_percent": round(100 * (after[2] - before[2]) / span, 1)}


async def open_mode(args, request: bytes) -> dict:
    loop = asyncio.get_running_loop()
    watch = {pid: {"base": proc_sample(pid), "peak_rss_kib": 0, "sched": sched_sample(pid)}
             for pid in args.watch}
    state = {"open": 0, "peak_open": 0, "stop": False, "begun": 0}
    done: list[dict] = []
    errors: dict[str, int] = {}

    async def sampler() -> None:
        while not state["stop"]:
            for pid, seen in watch.items():
                seen["peak_rss_kib"] = max(seen["peak_rss_kib"], proc_sample(pid)["rss_kib"])
            await asyncio.sleep(0.2)

    def streaming() -> None:
        state["open"] += 1
        state["peak_open"] = max(state["peak_open"], state["open"])
        state["begun"] += 1
        if state["begun"] == args.streams:  # the set-up phase ends with the last first event
            for pid, seen in watch.items():
                seen["setup"] = sched_share(seen["sched"], sched_sample(pid))

    async def one() -> None:
        # "Open" counts streams whose answer has begun and not ended: held by the server,
        # not waiting in its accept queue.
        client = None
        try:
            client = await _connect(args.host, args.port)
            client.on_first_event = streaming
            waiter = client.send(request)
            try:
                response = await asyncio.wait_for(waiter, args.timeout)
            finally:
                if client.on_first_event is None:  # it had begun
                    state["open"] -= 1
            result = summarize(response, client.sent_at, time.perf_counter(), args.events)
        except (OSError, asyncio.TimeoutError) as e:
            result = f"{type(e).__name__}: {e}"[:80]
        finally:
            if client is not None:
                client.transport.close()
        if isinstance(result, str):
            errors[result] = errors.get(result, 0) + 1
        else:
            done.append(result)

    sampling = asyncio.ensure_future(sampler())
    started, cpu0 = loop.time(), time.process_time()
    tasks = []
    while len(tasks) < args.streams:  # open gradually: at most `rate` a second
        due = min(args.streams, int((loop.time() - started) * args.rate) + 1)
        tasks += [asyncio.ensure_future(one()) for _ in range(due - len(tasks))]
        await asyncio.sleep(0.01)
    ramp = loop.time() - started
    await asyncio.gather(*tasks)
    wall = loop.time() - started
    cpu = time.process_time() - cpu0
    state["stop"] = True
    await sampling
    procs = {}
    for pid, seen in watch.items():
        end = proc_sample(pid)
        procs[str(pid)] = {"base_rss_kib": seen["base"]["rss_kib"],
                           "peak_rss_kib": seen["peak_rss_kib"],
                           "cpu_s": end["cpu_s"] - seen["base"]["cpu_s"],
                           "setup": seen.get("setup")}
    return dict(digest(done, errors), peak_open=state["peak_open"], ramp_s=ramp, wall_s=wall,
                client_cpu_s=cpu, procs=procs)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("stream", "open"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    parser.add_argument("--events", type=int, required=True, help="events a complete stream has")
    parser.add_argument("--concurrency", type=int, default=1, help="stream mode: workers")
    parser.add_argument("--duration", type=float, default=3.0, help="stream mode: seconds")
    parser.add_argument("--streams", type=int, default=1000, help="open mode: streams")
    parser.add_argument("--rate", type=float, default=1000.0, help="open mode: new streams/s")
    parser.add_argument("--watch", type=int, action="append", default=[], metavar="PID")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per stream")
    parser.add_argument("--gaps", action="store_true", help="stream mode: list every gap")
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the benchmark only sends loopback traffic")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    headers = dict(h.split(":", 1) for h in args.header)
    request = build_request(args.host, args.port, args.path, json.dumps(CHAT).encode(),
                            {k.strip(): v.strip() for k, v in headers.items()})
    run = stream_mode if args.mode == "stream" else open_mode
    started, cpu0 = time.perf_counter(), time.process_time()
    try:  # optional: libuv's loop needs about half the client CPU of the stock one
        import uvloop
    except ImportError:
        uvloop = None
    result = (uvloop.run if uvloop else asyncio.run)(run(args, request))
    result["client_loop"] = "uvloop" if uvloop else "asyncio"
    wall = time.perf_counter() - started
    result["client_cpu_percent"] = 100.0 * (time.process_time() - cpu0) / wall if wall else 0.0
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
