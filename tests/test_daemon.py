"""The daemon as a process: installed from a wheel, started, stopped, refused, socket-activated.

Everything here runs ``twistd`` in a subprocess, as an operator or systemd would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from lmarena_gateway import __version__
from lmarena_gateway.config import SETTINGS

from support.processes import bin_path, free_port, http, wait_for

ROOT = Path(__file__).resolve().parent.parent
SETTING_VARIABLES = {s.env for s in SETTINGS}
CLEAN_SHUTDOWN = ("Received SIGTERM, shutting down.", "Main loop terminated.", "Server Shut Down.")


def daemon_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The test's environment without any gateway setting or systemd variable leaking in."""
    env = {k: v for k, v in os.environ.items()
           if k not in SETTING_VARIABLES and not k.startswith("LISTEN_")}
    env["STORAGE_PATH"] = str(tmp_path / "sessions.sqlite3")
    env.update(extra)
    return env


def run_twistd(args, env, cwd, twistd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([twistd or bin_path("twistd"), "-n", "--pidfile=", "lmgateway", *args],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=30)


def port_is_free(port: int) -> bool:
    """Free to listen on again (SO_REUSEADDR, as Twisted does, so TIME_WAIT does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
        except OSError:
            return False
        return True


def stop_with_sigterm(process: subprocess.Popen, within: float = 5.0) -> int:
    """SIGTERM and the exit status; fails if the process outlives ``within`` seconds."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(within)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"still running {within}s after SIGTERM")


# --- a plain, non-editable install into a fresh venv ---


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory) -> Path:
    """This project's wheel and its dependencies' wheels, built once per test session.

    The wheel is built from a copy of the working tree, so setuptools' build/ and
    egg-info never land in the repository and stale ones there cannot leak in.
    """
    base = tmp_path_factory.mktemp("wheelhouse")
    source = base / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", ".venv*", "storage", "__pycache__", "*.pyc",
        ".pytest_cache", ".hypothesis", "dropin.cache", "bench"))
    wheels = base / "wheels"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheels), str(source)],
                   env=env, check=True, timeout=300)
    return wheels


@pytest.fixture(scope="session")
def fresh_venv(wheelhouse, tmp_path_factory) -> Path:
    """A venv that sees nothing of the test environment, with the wheel installed by pip.

    Dependencies resolve from the wheel's own metadata (``--no-index`` over the
    wheelhouse): a requirement missing from setup.cfg would make the daemon fail here.
    """
    venv = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                    "-q", "--no-index", "--find-links", str(wheelhouse), "lmarena-gateway"],
                   env=env, check=True, timeout=300)
    return venv


def the_wheel(wheelhouse: Path) -> Path:
    (wheel,) = wheelhouse.glob("lmarena_gateway-*.whl")
    return wheel


def test_wheel_holds_the_plugin_and_no_twisted_package(wheelhouse):
    names = zipfile.ZipFile(the_wheel(wheelhouse)).namelist()
    assert "twisted/plugins/lmgateway.py" in names
    # An __init__.py here would shadow Twisted's own package on install.
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert "lmarena_gateway/tap.py" in names
    assert {name.split("/")[0] for name in names} == {
        "lmarena_gateway", "twisted", f"lmarena_gateway-{__version__}.dist-info"}


def test_wheel_holds_every_package_data_file(wheelhouse):
    """Code that is not Python (Lua, JavaScript, HTML) ships beside the modules that read it."""
    names = set(zipfile.ZipFile(the_wheel(wheelhouse)).namelist())
    package = Path(__file__).resolve().parent.parent / "lmarena_gateway"
    data = {f"lmarena_gateway/{p.relative_to(package)}" for p in package.rglob("*")
            if p.is_file() and p.suffix in (".lua", ".js", ".html", ".css")}
    assert data and {"lmarena_gateway/store/lua/announce.lua", "lmarena_gateway/store/lua/upsert.lua"} <= data
    assert data <= names, sorted(data - names)


def test_twistd_in_a_fresh_venv_finds_the_plugin(fresh_venv, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    twistd = str(fresh_venv / "bin" / "twistd")
    located = subprocess.run(
        [str(fresh_venv / "bin" / "python"), "-c",
         "import lmarena_gateway, twisted.plugins.lmgateway as p; "
         "print(lmarena_gateway.__file__); print(p.__file__)"],
        env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    for path in located.stdout.split():
        assert Path(path).is_relative_to(fresh_venv), path  # the install, not the source tree

    listing = subprocess.run([twistd, "--help"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, check=True)
    assert any(line.split()[:1] == ["lmgateway"] for line in listing.stdout.splitlines())

    usage = subprocess.run([twistd, "-n", "lmgateway", "--help"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, check=True)
    for setting in SETTINGS:
        if setting.option:  # some settings are variables only
            assert f"--{setting.option}" in usage.stdout
            assert setting.env in usage.stdout


def test_installed_daemon_serves_health(fresh_venv, tmp_path):
    """Only the install's own dependencies are there, and they are enough to serve."""
    port = free_port()
    env = daemon_env(tmp_path)
    env.pop("PYTHONPATH", None)
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(fresh_venv / "bin" / "twistd"), "-n", "--pidfile=", "lmgateway",
             "--listen", f"tcp:{port}:interface=127.0.0.1"],
            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        status, _, body = wait_for(lambda: _health(f"http://127.0.0.1:{port}", process, log_path),
                                   15, what="the installed daemon's /health")
        assert status == 200 and body["version"] == __version__
    finally:
        stop_with_sigterm(process)


def _health(url: str, process: subprocess.Popen, log_path: Path):
    """/health's answer, None while nothing listens yet; fails at once if the daemon died."""
    if process.poll() is not None:
        raise AssertionError(f"exited with {process.returncode}:\n{log_path.read_text()}")
    try:
        return http("GET", url + "/health", timeout=1)
    except OSError:
        return None


# --- a real daemon: health, then SIGTERM ---


def test_daemon_serves_health_and_stops_cleanly_on_sigterm(daemon_factory):
    daemon = daemon_factory()
    status, headers, body = http("GET", daemon.url + "/health")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert body["status"] == "ok" and body["version"] == __version__
    when = datetime.fromisoformat(body["time"])
    assert body["time"].endswith("Z") and when.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - when) < timedelta(minutes=1)

    status = stop_with_sigterm(daemon.process, within=5)
    # twistd shuts down in order, then ends itself with the signal it got (so a
    # supervisor sees "killed by SIGTERM", which systemd counts as a clean stop).
    assert status == -signal.SIGTERM
    log = daemon.log()
    for line in CLEAN_SHUTDOWN:
        assert line in log
    assert f"(TCP Port {daemon.port} Closed)" in log
    assert "Traceback" not in log and "Unhandled" not in log
    assert port_is_free(daemon.port)


def test_json_logs_are_one_object_per_line(tmp_path):
    """The README's command for JSON logs: plain JSON lines, no RFC 7464 separators."""
    port = free_port()
    log_path = tmp_path / "daemon.json"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [bin_path("twistd"), "--nodaemon", "--pidfile=", "--logger=lmarena_gateway.jsonlog.observer",
             "lmgateway", "--listen", f"tcp:{port}:interface=127.0.0.1"],
            env=daemon_env(tmp_path), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _health(f"http://127.0.0.1:{port}", process, log_path), 15, what="/health")
    finally:
        stop_with_sigterm(process)
    lines = log_path.read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line, or this raises
    assert not any(line.startswith("\x1e") for line in lines)
    assert any(event.get("log_namespace", "").startswith("lmarena_gateway") for event in events)
    assert any("SIGTERM" in event.get("log_format", "") for event in events)


# --- a bad value: one line, the option named, non-zero, no traceback ---


def _unwritable_dir(tmp_path: Path) -> str:
    if os.geteuid() == 0:
        return "/proc/lmgateway/sessions.sqlite3"  # root writes anywhere else
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return str(locked / "sub" / "sessions.sqlite3")


def _through_a_file(tmp_path: Path) -> str:
    (tmp_path / "a-file").write_text("x")
    return str(tmp_path / "a-file" / "sub" / "sessions.sqlite3")


BAD_VALUES = [
    # option, variable, value (or a function of tmp_path making it), words in the message
    ("bridge-url", "LMARENA_BRIDGE_BASE_URL", "ftp://x", "is not an absolute http(s) URL"),
    ("listen", "GATEWAY_LISTEN", "tcp:port=notanumber", "is not a valid endpoint"),
    ("listen", "GATEWAY_LISTEN", "nonsense:1", "is not a valid endpoint"),
    ("cleanup-days", "GATEWAY_SESSION_CLEANUP_DAYS", "-1", "must be a finite number >= 0"),
    ("storage", "STORAGE_PATH", _unwritable_dir, "cannot create directory"),
    ("storage", "STORAGE_PATH", _through_a_file, "cannot create directory"),
    ("workers", "GATEWAY_WORKERS", "0", "is not a whole number from 1 to 64"),
]


@pytest.mark.parametrize("given_as", ["option", "variable"])
@pytest.mark.parametrize("option, variable, value, problem", BAD_VALUES,
                         ids=[f"{case[0]}-{i}" for i, case in enumerate(BAD_VALUES)])
def test_bad_value_stops_startup_with_one_line(tmp_path, given_as, option, variable, value, problem):
    value = value(tmp_path) if callable(value) else value
    env = daemon_env(tmp_path)
    if given_as == "option":
        result = run_twistd([f"--{option}={value}"], env, tmp_path)
        named = f"--{option}"
    else:
        env[variable] = value
        result = run_twistd([], env, tmp_path)
        named = variable
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"lmgateway: {named}: ")
    assert problem in lines[0]
    assert "Traceback" not in result.stderr


def test_a_port_in_use_stops_startup_with_one_line(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        result = run_twistd([f"--listen=tcp:{port}:interface=127.0.0.1"], daemon_env(tmp_path), tmp_path)
    finally:
        taken.close()
    # twistd has its log on stdout and stderr by then: the line is in the log, once
    assert result.returncode == 1
    output = result.stdout + result.stderr
    message = f"lmgateway: --listen: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert [line for line in output.splitlines() if "cannot listen" in line][0].endswith(message)
    assert output.count("cannot listen") == 1 and "Traceback" not in output


def test_a_corrupt_store_stops_startup_with_one_line(tmp_path):
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"garbage" * 1000)
    result = run_twistd([f"--storage={junk}"], daemon_env(tmp_path), tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmgateway: --storage: ") and "not a usable" in lines[0]


# --- socket activation, the way systemd hands a socket over ---

# Puts the inherited socket on fd 3 and sets LISTEN_PID to the pid twistd will have
# (exec keeps the pid), as systemd does between fork and exec.
AS_SYSTEMD_DOES = """\
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


def unit_directives(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file as {section: {key: [values, in order]}}."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def env_example() -> list[tuple[str, str]]:
    """(variable, value) for every line of the example env file, commented out or not."""
    pairs = []
    for raw in (ROOT / "systemd" / "lmgateway.env.example").read_text().splitlines():
        line = raw.lstrip("#").strip()
        name, sep, value = line.partition("=")
        if sep and name.isupper() and " " not in name:
            pairs.append((name, value))
    return pairs


def socket_activation_endpoint() -> str:
    """The endpoint string the deployment docs tell operators to use with the socket unit."""
    (endpoint,) = [v for k, v in env_example() if k == "GATEWAY_LISTEN" and v.startswith("systemd:")]
    return endpoint


def test_socket_activation_serves_on_the_inherited_socket(tmp_path):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    env = daemon_env(tmp_path, LISTEN_FDS="1", LISTEN_FDNAMES="lmgateway")
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", AS_SYSTEMD_DOES, str(listener.fileno()), bin_path("twistd"),
             "-n", "--pidfile=", "lmgateway", "--listen", socket_activation_endpoint()],
            pass_fds=[listener.fileno()], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    listener.close()  # from here on the daemon holds the only copy of the socket
    try:
        status, _, body = wait_for(lambda: _health(f"http://127.0.0.1:{port}", process, log_path),
                                   15, what="/health through the inherited socket")
        assert status == 200 and body["status"] == "ok"
    finally:
        status = stop_with_sigterm(process)
    assert status == -signal.SIGTERM
    assert "Traceback" not in log_path.read_text()


def test_socket_activation_with_workers_serves_from_every_worker(tmp_path):
    """The parent hands systemd's socket on: each worker answers on it, and all stop."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    env = daemon_env(tmp_path, LISTEN_FDS="1", LISTEN_FDNAMES="lmgateway")
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", AS_SYSTEMD_DOES, str(listener.fileno()), bin_path("twistd"),
             "-n", "--pidfile=", "lmgateway", "--listen", socket_activation_endpoint(),
             "--workers", "2"],
            pass_fds=[listener.fileno()], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    listener.close()
    seen: set[int] = set()

    def both_answered():
        answer = _health(f"http://127.0.0.1:{port}", process, log_path)
        if answer is not None and answer[0] == 200:
            seen.add(answer[2]["worker"]["pid"])
        return len(seen) == 2

    try:
        wait_for(both_answered, 30, interval=0.01, what="both workers on the inherited socket")
        assert process.pid in seen
    finally:
        status = stop_with_sigterm(process, within=15)
    assert status == -signal.SIGTERM
    assert not any(os.path.exists(f"/proc/{pid}") for pid in seen - {process.pid})
    assert "Traceback" not in log_path.read_text()


def test_workers_with_a_tls_endpoint_stop_startup_with_one_line(tmp_path):
    import twisted

    pem = os.path.join(os.path.dirname(twisted.__file__), "test", "server.pem")
    result = run_twistd(["--workers", "2", "--listen", f"ssl:0:privateKey={pem}"],
                        daemon_env(tmp_path), tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("lmgateway: --workers 2: 'ssl:0:") and "cannot be shared" in line


def test_socket_activation_without_the_socket_is_one_line(tmp_path):
    """Started without its .socket unit, the daemon says so instead of a KeyError."""
    result = run_twistd(["--listen", socket_activation_endpoint()], daemon_env(tmp_path), tmp_path)
    assert result.returncode != 0 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("lmgateway: --listen: ") and "systemd" in line and "socket" in line


# --- the systemd units cannot silently drift from the daemon ---


def test_service_unit_runs_twistd_in_the_foreground_with_options_it_knows(tmp_path):
    service = unit_directives(ROOT / "systemd" / "lmgateway.service")["Service"]
    (exec_start,) = service["ExecStart"]
    argv = exec_start.split()
    assert argv[0] == "/opt/lmgateway/bin/twistd"
    assert "--nodaemon" in argv and "--pidfile=" in argv and "lmgateway" in argv
    # twistd refuses an option it (or the plugin) does not know before it prints help.
    result = subprocess.run([bin_path("twistd"), *argv[1:], "--help"], env=daemon_env(tmp_path),
                            cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "--bridge-url" in result.stdout


def test_service_unit_has_its_user_state_environment_and_hardening():
    service = unit_directives(ROOT / "systemd" / "lmgateway.service")["Service"]
    one = {key: values[-1] for key, values in service.items()}
    assert one["DynamicUser"] == "yes"
    assert one["StateDirectory"] == "lmgateway"
    assert one["EnvironmentFile"] == "-/etc/lmgateway/env"
    assert one["Restart"] == "on-failure"
    environment = dict(value.split("=", 1) for value in service["Environment"])
    assert environment["STORAGE_PATH"] == "/var/lib/lmgateway/sessions.sqlite3"
    assert set(environment) - {"PYTHONUNBUFFERED"} <= SETTING_VARIABLES
    for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("PrivateTmp", "yes"), ("ProtectHome", "yes"), ("PrivateDevices", "yes")]:
        assert one[key] == value, key


@pytest.mark.parametrize("unit", ["lmgateway.service", "lmgateway@.service"])
def test_units_allow_ten_thousand_streams_of_two_descriptors(unit):
    service = unit_directives(ROOT / "systemd" / unit)["Service"]
    assert len(service["LimitNOFILE"]) == 1
    assert int(service["LimitNOFILE"][0]) >= 2 * 10_000 + 1000


def test_socket_unit_matches_the_endpoint_the_docs_give():
    socket_unit = unit_directives(ROOT / "systemd" / "lmgateway.socket")["Socket"]
    (name,) = socket_unit["FileDescriptorName"]
    (address,) = socket_unit["ListenStream"]
    assert socket_unit["Service"] == ["lmgateway.service"]
    fields = dict(part.split("=", 1) for part in socket_activation_endpoint().split(":")[1:])
    assert fields["name"] == name
    # An IPv4 address is an AF_INET socket; a bare port or [v6] address is AF_INET6.
    assert fields["domain"] == ("INET6" if address.startswith("[") or address.isdigit() else "INET")


def test_env_example_names_real_settings_with_their_defaults(tmp_path):
    from lmarena_gateway.config import GatewayConfig, build_config

    pairs = env_example()
    assert {name for name, _ in pairs} <= SETTING_VARIABLES
    assert {"GATEWAY_LISTEN", "LMARENA_BRIDGE_BASE_URL", "STORAGE_PATH"} <= {name for name, _ in pairs}
    seen = set()
    for name, value in pairs:
        if name in seen or name == "STORAGE_PATH":
            continue  # the socket-activation variant; the unit's path under /var/lib
        seen.add(name)
        config = build_config({}, {"STORAGE_PATH": str(tmp_path / "s.db"), name: value})
        setting = next(s for s in SETTINGS if s.env == name)
        if setting.default is not None or name == "GATEWAY_LISTEN":
            assert getattr(config, setting.name) == getattr(GatewayConfig(), setting.name), name


def test_units_pass_systemd_analyze_verify(tmp_path):
    from support.processes import require_binary

    analyze = require_binary("systemd-analyze")
    for name in ("lmgateway.service", "lmgateway.socket"):
        text = (ROOT / "systemd" / name).read_text()
        # verify insists that ExecStart's binary exists; /opt/lmgateway does not here.
        (tmp_path / name).write_text(text.replace("/opt/lmgateway/bin/twistd", bin_path("twistd")))
    result = subprocess.run([analyze, "verify", str(tmp_path / "lmgateway.socket"),
                             str(tmp_path / "lmgateway.service")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # Unknown or misspelt directives are only warnings, so read them.
    complaints = [line for line in result.stderr.splitlines() if "lmgateway" in line]
    assert complaints == []
