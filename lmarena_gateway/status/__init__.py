"""The operator's page: ``GET /status`` (HTML), ``/status.json``, and its actions.

``gather`` collects the state, ``page`` renders it, ``actions`` holds the POST forms,
``activity`` counts what requests do and ``probe`` asks each bridge whether it answers.
The routes live in the gateway, behind its admin check; this is what they call.
"""

from __future__ import annotations

import json

from ..errors import ApiError
from .actions import CsrfTokens, StatusActions
from .activity import Activity
from .gather import ITabSource, RegistryTabs, SessionTabsView, StatusReport, TabView
from .page import SECURITY_HEADERS, asset, render_page

__all__ = ["ITabSource", "RegistryTabs", "SessionTabsView", "StatusPages", "TabView"]
ASSET_TYPES = {"page.css": b"text/css; charset=utf-8",
               "page.js": b"text/javascript; charset=utf-8"}


class StatusPages:
    """What the /status routes do, over one report and one set of actions."""

    def __init__(self, report: StatusReport, actions: StatusActions) -> None:
        self.report = report
        self.actions = actions
        self.activity = report.activity

    @classmethod
    def build(cls, config, store, clock, *, tokens=None, prober=None, pruner=None,
              tabs=None) -> StatusPages:
        activity = Activity(clock, lambda domain, name: store.get(domain, name) is not None)
        report = StatusReport(config, store, clock, activity=activity, prober=prober,
                              pruner=pruner, tabs=tabs)
        actions = StatusActions(config, store, CsrfTokens(clock, tokens), tokens=tokens,
                                activity=activity)
        return cls(report, actions)

    def page(self, request):
        return render_page(request, self.report.gather(), self.actions.csrf.issue())

    def json(self, request) -> bytes:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(self.report.gather()).encode()

    def asset(self, request, name: str) -> bytes:
        request.setHeader(b"Content-Type", ASSET_TYPES[name])
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Cache-Control", b"no-cache")
        return asset(name)

    def act(self, request, action: str):
        handler = {"revoke": self.actions.revoke, "delete": self.actions.delete,
                   "install-link": self.actions.install_link}.get(action)
        if handler is None:
            raise ApiError(404, "NOT_FOUND", f"no status action {action!r}")
        return handler(request)
