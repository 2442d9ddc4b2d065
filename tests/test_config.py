"""Options beat variables beat defaults; each bad value is refused naming its option."""

import os

import pytest
from twisted.python import usage

from lmarena_gateway.config import DEFAULT_DOMAINS, ConfigError, GatewayConfig, build_config, prepare_daemon
from lmarena_gateway.tap import GatewayOptions


def parse(argv, environ=None, tmp_path=None):
    environ = dict(environ or {})
    if tmp_path is not None:
        environ.setdefault("STORAGE_PATH", str(tmp_path / "s.sqlite3"))
    options = GatewayOptions(environ=environ)
    options.parseOptions(argv)
    return options.config


def test_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = parse([], {})
    assert config == GatewayConfig()
    assert config.listen == ("tcp:8080:interface=127.0.0.1",)
    assert config.bridge_url == "http://127.0.0.1:5102"
    assert config.bridge_api_key is None
    assert config.storage == os.path.join("storage", "sessions.sqlite3")
    assert (tmp_path / "storage").is_dir()
    assert config.cleanup_days == 30 and config.cleanup_interval == 3600
    assert config.domains == DEFAULT_DOMAINS and "arena.ai" in config.domains
    assert config.cors_origins == ("*",)
    assert not config.debug and not config.log_requests


ALL = [
    # option argv, env name, env value, attribute, expected from option, expected from env
    ("--bridge-url=http://opt:1", "LMARENA_BRIDGE_BASE_URL", "https://env:2/", "bridge_url",
     "http://opt:1", "https://env:2"),
    ("--bridge-api-key=optkey", "LMARENA_BRIDGE_API_KEY", "envkey", "bridge_api_key", "optkey", "envkey"),
    ("--cleanup-days=1.5", "GATEWAY_SESSION_CLEANUP_DAYS", "0", "cleanup_days", 1.5, 0.0),
    ("--cleanup-interval=60", "GATEWAY_CLEANUP_INTERVAL", "7.5", "cleanup_interval", 60.0, 7.5),
    ("--bridge-probe-interval=0", "GATEWAY_BRIDGE_PROBE_INTERVAL", "120", "probe_interval", 0.0, 120.0),
    ("--domains=lmarena.ai,Canary.lmarena.ai", "GATEWAY_ALLOWED_DOMAINS", "beta.lmarena.ai",
     "domains", ("lmarena.ai", "canary.lmarena.ai"), ("beta.lmarena.ai",)),
    ("--cors-origins=https://a.example", "GATEWAY_CORS_ORIGINS", "https://b.example,https://c.example",
     "cors_origins", ("https://a.example",), ("https://b.example", "https://c.example")),
    ("--listen=tcp:9001", "GATEWAY_LISTEN", "tcp:9002 unix:/tmp/x.sock", "listen",
     ("tcp:9001",), ("tcp:9002", "unix:/tmp/x.sock")),
    ("--max-body=1MiB", "GATEWAY_MAX_BODY", "2048", "max_body", 1024 * 1024, 2048),
    ("--keepalive=0", "GATEWAY_KEEPALIVE", "5", "keepalive", 0.0, 5.0),
]


@pytest.mark.parametrize("argv, env, env_value, attr, from_option, from_env", ALL)
def test_option_beats_variable_beats_default(tmp_path, argv, env, env_value, attr, from_option, from_env):
    assert getattr(parse([argv], {env: env_value}, tmp_path), attr) == from_option
    assert getattr(parse([], {env: env_value}, tmp_path), attr) == from_env
    assert getattr(parse([], {}, tmp_path), attr) == getattr(GatewayConfig(), attr)


def test_storage_option_beats_variable(tmp_path):
    config = parse([f"--storage={tmp_path}/opt.db"], {"STORAGE_PATH": f"{tmp_path}/env.db"})
    assert config.storage == f"{tmp_path}/opt.db"
    assert parse([], {"STORAGE_PATH": f"{tmp_path}/env.db"}).storage == f"{tmp_path}/env.db"


def test_listen_is_repeatable(tmp_path):
    config = parse(["--listen", "tcp:1", "--listen", r"tcp:2:interface=\:\:1"], {}, tmp_path)
    assert config.listen == ("tcp:1", r"tcp:2:interface=\:\:1")


@pytest.mark.parametrize("flag, env, attr", [
    ("--debug", "DEBUG_MODE", "debug"),
    ("--log-requests", "LOG_REQUESTS", "log_requests"),
    ("--trust-proxy-headers", "GATEWAY_TRUST_PROXY_HEADERS", "trust_proxy_headers"),
])
def test_flags_and_their_variables(tmp_path, flag, env, attr):
    assert getattr(parse([flag], {env: "false"}, tmp_path), attr) is True
    assert getattr(parse([], {env: "true"}, tmp_path), attr) is True
    assert getattr(parse([], {env: "false"}, tmp_path), attr) is False
    assert getattr(parse([], {}, tmp_path), attr) is False


BAD = [
    (["--bridge-url=ftp://x"], {}, "--bridge-url", "http(s)"),
    ([], {"LMARENA_BRIDGE_BASE_URL": "not a url"}, "LMARENA_BRIDGE_BASE_URL", "http(s)"),
    (["--bridge-url=http://user:pw@host"], {}, "--bridge-url", "user info"),
    (["--listen=bogus:endpoint"], {}, "--listen", "not a valid endpoint"),
    (["--listen=tcp:notaport"], {}, "--listen", "not a valid endpoint"),
    ([], {"GATEWAY_LISTEN": "tcp:x"}, "GATEWAY_LISTEN", "not a valid endpoint"),
    (["--cleanup-days=-1"], {}, "--cleanup-days", ">= 0"),
    ([], {"GATEWAY_SESSION_CLEANUP_DAYS": "soon"}, "GATEWAY_SESSION_CLEANUP_DAYS", "not a number"),
    (["--cleanup-interval=0"], {}, "--cleanup-interval", "greater than 0"),
    (["--bridge-probe-interval=5"], {}, "--bridge-probe-interval", "at least 60"),
    (["--domains=not a domain!"], {}, "--domains", "not a host name"),
    (["--max-body=lots"], {}, "--max-body", "not a size"),
    (["--bridge-api-key=has space"], {}, "--bridge-api-key", "printable"),
    ([], {"DEBUG_MODE": "maybe"}, "DEBUG_MODE", "true or false"),
    (["--cors-origins=not an origin"], {}, "--cors-origins", "not an origin"),
    (["--cors-origins=https://a.example/path"], {}, "--cors-origins", "not an origin"),
    (["--public-url=javascript:alert(1)"], {}, "--public-url", "http(s)"),
    (["--public-url=http://gw.example/\n// @require http://evil"], {}, "--public-url", "plain characters"),
    ([], {"LMARENA_BRIDGE_BASE_URL": "http://h:1/a b"}, "LMARENA_BRIDGE_BASE_URL", "plain characters"),
    (["--bridge-url=http://h/\"x"], {}, "--bridge-url", "plain characters"),
]


@pytest.mark.parametrize("argv, environ, names, problem", BAD)
def test_bad_values_name_the_option_and_the_problem(tmp_path, argv, environ, names, problem):
    with pytest.raises(usage.UsageError) as caught:
        parse(argv, environ, tmp_path)
    message = str(caught.value)
    assert message.startswith(names + ":")
    assert problem in message
    assert "\n" not in message


def test_storage_directory_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"^--storage: cannot create directory"):
        prepare_daemon(build_config({"storage": str(blocker / "sub" / "s.db")}, {}))


def test_storage_directory_that_cannot_be_written(tmp_path):
    if os.geteuid() == 0:
        # root writes anywhere; a read-only bind is not available, so use /proc instead
        with pytest.raises(ConfigError, match=r"^STORAGE_PATH: "):
            prepare_daemon(build_config({}, {"STORAGE_PATH": "/proc/lmgateway/sessions.db"}))
        return
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match=r"^STORAGE_PATH: directory .* is not writable"):
        prepare_daemon(build_config({}, {"STORAGE_PATH": str(locked / "s.db")}))


def test_storage_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        build_config({"storage": str(tmp_path)}, {})


def test_config_is_frozen(tmp_path):
    config = parse([], {}, tmp_path)
    with pytest.raises(AttributeError):
        config.bridge_url = "http://elsewhere"


def test_secrets_are_kept_out_of_repr(tmp_path):
    config = parse(["--bridge-api-key=s3cr3t-key"], {}, tmp_path)
    assert "s3cr3t-key" not in repr(config)


def test_no_module_but_the_entry_points_reads_the_environment():
    import pathlib

    import lmarena_gateway

    package = pathlib.Path(lmarena_gateway.__file__).parent
    readers = sorted(p.name for p in package.glob("*.py") if "os.environ" in p.read_text())
    assert readers == ["cli.py", "tap.py"]


def test_a_store_that_is_not_a_database_stops_startup(tmp_path):
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"garbage" * 100)
    with pytest.raises(usage.UsageError, match=r"^--storage: .*not a usable session database"):
        parse([f"--storage={junk}"])


def test_reading_the_configuration_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build_config({}, {"STORAGE_PATH": str(tmp_path / "a" / "b" / "s.db")})
    assert list(tmp_path.iterdir()) == []


def test_only_the_named_settings_are_read(tmp_path):
    environ = {"GATEWAY_LISTEN": "systemd:domain=INET:name=nothere", "STORAGE_PATH": "x.db"}
    config = build_config({}, environ, names=frozenset({"storage"}))
    assert config.storage == "x.db" and config.listen == GatewayConfig().listen


@pytest.mark.parametrize("keys, problem", [("short", "not a key"),
                                           ("sk-long-enough bad!name", "not session name")])
def test_bad_client_keys_stop_startup(tmp_path, keys, problem):
    path = tmp_path / "keys"
    path.write_text("# a comment\n" + keys + "\n")
    with pytest.raises(usage.UsageError, match=rf"^--api-keys-file: entry 2: {problem}"):
        parse([f"--api-keys-file={path}"], {}, tmp_path)
    with pytest.raises(usage.UsageError, match=rf"^GATEWAY_API_KEYS: entry 1: {problem}"):
        parse([], {"GATEWAY_API_KEYS": keys}, tmp_path)
