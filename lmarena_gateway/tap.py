"""``twistd lmgateway``: options in, one configuration value out, services built from it."""

from __future__ import annotations

import os
import sys

from twisted.python import usage

from .config import SETTINGS, ConfigError, GatewayConfig, build_config, prepare_daemon


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

    def opt_listen(self, description: str) -> None:
        self["listen"].append(description)

    opt_listen.__doc__ = _help(next(s for s in SETTINGS if s.option == "listen"))

    def postOptions(self) -> None:
        values = {key: value for key, value in self.items()}
        values["listen"] = tuple(self["listen"])
        try:
            self.config = build_config(values, self.environ)
            prepare_daemon(self.config)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


class Options(GatewayOptions):
    """What twistd uses: a bad value is one line on stderr and exit 1, not the whole help."""

    def postOptions(self) -> None:
        try:
            super().postOptions()
        except usage.UsageError as e:
            sys.exit(f"lmgateway: {e}")


def makeService(options: GatewayOptions, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    from .service import make_service, raise_open_files_limit

    before, after = raise_open_files_limit()
    if after != before:
        from twisted.logger import Logger

        Logger().info("open-files limit raised from {before} to {after} (two per stream)",
                      before=before, after=after)
    return make_service(options.config, reactor)
