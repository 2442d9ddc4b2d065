"""One frozen configuration value, built once from options, environment and defaults.

Nothing else in the gateway reads the process environment: the daemon and the CLI both call
:func:`build_config` and pass the result down.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from attrs import field, frozen

from .setting_values import (
    parse_admin_token,
    parse_allow,
    parse_bool,
    parse_count,
    parse_domains,
    parse_http_url,
    parse_key,
    parse_listen,
    parse_nonneg,
    parse_nonneg_count,
    parse_origins,
    parse_pairs,
    parse_positive,
    parse_probe_interval,
    parse_public_url,
    parse_queue,
    parse_readable_file,
    parse_redis_prefix,
    parse_secret_file,
    parse_size,
    parse_storage,
    parse_workers,
    read_admin_token_file,
)
from .store import REDIS, SQLITE, backend_of

DEFAULT_DOMAINS = (
    "lmarena.ai",
    "canary.lmarena.ai",
    "alpha.lmarena.ai",
    "beta.lmarena.ai",
    "arena.ai",
)
DEFAULT_STORAGE = os.path.join("storage", "sessions.sqlite3")


class ConfigError(ValueError):
    """A bad setting; the message names the option and the problem on one line."""


# The one place a storage setting's kind is decided: these schemes are a Redis server,
# anything else a file path (the SQLite-backed DBM store).


@frozen
class GatewayConfig:
    listen: tuple[str, ...] = ("tcp:8080:interface=127.0.0.1",)
    bridge_url: str = "http://127.0.0.1:5102"
    bridge_api_key: str | None = field(default=None, repr=False)
    storage: str = DEFAULT_STORAGE
    redis_prefix: str = "lmgw:"
    cleanup_days: float = 30.0
    cleanup_interval: float = 3600.0
    probe_interval: float = 60.0  # seconds between /status's probes of one bridge; 0: off
    domains: tuple[str, ...] = DEFAULT_DOMAINS
    cors_origins: tuple[str, ...] = ("*",)
    debug: bool = False
    log_requests: bool = False
    max_body: int = 20 * 1024 * 1024
    body_workers: int = 2  # processes parsing bodies over 256 KiB; 0: the reactor parses all
    body_parse_timeout: float = 30.0  # a worker slower than this over one body is killed
    connect_timeout: float = 10.0
    stream_idle_timeout: float = 360.0
    keepalive: float = 15.0
    public_url: str | None = None
    trust_proxy_headers: bool = False
    admin_token: str | None = field(default=None, repr=False)
    admin_token_file: str | None = None  # where admin_token was read from: SIGHUP re-reads it
    api_keys_file: str | None = None
    api_keys: str | None = field(default=None, repr=False)  # GATEWAY_API_KEYS, inline
    bridge_allow: tuple[str, ...] = ()  # empty: the default bridge's host and loopback
    max_sessions_per_domain: int = 1000
    header_timeout: float = 10.0
    max_connections: int = 0  # 0: from the open-files limit, two descriptors a connection
    secret_file: str | None = None  # None: registration.secret beside the store
    tab_queue: int = 4  # requests that may wait for a busy session's tabs
    tab_poll_timeout: float = 25.0
    workers: int = 1  # processes serving the listening sockets (docs/performance.rst)
    # (requested domain, tab domain): a request for the first may be served by a tab on
    # the second (lmarena.ai redirects to arena.ai, so PHP-era clients ask for lmarena.ai)
    tab_pairs: tuple[tuple[str, str], ...] = (("lmarena.ai", "arena.ai"),)
    # Where each value came from (an option or a variable), for errors found later.
    sources: dict = field(factory=dict, eq=False, repr=False)

    @property
    def bridge_allow_list(self) -> tuple[str, ...]:
        if self.bridge_allow:
            return self.bridge_allow
        return ((urlsplit(self.bridge_url).hostname or "").lower(), "loopback")

    def tab_pairs_for(self, domain: str) -> tuple[str, ...]:
        """The other domains whose tabs may serve a request for ``domain``."""
        return tuple(b for a, b in self.tab_pairs if a == domain and b in self.domains)

    @property
    def registration_secret_file(self) -> str:
        if self.secret_file:
            return self.secret_file
        directory = "storage" if backend_of(self.storage) == REDIS else os.path.dirname(self.storage)
        return os.path.join(directory, "registration.secret")


# --- value parsers: each returns the parsed value or raises ValueError("problem") ---


def _writable_directory_for(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create directory {directory!r}: {e.strerror}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"directory {directory!r} is not writable")


def prepare_daemon(config: "GatewayConfig") -> None:
    """What the daemon reads and writes must work before it starts: one-line errors.

    Only the daemon calls this; the CLI must not create directories while only reading.
    """
    from .security import load_client_keys

    try:
        load_client_keys(config.api_keys_file, config.api_keys)
    except (OSError, ValueError) as e:
        where = config.sources.get("api_keys_file") or config.sources.get("api_keys", "GATEWAY_API_KEYS")
        raise ConfigError(f"{where}: {e}") from None
    source = config.sources.get
    checks = []
    storage = source("storage", "--storage")
    if backend_of(config.storage) == SQLITE:
        # With Redis the secret lives in Redis: no file, no directory to demand.
        checks = [(storage, config.storage),
                  (source("secret_file", "--secret-file"), config.registration_secret_file)]
    for option, path in checks:
        try:
            _writable_directory_for(path)
        except ValueError as e:
            raise ConfigError(f"{option}: {e}") from None
    if backend_of(config.storage) == SQLITE:
        from .store import sqlitedbm

        if os.path.exists(config.storage) and not os.access(config.storage, os.R_OK | os.W_OK):
            raise ConfigError(f"{storage}: {config.storage!r} is not readable and writable")
        what_to_do = ("restore a backup (lmgateway export --storage BACKUP > sessions.json, "
                      "then lmgateway import sessions.json), or move it aside to start with "
                      "no sessions")
        try:
            with sqlitedbm.open(config.storage, "c") as db:
                problems = db.problems()
        except (OSError, sqlitedbm.error) as e:
            raise ConfigError(f"{storage}: {e}; {what_to_do}") from None
        if problems:
            raise ConfigError(f"{storage}: {config.storage!r} is corrupt ({problems[0]}); "
                              f"{what_to_do}")


@frozen
class Setting:
    """One configurable value: its option, its environment variable, how to parse it."""

    name: str  # the attribute on GatewayConfig
    option: str | None  # None: environment only (secrets do not belong on command lines)
    env: str
    parse: Callable[[str], object]
    help: str
    flag: bool = False

    @property
    def default(self):
        return getattr(GatewayConfig(), self.name) if self.name != "listen" else None


SETTINGS = (
    Setting("listen", "listen", "GATEWAY_LISTEN", parse_listen,
            "Twisted endpoint to listen on; repeatable [default: tcp:8080:interface=127.0.0.1]"),
    Setting("bridge_url", "bridge-url", "LMARENA_BRIDGE_BASE_URL", parse_http_url,
            "Default LMArenaBridge URL"),
    Setting("bridge_api_key", "bridge-api-key", "LMARENA_BRIDGE_API_KEY", parse_key,
            "API key for the default bridge"),
    Setting("storage", "storage", "STORAGE_PATH", parse_storage, "Session store file"),
    Setting("redis_prefix", "redis-prefix", "GATEWAY_REDIS_PREFIX", parse_redis_prefix,
            "Prefix of the Redis keys when --storage is a redis:// URL"),
    Setting("cleanup_days", "cleanup-days", "GATEWAY_SESSION_CLEANUP_DAYS", parse_nonneg,
            "Prune sessions idle this many days (0: never)"),
    Setting("cleanup_interval", "cleanup-interval", "GATEWAY_CLEANUP_INTERVAL", parse_positive,
            "Seconds between pruning passes"),
    Setting("probe_interval", "bridge-probe-interval", "GATEWAY_BRIDGE_PROBE_INTERVAL",
            parse_probe_interval,
            "Seconds between the status page's probes of each bridge, at least 60 (0: off)"),
    Setting("domains", "domains", "GATEWAY_ALLOWED_DOMAINS", parse_domains,
            "Comma-separated LMArena domains sessions may belong to"),
    Setting("cors_origins", "cors-origins", "GATEWAY_CORS_ORIGINS", parse_origins,
            "Comma-separated origins allowed by CORS, or *"),
    Setting("max_body", "max-body", "GATEWAY_MAX_BODY", parse_size,
            "Largest /v1 request body in bytes (KiB/MiB suffixes allowed)"),
    Setting("body_workers", "body-workers", "GATEWAY_BODY_WORKERS", parse_nonneg_count,
            "Processes that parse JSON bodies over 256 KiB, off the reactor (0: the reactor "
            "parses every body)"),
    Setting("body_parse_timeout", "body-parse-timeout", "GATEWAY_BODY_PARSE_TIMEOUT",
            parse_positive, "Seconds a body parser process may take over one body; then it "
            "is killed and the body gets 503 BODY_PARSER_UNAVAILABLE"),
    Setting("connect_timeout", "connect-timeout", "GATEWAY_CONNECT_TIMEOUT", parse_positive,
            "Seconds to wait for a TCP connection to a bridge"),
    Setting("stream_idle_timeout", "stream-idle-timeout", "GATEWAY_STREAM_IDLE_TIMEOUT",
            parse_positive, "Seconds a bridge may stay silent before the gateway gives up"),
    Setting("keepalive", "keepalive", "GATEWAY_KEEPALIVE", parse_nonneg,
            "Seconds between SSE keep-alive comments while the bridge is silent (0: off)"),
    Setting("public_url", "public-url", "GATEWAY_PUBLIC_URL", parse_public_url,
            "URL browsers reach this gateway at (for the userscript)"),
    Setting("admin_token", "admin-token-file", "GATEWAY_ADMIN_TOKEN_FILE", read_admin_token_file,
            "File holding the admin token, re-read on SIGHUP (or set GATEWAY_ADMIN_TOKEN)"),
    Setting("admin_token", None, "GATEWAY_ADMIN_TOKEN", parse_admin_token, "The admin token"),
    Setting("api_keys_file", "api-keys-file", "GATEWAY_API_KEYS_FILE", parse_readable_file,
            "Client API keys for /v1, one a line, optionally followed by session names; "
            "re-read on SIGHUP (or set GATEWAY_API_KEYS)"),
    Setting("api_keys", None, "GATEWAY_API_KEYS", str, "Client API keys, inline"),
    Setting("bridge_allow", "bridge-allow", "GATEWAY_BRIDGE_ALLOW", parse_allow,
            "Hosts a session's bridge_base_url may name: hosts, *.suffix, CIDRs, 'loopback' "
            "[default: the default bridge's host and loopback]"),
    Setting("max_sessions_per_domain", "max-sessions-per-domain",
            "GATEWAY_MAX_SESSIONS_PER_DOMAIN", parse_count, "Most sessions one domain may hold"),
    Setting("header_timeout", "header-timeout", "GATEWAY_HEADER_TIMEOUT", parse_positive,
            "Seconds a request's headers may take after its first byte (then 408)"),
    Setting("max_connections", "max-connections", "GATEWAY_MAX_CONNECTIONS", parse_nonneg_count,
            "Most client connections open at once; past it the oldest idle or slow one is "
            "closed, or with none, the new one gets 503 (0: half the open-files limit)"),
    Setting("secret_file", "secret-file", "GATEWAY_SECRET_FILE", parse_secret_file,
            "Registration token secret, created on first start "
            "[default: registration.secret beside the store]"),
    Setting("tab_queue", "tab-queue", "GATEWAY_TAB_QUEUE", parse_queue,
            "Requests that may wait while every tab of a session is busy; more get 429"),
    Setting("tab_poll_timeout", "tab-poll-timeout", "GATEWAY_TAB_POLL_TIMEOUT", parse_positive,
            "Seconds a tab's long poll waits for a job; 3x this without a poll and the tab is gone"),
    Setting("tab_pairs", "tab-pairs", "GATEWAY_TAB_PAIRS", parse_pairs,
            "REQUESTED=TAB domain pairs: requests for REQUESTED may be served by the same "
            "session's tab on TAB ('' for none) [default: lmarena.ai=arena.ai]"),
    Setting("workers", "workers", "GATEWAY_WORKERS", parse_workers,
            "Processes sharing the listening sockets, one core each; more than 1 turns tab "
            "mode off (tcp, unix and systemd endpoints only)"),
    Setting("debug", "debug", "DEBUG_MODE", parse_bool, "Log upstream detail", flag=True),
    Setting("log_requests", "log-requests", "LOG_REQUESTS", parse_bool,
            "Log one line per request", flag=True),
    Setting("trust_proxy_headers", "trust-proxy-headers", "GATEWAY_TRUST_PROXY_HEADERS",
            parse_bool, "Honour X-Forwarded-Proto/-Host from a reverse proxy", flag=True),
)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """GATEWAY_* variables no setting reads: a typo here silently changes nothing."""
    known = {setting.env for setting in SETTINGS}
    return sorted(name for name in environ if name.startswith("GATEWAY_") and name not in known)


def build_config(options: Mapping[str, object], environ: Mapping[str, str],
                 names: frozenset[str] | None = None) -> GatewayConfig:
    """Option beats variable beats default; the first bad value raises ConfigError.

    ``options`` maps option names to the raw value given on the command line (None or
    absent when not given; True for a flag that was given). ``names``, when given, limits
    the settings read to those (the CLI needs a few, and must not trip on the rest).
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in SETTINGS:
        if names is not None and setting.name not in names:
            continue
        if setting.name in values:
            continue  # an earlier source of the same value won (e.g. a token file option)
        given: Any = options.get(setting.option) if setting.option else None
        if setting.flag and given:
            values[setting.name] = True
            continue
        if given is not None and given != () and not setting.flag:
            raw, source = given, f"--{setting.option}"
        elif setting.env in environ:
            raw, source = environ[setting.env], setting.env
        else:
            continue
        try:
            values[setting.name] = setting.parse(raw)
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
        sources[setting.name] = source
        if setting.parse is read_admin_token_file:
            values["admin_token_file"] = raw
    config = GatewayConfig(**values, sources=sources)
    _check_workers(config)
    return config


def _check_workers(config: GatewayConfig) -> None:
    """Workers share the listening sockets; a TLS endpoint's socket is only half of it."""
    from .workers import unshareable

    if config.workers == 1:
        return
    for description in config.listen:
        if unshareable(description):
            where = config.sources.get("workers", "--workers")
            raise ConfigError(f"{where} {config.workers}: {description!r} cannot be shared "
                              "by worker processes (tcp, tcp6, unix and systemd endpoints "
                              "can; put TLS in a reverse proxy)")
