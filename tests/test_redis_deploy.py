"""The files for running several instances: the systemd template, nginx and APISIX configs.

The template is checked by systemd-analyze and against lmgateway.service; nginx runs
the shipped config in front of two real instances (streams unbuffered, failover, its
own errors as JSON); the APISIX file is parsed and checked for what the README promises.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from lmarena_gateway.config import SETTINGS, build_config
from lmarena_gateway.fakebridge import TEXT

from support.client import SESSION
from support.processes import bin_path, free_port, require_binary, wait_for
from support.processes import http as call

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "systemd" / "lmgateway@.service"
SINGLE = ROOT / "systemd" / "lmgateway.service"
NGINX = ROOT / "docs" / "deploy" / "nginx.conf"
APISIX = ROOT / "docs" / "deploy" / "apisix.yaml"


def directives(path: Path) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}} of a unit file."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key, []).append(value)
    return sections


# --- the systemd template ---


def test_template_passes_systemd_analyze_verify(tmp_path):
    analyze = require_binary("systemd-analyze")
    # verify insists that ExecStart's binary exists; /opt/lmgateway does not here.
    text = TEMPLATE.read_text().replace("/opt/lmgateway/bin/twistd", bin_path("twistd"))
    (tmp_path / "lmgateway@.service").write_text(text)
    result = subprocess.run([analyze, "verify", str(tmp_path / "lmgateway@8081.service")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "lmgateway" in line] == []


def test_template_runs_and_confines_the_daemon_as_the_single_service_does():
    template, single = directives(TEMPLATE)["Service"], directives(SINGLE)["Service"]
    for key, values in single.items():
        if key not in ("Environment", "EnvironmentFile"):
            assert template.get(key) == values, key
    assert template["EnvironmentFile"] == ["-/etc/lmgateway/env", "-/etc/lmgateway/%i.env"]
    # one dynamic user, named as lmgateway.service's own, so the state directory is shared
    assert template["User"] == ["lmgateway"] and template["DynamicUser"] == ["yes"]


def test_an_instance_listens_on_its_port_and_shares_redis_and_the_secret(tmp_path):
    environment = dict(v.split("=", 1) for v in directives(TEMPLATE)["Service"]["Environment"])
    assert set(environment) - {"PYTHONUNBUFFERED"} <= {s.env for s in SETTINGS}
    expanded = {name: value.replace("%i", "8081").replace("/var/lib/lmgateway", str(tmp_path))
                for name, value in environment.items()}
    config = build_config({}, expanded)
    assert config.listen == ("tcp:8081:interface=127.0.0.1",)
    assert config.storage == "redis://127.0.0.1:6379/0"
    # the secret lives in Redis: the unit names no file for it, and says so
    assert "GATEWAY_SECRET_FILE" not in environment
    assert "secret lives in Redis" in TEMPLATE.read_text()
    assert directives(TEMPLATE)["Service"]["StateDirectory"] == ["lmgateway"]


# --- nginx, for real ---


def render_nginx(tmp_path: Path, listen: int, instances: list[int]) -> Path:
    """The shipped config with test ports, inside a minimal main config of its own."""
    text = NGINX.read_text()
    servers = re.findall(r"server 127\.0\.0\.1:(\d+) ", text)
    assert servers == ["8081", "8082"]  # the template's example instances
    for port, instance in zip(servers, instances, strict=True):
        text = text.replace(f"127.0.0.1:{port} ", f"127.0.0.1:{instance} ")
    text = text.replace("listen 80;", f"listen 127.0.0.1:{listen};")
    (tmp_path / "lmgateway.conf").write_text(text)
    main = tmp_path / "nginx.conf"
    main.write_text(f"""
daemon off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/nginx-error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/body;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
    include {tmp_path}/lmgateway.conf;
}}
""")
    return main


def test_nginx_accepts_the_config(tmp_path):
    nginx = require_binary("nginx", "/usr/sbin/nginx")
    main = render_nginx(tmp_path, free_port(), [free_port(), free_port()])
    result = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(main)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    # SSE-friendly even for a stream that lacks X-Accel-Buffering, and patient with it
    text = NGINX.read_text()
    assert "proxy_buffering off;" in text and "gzip off;" in text
    assert int(re.search(r"proxy_read_timeout (\d+)s;", text).group(1)) > 360


def stream_with_times(port: int, name: str) -> tuple[list[tuple[float, str]], str]:
    """A streamed chat through nginx: (arrival time, data line) for each event, content type."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", "/v1/chat/completions", json.dumps(
        {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "hi"}]}),
        {"Content-Type": "application/json", "X-Session-Name": name})
    response = connection.getresponse()
    assert response.status == 200
    events = []
    for _ in range(1000):
        line = response.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            events.append((time.monotonic(), line[6:].strip().decode()))
    connection.close()
    return events, response.getheader("Content-Type")


def test_nginx_streams_unbuffered_fails_over_and_speaks_json(
        tmp_path, redis_server, daemon_factory):
    nginx = require_binary("nginx", "/usr/sbin/nginx")
    bridge_port = free_port()
    bridge = subprocess.Popen([bin_path("lmgateway"), "fake-bridge", "--listen",
                               f"tcp:{bridge_port}:interface=127.0.0.1",
                               "--chunks", "4", "--delay-ms", "300"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    secret = {"GATEWAY_SECRET_FILE": str(tmp_path / "registration.secret")}
    front = free_port()
    proxy = None
    try:
        a, b = [daemon_factory("--storage", redis_server.url, "--bridge-url",
                               f"http://127.0.0.1:{bridge_port}", env=secret) for _ in range(2)]
        main = render_nginx(tmp_path, front, [a.port, b.port])
        proxy = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(main)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{front}"
        wait_for(lambda: _answers(url + "/health"), 10, what="nginx")
        # registered directly: through nginx a request is a remote one, which needs a token
        assert call("POST", a.url + "/session/register", dict(SESSION, session_name="n"))[0] == 200
        wait_for(lambda: call("GET", b.url + "/session/list")[2]["domains"]["lmarena.ai"], 1.0,
                 what="B to know the session")

        events, content_type = stream_with_times(front, "n")
        assert content_type.startswith("text/event-stream")
        assert events[-1][1] == "[DONE]"
        text = "".join(json.loads(data)["choices"][0]["delta"].get("content", "")
                       for _, data in events[:-1])
        assert text == TEXT
        # the bridge waits 0.3 s between its 4 chunks: unbuffered, they arrive spread out
        assert events[-1][0] - events[0][0] > 0.6

        a.kill()  # the other instance takes every request
        for _ in range(4):
            status, _, body = call("POST", url + "/v1/chat/completions", {
                "model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
                {"X-Session-Name": "n"})
            assert (status, body["choices"][0]["message"]["content"]) == (200, TEXT)
        b.kill()
        status, headers, body = call("POST", url + "/v1/chat/completions",
                                     {"model": "m", "messages": []}, {"X-Session-Name": "n"})
        assert (status, body["error"]["code"]) == (502, "GATEWAY_UNAVAILABLE")
        assert headers["Content-Type"] == "application/json"
    finally:
        if proxy is not None:
            proxy.send_signal(signal.SIGTERM)
            proxy.wait(10)
        bridge.kill()
        bridge.wait(10)


def _answers(url: str) -> bool:
    try:
        return call("GET", url, timeout=1)[0] == 200
    except OSError:
        return False


# --- APISIX ---


@pytest.fixture(scope="module")
def apisix():
    assert APISIX.read_text().rstrip().endswith("\n#END")  # APISIX ignores the file without it
    return yaml.safe_load(APISIX.read_text())


def test_apisix_upstream_is_every_instance_checked_on_health_with_long_reads(apisix):
    (upstream,) = apisix["upstreams"]
    assert set(upstream["nodes"]) == {"127.0.0.1:8081", "127.0.0.1:8082"}  # as nginx.conf
    assert upstream["timeout"]["read"] > 360 and upstream["timeout"]["send"] > 360
    active = upstream["checks"]["active"]
    assert active["http_path"] == "/health" and active["type"] == "http"
    assert "passive" not in upstream["checks"]
    assert all(route["upstream_id"] == upstream["id"] for route in apisix["routes"])


def test_apisix_routes_have_key_auth_limits_and_cors(apisix):
    routes = {route["id"]: route for route in apisix["routes"]}
    api = routes["openai-api"]["plugins"]
    assert api["key-auth"]["header"] == "Authorization"
    assert api["limit-count"]["key"] == "consumer_name" and api["limit-count"]["rejected_code"] == 429
    assert "X-Session-Name" in api["cors"]["allow_headers"]
    register = routes["session-register"]["plugins"]
    assert "key-auth" not in register and register["limit-count"]["key"] == "remote_addr"
    assert "https://lmarena.ai" in register["cors"]["allow_origins"].split(",")
    admin = routes["session-admin"]["plugins"]
    assert admin["consumer-restriction"]["whitelist"] == ["operator"]
    keys = {c["username"]: c["plugins"]["key-auth"]["key"] for c in apisix["consumers"]}
    assert "operator" in keys and all(key.startswith("Bearer ") for key in keys.values())
