"""A newcomer's first hour: import then start, typos, busy ports, Redis without ./storage,
the systemd units as the README says to install them."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest

from test_daemon import daemon_env, run_twistd

from support.processes import bin_path, http, require_binary, wait_for

ROOT = Path(__file__).resolve().parent.parent
PHP_FILE = Path(__file__).parent / "data" / "php-sessions.json"
pytestmark = pytest.mark.process  # every test here runs a command


def taken_port() -> socket.socket:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    return taken


def metric(url: str, name: str) -> float:
    _, _, body = http("GET", url + "/metrics")
    text = body.decode() if isinstance(body, bytes) else str(body)
    found = re.findall(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found[0]) if found else 0.0


def test_import_then_start_keeps_every_session(tmp_path, daemon_factory):
    storage = str(tmp_path / "sessions.sqlite3")
    imported = subprocess.run(
        [bin_path("lmgateway"), "import", str(PHP_FILE), "--storage", storage,
         "--bridge-allow", "custom-bridge,loopback"],
        capture_output=True, text=True, timeout=30)
    assert "imported 3" in imported.stdout, imported.stderr
    daemon = daemon_factory("--bridge-allow", "custom-bridge,loopback",
                            env={"STORAGE_PATH": storage})
    # the first pruning pass runs at startup; wait until it has finished
    wait_for(lambda: metric(daemon.url, 'lmgateway_pruning_runs_total{result="ok"}') >= 1,
             15, what="the startup pruning pass")
    _, _, listing = http("GET", daemon.url + "/session/list")
    names = sorted(f"{d}/{n}" for d, sessions in listing["domains"].items() for n in sessions)
    assert names == ["canary.lmarena.ai/team-alpha", "lmarena.ai/team-alpha", "lmarena.ai/team-b"]
    assert listing["domains"]["lmarena.ai"]["team-alpha"]["created_at"] == "2024-01-15T10:30:00Z"


def test_a_busy_port_when_daemonized_is_one_line_not_a_hang(tmp_path):
    taken = taken_port()
    port = taken.getsockname()[1]
    try:
        result = subprocess.run(
            [bin_path("twistd"), f"--pidfile={tmp_path / 'gw.pid'}",
             f"--logfile={tmp_path / 'gw.log'}", "lmgateway",
             f"--listen=tcp:{port}:interface=127.0.0.1"],
            env=daemon_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=30)
    finally:
        taken.close()
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"lmgateway: --listen: cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_a_mistyped_option_is_the_error_then_one_line_of_help(tmp_path):
    result = run_twistd(["--bridge-ulr=http://127.0.0.1:5102"], daemon_env(tmp_path), tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "lmgateway: option --bridge-ulr not recognized",
        "run 'twistd lmgateway --help' for the options"]


def test_an_unknown_gateway_variable_is_a_warning_at_startup(tmp_path, daemon_factory):
    daemon = daemon_factory(env={"GATEWAY_LISTN": "tcp:9999", "GATEWAY_KEEPALIVE": "5"})
    log = daemon.log()
    assert "unknown variable GATEWAY_LISTN ignored" in log
    assert "GATEWAY_KEEPALIVE" not in log  # a real setting is not reported


def test_a_redis_gateway_writes_nothing_under_its_working_directory(tmp_path, redis_server,
                                                                  daemon_factory):
    home = tmp_path / "readonly"
    home.mkdir(mode=0o555)
    daemon = daemon_factory("--storage", redis_server.url, start=False)
    daemon.cwd = home
    daemon.env = daemon_env(tmp_path, STORAGE_PATH=redis_server.url)
    daemon.log_path = tmp_path / "redis-gw.log"
    daemon.start()
    assert http("GET", daemon.url + "/health")[2]["store"]["backend"] == "redis"
    assert list(home.iterdir()) == []  # no ./storage/, no secret file
    # the secret comes from Redis at the first refresh
    script = wait_for(lambda: (lambda r: r[0] == 200 and r[2])(
        http("GET", daemon.url + "/userscript/generate?session_name=a")), 10,
        what="the secret from Redis")
    assert b"REGISTRATION_TOKEN" in script
    assert list(home.iterdir()) == []


def test_fake_bridge_on_a_busy_port_is_one_line(tmp_path):
    taken = taken_port()
    port = taken.getsockname()[1]
    try:
        result = subprocess.run([bin_path("lmgateway"), "fake-bridge", "--listen",
                                 f"tcp:{port}:interface=127.0.0.1"],
                                capture_output=True, text=True, timeout=30)
    finally:
        taken.close()
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"lmgateway fake-bridge: cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_the_redis_template_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = require_binary("systemd-analyze")
    text = (ROOT / "systemd" / "lmgateway@.service").read_text()
    assert "/opt/lmgateway/bin/twistd" in text  # what the README says to substitute
    unit = tmp_path / "lmgateway@.service"
    unit.write_text(text.replace("/opt/lmgateway/bin/twistd", bin_path("twistd")))
    instance = tmp_path / "lmgateway@8081.service"
    instance.symlink_to(unit)
    result = subprocess.run([analyze, "verify", str(instance)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "lmgateway" in line] == []
