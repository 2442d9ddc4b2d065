"""The benchmark's pieces, without running it: its client's parser, its report, its nginx file.

The benchmark itself is a script (bench/run.py); these only keep it from rotting.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from support.processes import require_binary

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import loadgen  # noqa: E402
import procs  # noqa: E402
import run  # noqa: E402
from procs import nginx_config  # noqa: E402


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def test_response_parser_times_each_event_across_split_reads():
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = chunked(b"data: {\"a\": 1}\n\n", b": keep-alive\n\n", b"data: {\"b\"",
                   b": 2}\n\ndata: [DONE]\n\n")
    raw = head + body
    response = loadgen.Response()
    moments = []
    for index in range(0, len(raw), 7):  # 7-byte reads split every boundary somewhere
        moments.append(float(index))
        complete = response.feed(raw[index:index + 7], float(index))
        assert complete == (index + 7 >= len(raw))
    assert response.status == 200
    assert response.done_seen
    assert len(response.events) == 3  # the keep-alive comment is not an event
    assert response.events == sorted(response.events)
    assert response.body_bytes == len(b"data: {\"a\": 1}\n\n: keep-alive\n\ndata: {\"b\": 2}\n\n"
                                      b"data: [DONE]\n\n")


def test_response_parser_with_a_content_length():
    response = loadgen.Response()
    assert response.feed(b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\nab", 0.0) is False
    assert response.feed(b"cde", 1.0) is True
    assert response.status == 404
    assert loadgen.summarize(response, 0.0, 1.0, expected=1) == "status 404"


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert loadgen.percentile(values, 50) == 50.0
    assert loadgen.percentile(values, 99) == 99.0
    assert loadgen.percentile([], 50) is None


def test_loadgen_refuses_other_hosts():
    with pytest.raises(SystemExit):
        loadgen.parse_args(["stream", "--host", "192.0.2.1", "--port", "1", "--events", "3"])


def test_settings_quick_and_overrides():
    quick = run.parse_args(["--quick"])
    assert quick.runs == 1 and quick.streams < 1000
    full = run.parse_args(["--streams", "9900", "--only", "3"])
    assert full.runs >= 3 and full.streams == 9900 and full.workloads == ("3",)


def test_table_ratios_and_targets_from_medians():
    settings = run.parse_args(["--runs", "3", "--workers", "1"])
    runs = {"models c=50": {
        "direct": [{"rps": 1000.0}, {"rps": 900.0}, {"rps": 1100.0}],
        "nginx": [{"rps": 800.0}] * 3,
        "gateway": [{"rps": 300.0}, {"rps": 200.0}, {"rps": 400.0}]}}
    medians = run.medians(runs)
    assert medians["models c=50"]["gateway"]["rps"] == 300.0
    text = run.table(medians, settings)
    line = next(line for line in text.splitlines() if line.startswith("models c=50  req/s"))
    assert line.split()[-6:] == ["1000", "800", "300", "0.80", "0.30", "0.38"]
    checks = run.targets(medians, settings)
    assert checks == [("models c=50 throughput >= 0.25 of direct (aim 0.4)", "0.30", True)]


@pytest.mark.process
def test_nginx_config_is_valid(tmp_path):
    nginx = require_binary("nginx", "/usr/sbin/nginx")
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_config(tmp_path, 8, 9))
    assert "proxy_buffering off;" in conf.read_text()
    checked = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(conf),
                              "-e", str(tmp_path / "error.log")], capture_output=True, text=True,
                             timeout=30)
    assert checked.returncode == 0, checked.stderr


def test_ratio_targets_read_throughput_against_nginx_and_ttfb_against_direct():
    settings = run.parse_args(["--runs", "1", "--streams", "1000"])
    medians = {"models c=50": {"nginx": {"rps": 2000.0}, "gateway": {"rps": 150.0}},
               "chat c=50": {"nginx": {"rps": 2000.0}, "gateway": {"rps": 250.0}},
               "stream c=200": {"direct": {"ttfb_p50_ms": 10.0}, "gateway": {"ttfb_p50_ms": 14.0}},
               "open 1000": {"direct": {"ttfb_p50_ms": 100.0}, "gateway": {"ttfb_p50_ms": 140.0}}}
    assert run.ratio_targets(medians, settings) == [
        ("models c=50 throughput >= 0.10 of nginx (aim 0.12)", "0.07", False),
        ("chat c=50 throughput >= 0.10 of nginx (aim 0.12)", "0.12", True),
        ("stream c=200 TTFB p50 within 1.5x direct", "1.40x", True),
        ("open 1000 TTFB p50 within 1.3x direct", "1.40x", False)]


def test_summary_is_the_issue_table_with_cpu_per_thousand():
    settings = run.parse_args(["--runs", "1", "--streams", "1000", "--workers", "1"])
    medians = {"chat c=50": {"direct": {"rps": 2000.0, "proxy_cpu_s_per_1k": 0.3},
                             "nginx": {"rps": 1800.0, "proxy_cpu_s_per_1k": 0.03},
                             "gateway": {"rps": 400.0, "proxy_cpu_s_per_1k": 0.9}}}
    lines = run.table(medians, settings, run.summary_rows(settings)).splitlines()[2:]
    assert [line.split()[-6:] for line in lines] == [
        ["2000", "1800", "400", "0.90", "0.20", "0.22"],
        ["0.30", "0.03", "0.90", "0.10", "3.00", "30.0"]]


def test_the_workers_gateway_is_a_fourth_column_with_its_own_ratios_and_targets():
    settings = run.parse_args(["--runs", "1", "--streams", "1000"])
    assert settings.workers == 2 and settings.paths[-1] == run.WORKERS_PATH
    medians = {"stream c=200": {"direct": {"ttfb_p50_ms": 10.0}, "nginx": {"ttfb_p50_ms": 20.0},
                                "gateway": {"ttfb_p50_ms": 40.0},
                                run.WORKERS_PATH: {"ttfb_p50_ms": 12.0}}}
    text = run.table(medians, settings)
    assert text.splitlines()[0].split()[1:] == [
        "direct", "nginx", "gateway", "gw-w2", "ngx/dir", "gw/dir", "gw/ngx", "w/dir", "w/ngx",
        "w/gw"]
    line = next(line for line in text.splitlines() if line.startswith("stream c=200  TTFB p50"))
    assert line.split()[-10:] == ["10.0", "20.0", "40.0", "12.0", "2.00", "4.00", "2.00",
                                  "1.20", "0.60", "0.30"]
    assert run.ratio_targets(medians, settings) == [
        ("stream c=200 TTFB p50 within 1.5x direct", "4.00x", False),
        ("stream c=200 TTFB p50 within 1.5x direct (gateway-w2)", "1.20x", True)]


def test_a_workers_target_counts_the_cpu_of_every_process(monkeypatch):
    import workloads

    cpu = {10: 1.5, 11: 0.25, 12: 0.5}
    monkeypatch.setattr(workloads, "proc_stats", lambda pid: {"cpu_s": cpu[pid]})
    several = workloads.Target("http://127.0.0.1:1", 10, (11, 12))
    assert several.pids == (10, 11, 12) and several.cpu_s() == 2.25
    assert workloads.Target("http://127.0.0.1:1", 10).cpu_s() == 1.5


def test_cpu_per_thousand_and_the_events_a_run_counted():
    import workloads

    assert workloads.per_thousand(0.5, 2000) == 0.25
    assert workloads.per_thousand(0.5, 0) is None
    streams = [{"ttfb": 0.01, "total": 0.2, "gaps": [0.01] * 21, "bytes": 10}] * 3
    assert loadgen.digest(streams, {})["events"] == 66


def test_bench_server_ports_are_below_the_ephemeral_range_and_rotated_by_the_pid(tmp_path):
    ephemeral = tmp_path / "ip_local_port_range"
    ephemeral.write_text("32768\t60999\n")
    ports = procs.server_ports(ephemeral, pid=1)
    assert sorted(ports) == list(range(32768 - 8192, 32768))
    assert ports[0] != procs.server_ports(ephemeral, pid=2)[0]
    ephemeral.write_text("1024 65535")  # no room below: every unprivileged port
    assert sorted(procs.server_ports(ephemeral, pid=1)) == list(range(1024, 65536))
    assert sorted(procs.server_ports(tmp_path / "missing", pid=1)) == list(range(49152 - 8192, 49152))


def test_bench_free_port_skips_a_held_port(monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        after = [port for port in procs.server_ports() if port != taken]
        monkeypatch.setattr(procs, "_unused_ports", iter([taken, *after]))
        assert procs.free_port() in after[:10]


def test_bench_free_ports_are_distinct_and_below_the_ephemeral_range():
    handed = [procs.free_port() for _ in range(100)]
    assert len(set(handed)) == len(handed)
    first = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert max(handed) < first
