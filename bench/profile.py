"""Profile the gateway under one workload with py-spy, and measure its CPU per request.

    .venv/bin/python bench/profile.py chat               # wrk, chat at concurrency 50
    .venv/bin/python bench/profile.py stream --seconds 10 --concurrency 200
    .venv/bin/python bench/profile.py chat --no-profile  # CPU s/1k only, no sampler

Starts a fake bridge and a gateway (as bench/run.py does), drives one workload for a
fixed time, and prints the gateway's CPU seconds per 1 000 requests (and per 1 000
relayed chunks for streams) and, with py-spy installed (``pip install py-spy``), the
functions holding the most samples, self and inclusive. The collapsed stacks are kept
in bench/results/ for a flame graph.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import workloads  # noqa: E402
from procs import BENCH, VENV_BIN, proc_stats, raise_fd_limit, register, start_bridge, start_gateway  # noqa: E402


def top(stacks: Path, count: int) -> tuple[list, list, int]:
    """(self, inclusive) [(samples, frame)] of py-spy's collapsed output; total samples."""
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    for line in stacks.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        n = int(samples)
        frames = stack.split(";")[1:]  # the first is the process/thread
        total += n
        if frames:
            own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    return own.most_common(count), inclusive.most_common(count), total


def short(frame: str) -> str:
    """``name (path/to/module.py:12)`` as ``name (module.py)``: lines vary by version."""
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.rsplit(':', 1)[0]).name})" if where else name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=("models", "chat", "stream"))
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--delay-ms", type=float, default=workloads.STREAM_DELAY_MS,
                        help="stream: the bridge's gap between chunks")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-profile", action="store_true", help="measure CPU only")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(VENV_BIN / "py-spy")
    profile = not args.no_profile and Path(spy).exists()
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="lmgw-profile-"))
    procs = []
    try:
        bridge, bridge_url = start_bridge(workdir, "bridge", chunks=workloads.STREAM_CHUNKS,
                                          delay_ms=args.delay_ms)
        procs.append(bridge)
        gateway, url = start_gateway(workdir, "gateway", bridge_url, workdir / "s.sqlite3")
        procs.append(gateway)
        register(url)
        target = workloads.Target(url, gateway.pid)
        warm = ("models", "chat") if args.workload != "stream" else ()
        for script in warm:
            workloads.wrk(target, script, args.concurrency, 1, workdir, {})
        out_dir = BENCH / "results"
        out_dir.mkdir(exist_ok=True)
        stacks = out_dir / f"profile-{args.workload}-{datetime.now():%Y%m%d-%H%M%S}.txt"
        sampler = None
        if profile:
            sampler = subprocess.Popen([spy, "record", "-p", str(gateway.pid), "-f", "raw",
                                        "-r", "200", "-d", str(int(args.seconds) + 2),
                                        "-o", str(stacks), "--nonblocking"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)  # let it attach before the load starts
        before = proc_stats(gateway.pid)["cpu_s"]
        if args.workload == "stream":
            run = workloads.loadgen(target, "stream", events=workloads.events_for(workloads.STREAM_CHUNKS),
                                    timeout=args.seconds + 120,
                                    extra=["--concurrency", str(args.concurrency),
                                           "--duration", str(args.seconds)])
            count, chunks = run["completed"], run["events"]
        else:
            run = workloads.wrk(target, args.workload, args.concurrency, args.seconds, workdir, {})
            count, chunks = run["requests"], None
        used = proc_stats(gateway.pid)["cpu_s"] - before
        print(f"{args.workload} c={args.concurrency} for {args.seconds:g} s: {count} requests, "
              f"gateway CPU {used:.2f} s = {workloads.per_thousand(used, count):.3f} s/1k requests"
              + (f", {workloads.per_thousand(used, chunks):.4f} s/1k chunks" if chunks else ""))
        if sampler is not None:
            _, err = sampler.communicate(timeout=args.seconds + 60)
            if sampler.returncode != 0 or not stacks.exists():
                print(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
                return 1
            own, inclusive, total = top(stacks, args.top)
            print(f"\npy-spy: {total} samples, stacks in {stacks}")
            for title, rows in (("self", own), ("inclusive", inclusive)):
                print(f"\n{title:>9}  function")
                for frame, n in rows:
                    print(f"{100.0 * n / total:8.1f}%  {short(frame)}")
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
