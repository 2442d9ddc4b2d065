"""``twistd lmgateway``: options in, one configuration value out, services built from it."""

from __future__ import annotations

import os
import sys

from attrs import evolve
from twisted.python import usage

from .config import SETTINGS, ConfigError, GatewayConfig, build_config, prepare_daemon
from .workers import WorkerRole


def _help(setting) -> str:
    default = setting.default
    shown = f" [default: {', '.join(default) if isinstance(default, tuple) else default}]" \
        if default not in (None, False, ()) and "[default:" not in setting.help else ""
    return f"{setting.help}{shown if setting.name != 'listen' else ''} (env {setting.env})"


class GatewayOptions(usage.Options):
    """Raises UsageError for a bad value (what tests and embedders want)."""

    synopsis = "[options]"
    longdesc = ("An OpenAI-compatible gateway with named sessions in front of LMArenaBridge. "
                "Every option has an environment variable; the option wins.")
    optParameters = [
        [s.option, None, None, _help(s)] for s in SETTINGS
        if s.option and not s.flag and s.option != "listen"
    ]
    optFlags = [[s.option, None, _help(s)] for s in SETTINGS if s.flag]

    def __init__(self, environ=None) -> None:
        super().__init__()
        self.environ = os.environ if environ is None else environ
        self["listen"] = []
        self.config: GatewayConfig | None = None
        self.worker: WorkerRole | None = None  # set when a parent started this process

    def opt_listen(self, description: str) -> None:
        self["listen"].append(description)

    opt_listen.__doc__ = _help(next(s for s in SETTINGS if s.option == "listen"))

    def postOptions(self) -> None:
        from .workers import read_config, role_from_environment

        self.worker = role_from_environment(self.environ)
        if self.worker is not None:
            # Started by a parent with --workers: its configuration, not ours, and its
            # sockets (the parent checked both).
            self.config, reuse = read_config()
            self.worker = evolve(self.worker, reuse=reuse)
            return
        values = {key: value for key, value in self.items()}
        values["listen"] = tuple(self["listen"])
        try:
            self.config = build_config(values, self.environ)
            prepare_daemon(self.config)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


HELP_HINT = "run 'twistd lmgateway --help' for the options"


class Options(GatewayOptions):
    """What twistd uses: a bad value is one line on stderr and exit 1, not the whole help."""

    def parseOptions(self, options=None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            # twistd would print its 67 lines of usage first: the error, then the hint.
            sys.exit(f"lmgateway: {e}\n{HELP_HINT}")

    def postOptions(self) -> None:
        try:
            super().postOptions()
        except usage.UsageError as e:
            sys.exit(f"lmgateway: {e}")
        assert self.config is not None  # the base class's postOptions built it
        if self.worker is not None:
            return  # the parent listens; this process inherits its sockets
        busy = busy_port(self.config.listen)
        if busy:
            sys.exit(f"lmgateway: --listen: {busy}")


def busy_port(endpoints) -> str | None:
    """Whether a TCP endpoint's port is taken, found before twistd daemonizes.

    A daemonizing twistd waits for its child's word on a pipe it also holds open itself,
    so a child that cannot listen leaves the terminal hanging; asking first gives the
    one-line error in both modes. The real listen stays the authority.
    """
    import socket

    from twisted.internet.endpoints import serverFromString

    for description in endpoints:
        endpoint = serverFromString(None, description)
        port = getattr(endpoint, "_port", None)
        interface = getattr(endpoint, "_interface", None)
        if type(endpoint).__name__ not in ("TCP4ServerEndpoint", "TCP6ServerEndpoint") \
                or not port:
            continue
        family = socket.AF_INET6 if ":" in (interface or "") else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted does
            try:
                probe.bind((interface or "", port))
            except OSError as e:
                return f"cannot listen on {interface or '*'}:{port}: {e.strerror}"
    return None


def makeService(options: GatewayOptions, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    from twisted.logger import Logger

    from .config import unknown_variables
    from .service import make_service, raise_open_files_limit

    before, after = raise_open_files_limit()
    if after != before:
        Logger().info("open-files limit raised from {before} to {after} (two per stream)",
                      before=before, after=after)
    for name in unknown_variables(options.environ):
        Logger().warn("unknown variable {name} ignored: no setting reads it (a typo?)",
                      name=name)
    assert options.config is not None, "postOptions builds the config"
    return make_service(options.config, reactor, worker=getattr(options, "worker", None),
                        environ=options.environ)
