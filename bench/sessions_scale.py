"""Sessions at scale, in-process on the real reactor: lookup cost and the pruning stall.

Builds a store file with N sessions (written directly with SessionFile), starts a
DBMSessionStore on it as the daemon does, then:

- times the per-request store work (``get`` + ``touch``) with N sessions held;
- runs one pruning pass over sessions that are all idle while a LoopingCall heartbeat
  every 5 ms records the gaps between its beats: the longest gap is the longest time
  the reactor could not serve anyone.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import LoopingCall, deferLater, react

from lmarena_gateway.config import DEFAULT_DOMAINS
from lmarena_gateway.sessions import SessionRecord
from lmarena_gateway.store.sqlite import DBMSessionStore, SessionFile

HEARTBEAT = 0.005


def make_records(count: int, when: float, *, name_prefix: str = "s") -> list[SessionRecord]:
    """``count`` valid sessions spread over the default domains, last active at ``when``."""
    return [SessionRecord(domain=DEFAULT_DOMAINS[i % len(DEFAULT_DOMAINS)],
                          session_name=f"{name_prefix}{i}", session_id=str(uuid.uuid4()),
                          message_id=str(uuid.uuid4()), created_at=when, updated_at=when)
            for i in range(count)]


def write_store(path: str, records: list[SessionRecord]) -> float:
    """Write the records in one transaction; returns the seconds it took."""
    started = time.perf_counter()
    store = SessionFile(path)
    try:
        with store.db.transaction():
            for record in records:
                store.write(record)
    finally:
        store.close()
    return time.perf_counter() - started


def lookup_cost(store: DBMSessionStore, records: list[SessionRecord], calls: int,
                when: float) -> float:
    """Microseconds per get + touch, the store work of one proxied request."""
    keys = [(r.domain, r.session_name) for r in records]
    started = time.perf_counter()
    for i in range(calls):
        domain, name = keys[i % len(keys)]
        if store.get(domain, name) is not None:
            store.touch(domain, name, when)
    return (time.perf_counter() - started) / calls * 1e6


@inlineCallbacks
def measure(reactor, directory: str, sessions: int, calls: int):
    now = time.time()
    old = now - 400 * 86400.0  # idle for longer than any cleanup setting
    results = {"sessions": sessions}

    # Lookups with one session held, then with all of them: same keys, same code.
    one = make_records(1, now)
    path_one = os.path.join(directory, "one.sqlite3")
    write_store(path_one, one)
    small = DBMSessionStore(path_one, reactor, flush_interval=3600)
    small.startService()
    results["lookup_us_1"] = lookup_cost(small, one, calls, now)
    yield small.stopService()

    records = make_records(sessions, old)
    path = os.path.join(directory, "many.sqlite3")
    results["write_s"] = write_store(path, records)
    store = DBMSessionStore(path, reactor, flush_interval=3600)
    started = time.perf_counter()
    store.startService()  # the daemon's startup load: before anything is served
    results["load_s"] = time.perf_counter() - started
    # Touched at their old time, so the sessions stay idle for the pruning pass.
    results["lookup_us_n"] = lookup_cost(store, records, calls, old)

    # Each gap with the CPU the reactor thread and the whole process used during it: a
    # long gap with the reactor's own CPU is our work (or the GC); with the process's
    # CPU but not the reactor's, the store thread held the GIL; with neither, the OS
    # ran something else (a busy machine).
    gaps: list[tuple[float, float, float]] = []
    last = [time.perf_counter(), time.thread_time(), time.process_time()]

    def beat() -> None:
        moment = (time.perf_counter(), time.thread_time(), time.process_time())
        gaps.append(tuple(now - before for now, before in zip(moment, last, strict=True)))
        last[:] = moment

    heartbeat = LoopingCall(beat)
    heartbeat.clock = reactor
    heartbeat.start(HEARTBEAT)
    yield deferLater(reactor, 0.5, lambda: None)
    results["idle_max_gap_ms"] = max(gaps)[0] * 1000
    gaps.clear()
    started = time.perf_counter()
    pruned = yield store.prune(now - 30 * 86400.0)
    results["prune_s"] = time.perf_counter() - started
    yield deferLater(reactor, 0.05, lambda: None)  # one more beat after the last batch
    heartbeat.stop()
    results["pruned"] = sum(pruned.values())
    worst = max(gaps)
    results["prune_max_gap_ms"] = worst[0] * 1000
    results["prune_max_gap_reactor_cpu_ms"] = worst[1] * 1000
    results["prune_max_gap_process_cpu_ms"] = worst[2] * 1000
    results["prune_gaps_over_50ms"] = sum(1 for gap in gaps if gap[0] > 0.05)
    # The most CPU the process burnt between two beats: what a quiet machine would see.
    results["prune_max_cpu_between_beats_ms"] = max(gap[2] for gap in gaps) * 1000
    results["prune_beats"] = len(gaps)
    results["remaining"] = len(store.records())
    yield store.stopService()
    print(json.dumps(results), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=200_000, help="lookups to time")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lmgw-bench-") as directory:
        react(measure, (directory, args.sessions, args.calls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
