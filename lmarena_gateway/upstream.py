"""The seam the /v1 routes call: a session is served by its tabs or by a bridge.

Both implementations take the same resolved :class:`Route` and the parsed body, and
answer through the shared relay and error envelopes.
"""

from __future__ import annotations

from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from .sessions import SessionRecord


class IUpstream(Interface):
    """Where a /v1 request is answered."""

    kind = Attribute("'bridge' or 'tab': for logs, metrics and tests")

    def chat(request, route: "Route", body: dict, raw: Any) -> Deferred:
        """Answer a chat completion (stream or not); fires when the response is written.

        ``raw`` is the client's body as the bridge gets it (bytes, or a bodies.FileBody
        still in its file), or None for a body built by the gateway."""
        raise NotImplementedError

    def images(request, route: "Route", body: dict, raw: Any) -> Deferred:
        """Answer an image generation."""
        raise NotImplementedError

    def models(request, route: "Route"):
        """The model list for the route's session: bytes, or a Deferred firing with them."""


@frozen
class Route:
    """A resolved /v1 request: the session asked for, its record, and its tabs if any."""

    domain: str
    session_name: str
    record: SessionRecord | None
    tabs: Any = None  # tabs.SessionTabs serving it, or None: the bridge path
    upstream: Any = None  # the IUpstream chosen
