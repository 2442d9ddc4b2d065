"""How fast a change made on one instance reaches another, over a real redis-server.

Starts a redis-server of its own (AOF, fsync always, in a temporary folder), two
RedisSessionStore instances in this process on the real reactor, then for each round
registers a session on A and waits for B to see it, and deletes it on B and waits for A
to drop it. Polls every millisecond, so the figures are accurate to about 1 ms.

    python bench/redis_invalidation.py [--rounds 100]

Prints one JSON object: median, p99 and max in milliseconds for each direction.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater, react

from lmarena_gateway.sessions import validate_registration
from lmarena_gateway.store.redis import RedisSessionStore
from lmarena_gateway.store.redis_commands import parse_address

SESSION = {"domain": "lmarena.ai", "session_id": "12345678-1234-1234-1234-123456789abc",
           "message_id": "87654321-4321-4321-4321-cba987654321"}


def start_redis(folder: str) -> tuple[subprocess.Popen, int]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1",
                                "--appendonly", "yes", "--appendfsync", "always",
                                "--save", "", "--dir", folder],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, port
        except OSError:
            time.sleep(0.02)
    process.kill()
    sys.exit("redis-server did not start")


async def until(reactor, predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("a change did not arrive within 10 s")
        await deferLater(reactor, 0.001, lambda: None)


def summary(seconds: list[float]) -> dict:
    ms = sorted(s * 1000 for s in seconds)
    return {"n": len(ms), "median_ms": round(statistics.median(ms), 2),
            "p99_ms": round(ms[max(0, int(len(ms) * 0.99) - 1)], 2), "max_ms": round(ms[-1], 2)}


async def measure(reactor, port: int, rounds: int) -> dict:
    stores = [RedisSessionStore(parse_address(f"redis://127.0.0.1:{port}/0"), reactor)
              for _ in range(2)]
    for store in stores:
        store.startService()
        await until(reactor, lambda store=store: store.health()["status"] == "ok")
    a, b = stores
    seen, after_ack, deleted = [], [], []
    try:
        for i in range(rounds):
            name = f"bench-{i}"
            registration = validate_registration(dict(SESSION, session_name=name),
                                                 ("lmarena.ai",))
            started = time.monotonic()
            await a.register(registration, 1000.0)
            acknowledged = time.monotonic()
            await until(reactor, lambda name=name: b.get("lmarena.ai", name) is not None)
            seen.append(time.monotonic() - started)
            after_ack.append(time.monotonic() - acknowledged)
            started = time.monotonic()
            await b.delete("lmarena.ai", name)
            await until(reactor, lambda name=name: a.get("lmarena.ai", name) is None)
            deleted.append(time.monotonic() - started)
    finally:
        for store in stores:
            await store.stopService()
    return {"register sent to A -> visible on B": summary(seen),
            "register acknowledged by A -> visible on B": summary(after_ack),
            "delete on B -> gone on A": summary(deleted)}


def main(reactor, argv) -> object:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="lmgw-redis-bench-")
    process, port = start_redis(folder)

    def done(result):
        print(json.dumps({"rounds": args.rounds, **result}, indent=2))

    def cleanup(passthrough):
        process.kill()
        process.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
        return passthrough

    return ensureDeferred(measure(reactor, port, args.rounds)).addCallback(done).addBoth(cleanup)


if __name__ == "__main__":
    react(main, (sys.argv[1:],))
