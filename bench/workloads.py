"""The four workloads. Each returns {case: {path: [one dict per run]}}; run.py takes medians.

Paths are measured interleaved (every path once per repetition, in turn) so a noisy
moment on the machine hits all of them rather than one.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from attrs import frozen

from procs import BENCH, ROOT, proc_stats, register, start_bridge, start_gateway, start_nginx

WRK_DIR = BENCH / "wrk"
STREAM_CHUNKS = 20  # workload 2: 20 chunks, 10 ms apart
STREAM_DELAY_MS = 10.0
WORKERS_PATH = "gateway-w"  # the gateway with --workers N (bench/run.py --workers)


@frozen
class Target:
    """One way to reach the bridge: its URL and the process(es) doing the work (a gateway
    with --workers: its parent first, then the workers it started)."""

    url: str
    pid: int
    workers: tuple[int, ...] = ()

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def pids(self) -> tuple[int, ...]:
        return (self.pid, *self.workers)

    def cpu_s(self) -> float:
        """User + system CPU seconds of every process serving this path."""
        return sum(proc_stats(pid)["cpu_s"] for pid in self.pids)


def events_for(chunks: int) -> int:
    """The fake bridge sends its chunks, a finish chunk and [DONE]."""
    return chunks + 2


def wrk(target: Target, script: str, concurrency: int, duration: float, workdir: Path,
        watch: dict[str, Target]) -> dict:
    """One wrk run; requests/s, latency percentiles in ms, and CPU% of the watched pids."""
    combined = workdir / f"wrk-{script}.lua"
    if not combined.exists():
        combined.write_text((WRK_DIR / f"{script}.lua").read_text()
                            + (WRK_DIR / "report.lua").read_text())
    threads = min(2, concurrency)
    before = {name: t.cpu_s() for name, t in watch.items()}
    command = ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{duration:g}s",
               "--timeout", "10s", "--latency", "-s", str(combined), target.url]
    out = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60,
                         check=True).stdout
    cpu_s = {name: t.cpu_s() - before[name] for name, t in watch.items()}
    cpu = {name: 100.0 * used / duration for name, used in cpu_s.items()}
    line = next(line for line in out.splitlines() if line.startswith("WRK_JSON "))
    raw = json.loads(line[len("WRK_JSON "):])
    errors = sum(raw[k] for k in ("connect_errors", "read_errors", "write_errors",
                                  "status_errors", "timeouts"))
    return {"rps": raw["requests"] / (raw["duration_us"] / 1e6), "p50_ms": raw["p50_us"] / 1000,
            "p99_ms": raw["p99_us"] / 1000, "requests": raw["requests"], "errors": errors,
            "cpu_percent": cpu, "cpu_s": cpu_s}


def per_thousand(cpu_s: float, count: int) -> float | None:
    """CPU seconds per 1 000 of something: readable without a saturated machine."""
    return 1000.0 * cpu_s / count if count else None


def loadgen(target: Target, mode: str, *, events: int, extra: list[str],
            timeout: float) -> dict:
    command = [sys.executable, str(BENCH / "loadgen.py"), mode, "--port", str(target.port),
               "--events", str(events), "--header", "X-Session-Name: bench", *extra]
    out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True)
    return json.loads(out.stdout)


def w1_request_rate(targets: dict[str, Target], settings, workdir: Path, log) -> dict:
    """GET /v1/models and non-streaming chat under wrk at each concurrency."""
    watch = dict(targets)
    for target in targets.values():  # warm up: pools, caches, allocator
        for script in ("models", "chat"):
            wrk(target, script, 50, 1, workdir, {})
    results: dict = {}
    for rep in range(settings.runs):
        for script in ("models", "chat"):
            for concurrency in settings.concurrency:
                case = f"{script} c={concurrency}"
                for name, target in targets.items():
                    run = wrk(target, script, concurrency, settings.duration, workdir, watch)
                    run["proxy_cpu_percent"] = run["cpu_percent"][name]
                    run["proxy_cpu_s_per_1k"] = per_thousand(run["cpu_s"][name], run["requests"])
                    results.setdefault(case, {}).setdefault(name, []).append(run)
                    log(f"w1 run {rep + 1} {case} {name}: {run['rps']:.0f} req/s "
                        f"p99 {run['p99_ms']:.2f} ms, {name} CPU {run['proxy_cpu_percent']:.0f}%")
    return results


def w2_streaming(targets: dict[str, Target], settings, log, *,
                 fast: dict[str, Target] | None = None) -> dict:
    """Streaming chat, 20 chunks 10 ms apart (and 0 ms apart through ``fast``, at
    concurrency 50): first byte, total, gaps between chunks, CPU per 1 000 chunks."""
    events = events_for(STREAM_CHUNKS)
    plan = [(f"stream c={c}", targets, c) for c in settings.concurrency]
    if fast is not None:
        plan.append(("stream 0ms c=50", fast, 50))
    for paths in {id(p): p for _, p, _ in plan}.values():
        for target in paths.values():
            loadgen(target, "stream", events=events, timeout=60,
                    extra=["--concurrency", "20", "--duration", "1"])
    results: dict = {}
    for rep in range(settings.runs):
        for case, paths, concurrency in plan:
            for name, target in paths.items():
                before = target.cpu_s()
                started = time.monotonic()
                run = loadgen(target, "stream", events=events, timeout=settings.duration + 120,
                              extra=["--concurrency", str(concurrency),
                                     "--duration", str(settings.duration)])
                used = target.cpu_s() - before
                run["proxy_cpu_percent"] = 100.0 * used / (time.monotonic() - started)
                run["proxy_cpu_s_per_1k"] = per_thousand(used, run["completed"])
                run["proxy_cpu_s_per_1k_chunks"] = per_thousand(used, run["events"])
                results.setdefault(case, {}).setdefault(name, []).append(run)
                log(f"w2 run {rep + 1} {case} {name}: {run['completed']} streams, "
                    f"{run['failed']} failed, ttfb p50 {run['ttfb_p50_ms']:.1f} ms, "
                    f"gap p99 {run['gap_p99_ms']:.2f} ms, client CPU "
                    f"{run['client_cpu_percent']:.0f}%")
    for by_path in results.values():  # the added delay per chunk, against direct
        for runs in by_path.values():
            for run, direct in zip(runs, by_path["direct"], strict=True):
                run["added_gap_p50_ms"] = run["gap_p50_ms"] - direct["gap_p50_ms"]
                run["added_gap_p99_ms"] = run["gap_p99_ms"] - direct["gap_p99_ms"]
    return results


def w3_open_streams(settings, workdir: Path, log) -> dict:
    """N long streams at once, one chunk a second; fresh processes for every run."""
    ramp = settings.streams / settings.rate
    # Streams outlast the ramp by half again plus 5 s, so all are open at once even if
    # opening falls behind the planned rate.
    chunks = math.ceil(ramp * 1.5) + 5
    events = events_for(chunks)
    timeout = ramp + chunks + 120
    results: dict = {}
    for rep in range(settings.runs):
        for name in settings.open_paths or settings.paths:
            run_dir = workdir / f"w3-{rep}-{name}"
            run_dir.mkdir()
            bridge, bridge_url = start_bridge(run_dir, "slow-bridge", chunks=chunks,
                                              delay_ms=1000)
            procs = [bridge]
            try:
                if name == "direct":
                    target = Target(bridge_url, bridge.pid)
                elif name == "nginx":
                    master, url, worker = start_nginx(run_dir, "nginx", bridge_url)
                    procs.append(master)
                    target = Target(url, worker)
                else:
                    workers = settings.workers if name == WORKERS_PATH else 1
                    gateway, url = start_gateway(run_dir, "gateway", bridge_url,
                                                 run_dir / "sessions.sqlite3", workers=workers)
                    procs.append(gateway)
                    register(url)
                    target = Target(url, gateway.pid, gateway.workers)
                watched = list(target.pids) + ([bridge.pid] if target.pid != bridge.pid else [])
                run = loadgen(target, "open", events=events, timeout=timeout + 60,
                              extra=["--streams", str(settings.streams),
                                     "--rate", str(settings.rate), "--timeout", str(timeout),
                                     *sum((["--watch", str(pid)] for pid in watched), [])])
            finally:
                for proc in reversed(procs):
                    proc.stop()
            # Several workers: each one's growth, summed (each at its own peak).
            serving = [run["procs"][str(pid)] for pid in target.pids]
            proxy = {key: sum(p[key] for p in serving)
                     for key in ("peak_rss_kib", "base_rss_kib", "cpu_s")}
            run["proxy_rss_per_stream_kib"] = (proxy["peak_rss_kib"] - proxy["base_rss_kib"]) \
                / settings.streams
            run["proxy_base_rss_mib"] = proxy["base_rss_kib"] / 1024
            run["proxy_peak_rss_mib"] = proxy["peak_rss_kib"] / 1024
            run["proxy_cpu_s"] = proxy["cpu_s"]
            run["proxy_cpu_percent"] = 100.0 * proxy["cpu_s"] / run["wall_s"]
            run["proxy_cpu_ms_per_stream"] = 1000.0 * proxy["cpu_s"] / settings.streams
            run["proxy_cpu_s_per_1k_chunks"] = per_thousand(proxy["cpu_s"], run["events"])
            # Until the last stream's first event: how much its reactor thread ran, and how
            # much it waited for a core (several workers: their mean). Near 100 % together
            # means stream set-up was bound by CPU; the wait, by CPU the others held.
            setups = [p["setup"] for p in serving if p.get("setup")]
            for key in ("running_percent", "waiting_percent"):
                run[f"setup_{key}"] = sum(p[key] for p in setups) / len(setups) if setups else None
            results.setdefault(f"open {settings.streams}", {}).setdefault(name, []).append(run)
            log(f"w3 run {rep + 1} {name}: {run['completed']}/{settings.streams} completed, "
                f"peak open {run['peak_open']}, {run['proxy_rss_per_stream_kib']:.1f} KiB "
                f"RSS/stream, CPU {run['proxy_cpu_percent']:.0f}%, set-up on a core "
                f"{run['setup_running_percent']}% + waiting {run['setup_waiting_percent']}%, client CPU "
                f"{run['client_cpu_percent']:.0f}%, errors {run['errors']}")
    return results


def w4_sessions(targets: dict[str, Target], bridge_url: str, settings, workdir: Path,
                log) -> dict:
    """Chat through a gateway holding N sessions next to the others; then the pruning stall."""
    from sessions_scale import make_records, write_store

    run_dir = workdir / "w4"
    run_dir.mkdir()
    storage = run_dir / "many.sqlite3"
    records = make_records(settings.sessions - 1, time.time())
    write_store(str(storage), records)
    started = time.monotonic()
    big, url = start_gateway(run_dir, "gateway-many", bridge_url, storage, timeout=300,
                             extra=("--max-sessions-per-domain", str(settings.sessions)))
    startup = time.monotonic() - started
    results: dict = {"startup": {"gateway-many": [{"seconds": startup,
                                                   "rss_mib": proc_stats(big.pid)["rss_kib"] / 1024}]}}
    paths = {name: t for name, t in targets.items() if name != WORKERS_PATH}
    paths["gateway-many"] = Target(url, big.pid)
    try:
        register(url)
        for target in paths.values():
            wrk(target, "chat", 50, 1, workdir, {})
        for rep in range(settings.runs):
            for concurrency in (1, 50):
                case = f"sessions chat c={concurrency}"
                for name, target in paths.items():
                    run = wrk(target, "chat", concurrency, settings.duration, workdir,
                              {name: target})
                    results.setdefault(case, {}).setdefault(name, []).append(run)
                    log(f"w4 run {rep + 1} {case} {name}: {run['rps']:.0f} req/s "
                        f"p50 {run['p50_ms']:.2f} ms")
    finally:
        big.stop()
    for rep in range(settings.runs):
        out = subprocess.run([sys.executable, str(BENCH / "sessions_scale.py"),
                              "--sessions", str(settings.sessions)], capture_output=True,
                             text=True, timeout=900, check=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
        run = json.loads(out.stdout.strip().splitlines()[-1])
        results.setdefault("prune", {}).setdefault("gateway", []).append(run)
        log(f"w4 run {rep + 1} prune: {run['pruned']} pruned in {run['prune_s']:.1f} s, "
            f"longest reactor gap {run['prune_max_gap_ms']:.0f} ms "
            f"(reactor CPU {run['prune_max_gap_reactor_cpu_ms']:.0f} ms, process CPU "
            f"{run['prune_max_gap_process_cpu_ms']:.0f} ms)")
    return results
