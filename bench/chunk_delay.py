"""The delay a path adds per relayed chunk at concurrency 1, from enough gaps to trust p99.

    .venv/bin/python bench/chunk_delay.py                 # 4 rounds of 10 s per path
    .venv/bin/python bench/chunk_delay.py --rounds 6 --seconds 15

run.py's "added/chunk p99" at c=1 rests on about 270 gaps a run (13 streams of 21), so
its p99 is the third-largest gap and one scheduler hiccup on a busy machine moves it.
Here each path streams alone for ``--seconds`` per round, the paths in turn, and the
gaps of all rounds are pooled: p50, p99 and p99.9 of each path, minus the bridge's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import workloads  # noqa: E402
from loadgen import percentile  # noqa: E402
from procs import raise_fd_limit, register, start_bridge, start_gateway  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2, help="also a gateway with --workers N")
    args = parser.parse_args(argv)
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="lmgw-chunks-"))
    procs = []
    try:
        bridge, bridge_url = start_bridge(workdir, "bridge", chunks=workloads.STREAM_CHUNKS,
                                          delay_ms=workloads.STREAM_DELAY_MS)
        procs.append(bridge)
        paths = {"direct": workloads.Target(bridge_url, bridge.pid)}
        for name, workers in (("gateway", 1), (f"gateway-w{args.workers}", args.workers)):
            if workers < 2 and name != "gateway":
                continue
            proc, url = start_gateway(workdir, name, bridge_url, workdir / f"{name}.sqlite3",
                                      workers=workers)
            procs.append(proc)
            register(url)
            paths[name] = workloads.Target(url, proc.pid, proc.workers)
        gaps: dict[str, list[float]] = {name: [] for name in paths}
        events = workloads.events_for(workloads.STREAM_CHUNKS)
        for _ in range(args.rounds):
            for name, target in paths.items():
                run = workloads.loadgen(target, "stream", events=events,
                                        timeout=args.seconds + 60,
                                        extra=["--concurrency", "1", "--duration",
                                               str(args.seconds), "--gaps"])
                gaps[name] += run["gaps_ms"]
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    base = {q: percentile(sorted(gaps["direct"]), q) for q in (50, 99, 99.9)}
    print(f"{'path':<14}{'gaps':>8}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}"
          f"{'added p50':>11}{'added p99':>11}{'added p99.9':>13}")
    out = {}
    for name, values in gaps.items():
        values.sort()
        got = {q: percentile(values, q) for q in (50, 99, 99.9)}
        out[name] = {"gaps": len(values), **{f"p{q}": v for q, v in got.items()},
                     **{f"added_p{q}": got[q] - base[q] for q in got}}
        print(f"{name:<14}{len(values):>8}{got[50]:>9.2f}{got[99]:>9.2f}{got[99.9]:>10.2f}"
              f"{got[50] - base[50]:>11.2f}{got[99] - base[99]:>11.2f}"
              f"{got[99.9] - base[99.9]:>13.2f}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
