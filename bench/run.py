"""The benchmark: the gateway against the bare fake bridge and nginx, in one run.

    .venv/bin/python bench/run.py --quick            # about 2 minutes, one run each
    .venv/bin/python bench/run.py                    # about 11 minutes, 3 runs each, medians
    .venv/bin/python bench/run.py --only 3 --streams 9900 --runs 1 --rate 200   # the big open-streams run
    .venv/bin/python bench/run.py --only 3 --streams 9900 --runs 1 --rate 200 --open-paths gateway

Starts a fake bridge (``lmgateway fake-bridge``), nginx as a plain reverse proxy in front
of it and the gateway (``twistd -n lmgateway``) in front of it, all on loopback, then runs
each workload on the three paths in turn. Prints a table, checks the issue's targets and
writes everything to bench/results/<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from attrs import asdict, frozen  # noqa: E402

import workloads  # noqa: E402
from procs import BENCH, raise_fd_limit, register, start_bridge, start_gateway, start_nginx  # noqa: E402

PATHS = ("direct", "nginx", "gateway")
WORKERS_PATH = workloads.WORKERS_PATH
FD_HEADROOM = 200  # listening sockets, logs, the store, epoll, pipes
# Workload 3 opens its streams 1000 a second (issue 16: "1 000 streams opened within a
# second"); the streams' first events then measure how fast a path sets streams up.
QUICK = {"runs": 1, "duration": 1.0, "streams": 200, "rate": 1000.0, "sessions": 10_000}
FULL = {"runs": 3, "duration": 3.0, "streams": 1000, "rate": 1000.0, "sessions": 100_000}


@frozen
class Settings:
    runs: int
    duration: float
    streams: int
    rate: float
    sessions: int
    concurrency: tuple[int, ...] = (1, 50, 200)
    workloads: tuple[str, ...] = ("1", "2", "3", "4")
    workers: int = 2  # a fourth path: the gateway with --workers N (1: none)
    open_paths: tuple[str, ...] = ()  # workload 3 on these paths only (none given: all)

    @property
    def paths(self) -> tuple[str, ...]:
        return PATHS + ((WORKERS_PATH,) if self.workers > 1 else ())


def machine() -> dict:
    def first(path: str, prefix: str) -> str:
        with open(path) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(prefix)), "?")

    import twisted

    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    commit = subprocess.run(["git", "-C", str(BENCH), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "?"
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    return {"nproc": os.cpu_count(), "cpu": first("/proc/cpuinfo", "model name"),
            "ram": first("/proc/meminfo", "MemTotal"), "kernel": platform.release(),
            "python": platform.python_version(), "twisted": twisted.__version__,
            "nginx": nginx.split("/")[-1], "wrk": wrk.split(" [")[0],
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit}


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def medians(results: dict) -> dict:
    """{case: {path: {key: median over runs}}} for every number the runs have."""
    out: dict = {}
    for case, by_path in results.items():
        for path, runs in by_path.items():
            keys = {k for run in runs for k, v in run.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
            out.setdefault(case, {})[path] = {
                k: statistics.median(run[k] for run in runs if run.get(k) is not None)
                for k in sorted(keys) if any(run.get(k) is not None for run in runs)}
    return out


def rows(settings: Settings) -> list[tuple[str, str, str, dict]]:
    """(case, key, label, path overrides) for each table row, in order."""
    spec = []
    for script in ("models", "chat"):
        for c in settings.concurrency:
            case = f"{script} c={c}"
            spec += [(case, "rps", f"{case}  req/s", {}), (case, "p50_ms", f"{case}  p50 ms", {}),
                     (case, "p99_ms", f"{case}  p99 ms", {})]
            if c == 50:
                spec.append((case, "proxy_cpu_percent", f"{case}  CPU % of path", {}))
            spec.append((case, "proxy_cpu_s_per_1k", f"{case}  CPU s/1k req", {}))
    streams = [f"stream c={c}" for c in settings.concurrency] + ["stream 0ms c=50"]
    for case in streams:
        spec += [(case, "ttfb_p50_ms", f"{case}  TTFB p50 ms", {}),
                 (case, "ttfb_p99_ms", f"{case}  TTFB p99 ms", {}),
                 (case, "total_p50_ms", f"{case}  total p50 ms", {}),
                 (case, "total_p99_ms", f"{case}  total p99 ms", {}),
                 (case, "gap_p99_ms", f"{case}  chunk gap p99 ms", {}),
                 (case, "added_gap_p99_ms", f"{case}  added/chunk p99 ms", {}),
                 (case, "proxy_cpu_percent", f"{case}  CPU % of path", {}),
                 (case, "proxy_cpu_s_per_1k_chunks", f"{case}  CPU s/1k chunks", {}),
                 (case, "client_cpu_percent", f"{case}  client CPU %", {})]
    case = f"open {settings.streams}"
    spec += [(case, "completed", f"{case}  completed", {}),
             (case, "peak_open", f"{case}  open at once", {}),
             (case, "ttfb_p50_ms", f"{case}  TTFB p50 ms", {}),
             (case, "ttfb_p99_ms", f"{case}  TTFB p99 ms", {}),
             (case, "proxy_rss_per_stream_kib", f"{case}  KiB RSS/stream", {}),
             (case, "proxy_peak_rss_mib", f"{case}  peak RSS MiB", {}),
             (case, "proxy_cpu_ms_per_stream", f"{case}  CPU ms/stream", {}),
             (case, "proxy_cpu_s_per_1k_chunks", f"{case}  CPU s/1k chunks", {}),
             (case, "setup_running_percent", f"{case}  set-up: on a core %", {}),
             (case, "setup_waiting_percent", f"{case}  set-up: waiting for one %", {}),
             (case, "client_cpu_percent", f"{case}  client CPU %", {})]
    n = f"{settings.sessions // 1000}k" if settings.sessions >= 1000 else str(settings.sessions)
    for c in (1, 50):
        case = f"sessions chat c={c}"
        spec += [(case, "rps", f"chat c={c} 1 session  req/s", {}),
                 (case, "rps", f"chat c={c} {n} sessions  req/s", {"gateway": "gateway-many"}),
                 (case, "p50_ms", f"chat c={c} 1 session  p50 ms", {}),
                 (case, "p50_ms", f"chat c={c} {n} sessions  p50 ms", {"gateway": "gateway-many"})]
    spec += [("prune", "lookup_us_1", "store get+touch, 1 session  us", {}),
             ("prune", "lookup_us_n", f"store get+touch, {n} sessions  us", {}),
             ("startup", "seconds", f"gateway start with {n} sessions  s", {"gateway": "gateway-many"}),
             ("prune", "prune_s", f"prune {n} idle sessions  s", {}),
             ("prune", "prune_max_gap_ms", "  longest reactor gap ms", {}),
             ("prune", "prune_max_cpu_between_beats_ms", "  most process CPU in a gap ms", {}),
             ("prune", "idle_max_gap_ms", "  same, idle (machine noise) ms", {})]
    return spec


def fmt(value) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def summary_rows(settings: Settings) -> list[tuple[str, str, str, dict]]:
    """Issue 16's table: the figures its targets are read from."""
    return [("models c=50", "rps", "models c=50  req/s", {}),
            ("chat c=50", "rps", "chat c=50  req/s", {}),
            ("stream 0ms c=50", "ttfb_p50_ms", "stream 20x0ms c=50  TTFB p50 ms", {}),
            ("stream c=200", "ttfb_p50_ms", "stream 20x10ms c=200  TTFB p50 ms", {}),
            (f"open {settings.streams}", "ttfb_p50_ms",
             f"open {settings.streams} at {settings.rate:g}/s  TTFB p50 ms", {}),
            ("models c=50", "proxy_cpu_s_per_1k", "models c=50  CPU s/1k req", {}),
            ("chat c=50", "proxy_cpu_s_per_1k", "chat c=50  CPU s/1k req", {}),
            ("stream c=200", "proxy_cpu_s_per_1k_chunks", "stream c=200  CPU s/1k chunks", {})]


def table(meds: dict, settings: Settings, spec=None) -> str:
    workers = settings.workers > 1
    extra = f"{'gw-w' + str(settings.workers):>9}" if workers else ""
    extra_ratios = (f"{'w/dir':>9}{'w/ngx':>9}{'w/gw':>9}") if workers else ""
    header = (f"{'workload':<38}{'direct':>9}{'nginx':>9}{'gateway':>9}{extra}"
              f"{'ngx/dir':>9}{'gw/dir':>9}{'gw/ngx':>9}{extra_ratios}")
    lines = [header, "-" * len(header)]
    for case, key, label, override in rows(settings) if spec is None else spec:
        if case not in meds:
            continue
        values = []
        for path in settings.paths:
            got = meds[case].get(override.get(path, path), {})
            values.append(got.get(key))
        if all(v is None for v in values):
            continue
        direct, nginx, gateway = values[:3]
        ratio = lambda a, b, key=key: (  # noqa: E731
            None if a is None or not b or key.startswith("added") else a / b)
        cells = [fmt(v) for v in values] + [fmt(ratio(nginx, direct)), fmt(ratio(gateway, direct)),
                                            fmt(ratio(gateway, nginx))]
        if workers:
            cells += [fmt(ratio(values[3], direct)), fmt(ratio(values[3], nginx)),
                      fmt(ratio(values[3], gateway))]
        lines.append(f"{label:<38}" + "".join(f"{c:>9}" for c in cells))
    return "\n".join(lines)


def targets(meds: dict, settings: Settings) -> list[tuple[str, str, bool]]:
    """The issue's targets, each with the measured figure and whether it was met."""
    checks = []

    def get(case, path, key):
        return meds.get(case, {}).get(path, {}).get(key)

    for script in ("models", "chat"):
        gw, direct = get(f"{script} c=50", "gateway", "rps"), get(f"{script} c=50", "direct", "rps")
        if gw and direct:
            checks.append((f"{script} c=50 throughput >= 0.25 of direct (aim 0.4)",
                           f"{gw / direct:.2f}", gw / direct >= 0.25))
    gw, direct = get("stream c=200", "gateway", "ttfb_p50_ms"), get("stream c=200", "direct", "ttfb_p50_ms")
    if gw and direct:
        checks.append(("stream c=200 TTFB p50 within 1.5x direct", f"{gw / direct:.2f}x",
                       gw / direct <= 1.5))
    added = [get(f"stream c={c}", "gateway", "added_gap_p99_ms") for c in settings.concurrency]
    for c, value in zip(settings.concurrency, added, strict=True):
        if value is not None:
            checks.append((f"stream c={c} added delay per chunk p99 < 1 ms", f"{value:.2f} ms",
                           value < 1.0))
    case = f"open {settings.streams}"
    done, per = get(case, "gateway", "completed"), get(case, "gateway", "proxy_rss_per_stream_kib")
    if done is not None:
        checks.append((f"{settings.streams} open streams all completed",
                       f"{done:.0f}/{settings.streams}", done == settings.streams))
        checks.append(("RSS per open stream <= 30 KiB", f"{per:.1f} KiB", per <= 30))
    gap = get("prune", "gateway", "prune_max_gap_ms")
    if gap is not None:
        checks.append((f"pruning {settings.sessions} sessions: no reactor stall over 50 ms",
                       f"{gap:.0f} ms", gap <= 50))
    return checks


def ratio_targets(meds: dict, settings: Settings) -> list[tuple[str, str, bool]]:
    """Issue 16's targets: against nginx for throughput, against the bridge for TTFB."""
    checks = []

    def get(case, path, key):
        return meds.get(case, {}).get(path, {}).get(key)

    for path in settings.paths[2:]:
        who = "" if path == "gateway" else f" ({path}{settings.workers})"
        for script in ("models", "chat"):
            gw, nginx = get(f"{script} c=50", path, "rps"), get(f"{script} c=50", "nginx", "rps")
            if gw and nginx:
                checks.append((f"{script} c=50 throughput >= 0.10 of nginx (aim 0.12){who}",
                               f"{gw / nginx:.2f}", gw / nginx >= 0.10))
        for case, limit in (("stream c=200", 1.5), (f"open {settings.streams}", 1.3)):
            gw, direct = get(case, path, "ttfb_p50_ms"), get(case, "direct", "ttfb_p50_ms")
            if gw and direct:
                checks.append((f"{case} TTFB p50 within {limit}x direct{who}",
                               f"{gw / direct:.2f}x", gw / direct <= limit))
    return checks


def parse_args(argv=None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short run of each, small N")
    parser.add_argument("--runs", type=int, help="repetitions of each workload (median kept)")
    parser.add_argument("--duration", type=float, help="seconds per wrk / stream run")
    parser.add_argument("--streams", type=int, help="workload 3: streams open at once")
    parser.add_argument("--rate", type=float, help="workload 3: new streams per second")
    parser.add_argument("--sessions", type=int, help="workload 4: sessions in the store")
    parser.add_argument("--only", default="1,2,3,4", help="workloads to run, e.g. 1,3")
    parser.add_argument("--open-paths", default="",
                        help="workload 3 on these paths only, e.g. gateway (the big run)")
    parser.add_argument("--workers", type=int, default=2,
                        help="also run a gateway with --workers N (1: only the one-process gateway)")
    args = parser.parse_args(argv)
    values = dict(QUICK if args.quick else FULL)
    for key in values:
        if getattr(args, key) is not None:
            values[key] = type(values[key])(getattr(args, key))
    if values["runs"] < 1 or values["streams"] < 1 or values["sessions"] < 2:
        parser.error("--runs and --streams must be >= 1, --sessions >= 2")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    settings = Settings(workloads=tuple(args.only.replace(" ", "").split(",")),
                        workers=args.workers,
                        open_paths=tuple(p for p in args.open_paths.replace(" ", "").split(",") if p),
                        **values)
    unknown = set(settings.open_paths) - set(settings.paths)
    if unknown:
        parser.error(f"--open-paths: unknown {', '.join(sorted(unknown))} "
                     f"(paths: {', '.join(settings.paths)})")
    return settings


def start_paths(workdir: Path, prefix: str, procs: list, *, delay_ms: float,
                workers: int = 1) -> dict:
    """A fake bridge, nginx in front of it and a gateway in front of it (and a second
    gateway with ``workers`` processes); ``procs`` gets each as it starts, so a failure
    later still stops them."""
    name = (prefix + "-") if prefix else ""
    bridge, bridge_url = start_bridge(workdir, name + "bridge", chunks=workloads.STREAM_CHUNKS,
                                      delay_ms=delay_ms)
    procs.append(bridge)
    nginx, nginx_url, worker = start_nginx(workdir, name + "nginx", bridge_url)
    procs.append(nginx)
    gateway, gateway_url = start_gateway(workdir, name + "gateway", bridge_url,
                                         workdir / f"{name}sessions.sqlite3")
    procs.append(gateway)
    register(gateway_url)
    paths = {"direct": workloads.Target(bridge_url, bridge.pid),
             "nginx": workloads.Target(nginx_url, worker),
             "gateway": workloads.Target(gateway_url, gateway.pid)}
    if workers > 1:
        several, several_url = start_gateway(workdir, name + "gateway-w", bridge_url,
                                             workdir / f"{name}sessions-w.sqlite3",
                                             workers=workers)
        procs.append(several)
        register(several_url)
        paths[WORKERS_PATH] = workloads.Target(several_url, several.pid, several.workers)
    return paths


def main(argv=None) -> int:
    settings = parse_args(argv)
    for binary in ("wrk", "nginx"):
        if shutil.which(binary) is None and not os.path.exists(f"/usr/sbin/{binary}"):
            raise SystemExit(f"bench: {binary} is not installed (apt-get install {binary})")
    os.environ["PATH"] += os.pathsep + "/usr/sbin"
    fd_limit = raise_fd_limit()
    if "3" in settings.workloads and 2 * settings.streams + FD_HEADROOM > fd_limit:
        # A proxy holds two sockets per stream (client and bridge side).
        raise SystemExit(
            f"bench: {settings.streams} streams through one proxy need "
            f"{2 * settings.streams + FD_HEADROOM} file descriptors, but the hard limit here "
            f"is {fd_limit} (raising it needs CAP_SYS_RESOURCE); the most this machine can "
            f"hold is --streams {(fd_limit - FD_HEADROOM) // 2 // 100 * 100}")
    started = time.monotonic()
    log = lambda text: print(f"[{time.monotonic() - started:6.0f}s load {loadavg():.1f}] {text}",  # noqa: E731
                             flush=True)
    info = dict(machine(), loadavg_start=loadavg(), fd_limit=fd_limit)
    log(f"machine: {info}")
    results: dict = {}
    workdir = Path(tempfile.mkdtemp(prefix="lmgw-bench-"))
    procs = []
    try:
        if {"1", "2", "4"} & set(settings.workloads):
            paths = start_paths(workdir, "", procs, delay_ms=workloads.STREAM_DELAY_MS,
                                workers=settings.workers)
            bridge_url = paths["direct"].url
            if "1" in settings.workloads:
                results.update(workloads.w1_request_rate(paths, settings, workdir, log))
            if "2" in settings.workloads:
                fast = start_paths(workdir, "fast", procs, delay_ms=0.0,
                                   workers=settings.workers)
                results.update(workloads.w2_streaming(paths, settings, log, fast=fast))
            if "4" in settings.workloads:
                results.update(workloads.w4_sessions(paths, bridge_url, settings, workdir, log))
        for proc in reversed(procs):
            proc.stop()
        procs = []
        if "3" in settings.workloads:
            results.update(workloads.w3_open_streams(settings, workdir, log))
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    info["loadavg_end"] = loadavg()
    info["minutes"] = round((time.monotonic() - started) / 60, 1)
    meds = medians(results)
    text = table(meds, settings)
    checks = targets(meds, settings) + ratio_targets(meds, settings)
    summary = table(meds, settings, summary_rows(settings))
    print()
    print(f"{info['nproc']} x {info['cpu']}, {info['ram']} RAM, Python {info['python']}, "
          f"Twisted {info['twisted']}, nginx {info['nginx']}, {info['wrk']}, {info['date']}, "
          f"commit {info['commit']}, "
          f"{settings.runs} run(s) each, median; gw-w{settings.workers}: the gateway with "
          f"--workers {settings.workers}; load average {info['loadavg_start']:.2f} "
          f"-> {info['loadavg_end']:.2f}")
    print(text)
    print()
    print(summary)
    print()
    for what, value, met in checks:
        print(f"  [{'met ' if met else 'MISS'}] {what}: {value}")
    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"machine": info, "settings": asdict(settings), "runs": results,
                               "medians": meds, "table": text, "summary": summary,
                               "targets": [{"target": w, "value": v, "met": m}
                                           for w, v, m in checks]}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
