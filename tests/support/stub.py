"""A whole gateway in memory: StubTreq in front of the edge layer and behind the proxy.

The client side is a ``StubTreq`` over the site's resource (``FrontDoor`` and the Klein
routes); the gateway's bridge client is another ``StubTreq``, over whatever resource
plays the bridge. Time is a ``Clock``. ``settle()`` pumps both until nothing moves.
"""

from __future__ import annotations

import json
from typing import Any

from attrs import evolve
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from lmarena_gateway.config import GatewayConfig
from lmarena_gateway.fakebridge import FakeBridge
from lmarena_gateway.gateway import Gateway
from lmarena_gateway.sessions import validate_registration
from lmarena_gateway.site import make_site

from support.memory import MemoryStore

GATEWAY = "http://127.0.0.1:8080"
BRIDGE = "http://bridge.test:5102"
START = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def result_of(d: Deferred) -> Any:
    """What ``d`` fired with; fails the test if it has not fired (or failed)."""
    results: list = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class Collector(Protocol):
    """A client-side body reader: what arrived so far, and how it ended."""

    def __init__(self) -> None:
        self.received = b""
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.reason = reason


class Answer:
    def __init__(self, response, body: bytes) -> None:
        self.response = response
        self.status = response.code
        self.body = body

    def header(self, name: str) -> str | None:
        values = self.response.headers.getRawHeaders(name)
        return None if values is None else values[0]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str:
        return self.json()["error"]["code"]


class StubGateway:
    """``Gateway`` + ``make_site`` over a MemoryStore, a Clock and a stubbed bridge."""

    def __init__(self, bridge: Resource | None = None, *, clock: Clock | None = None,
                 store: Any = None, **config: Any) -> None:
        self.clock = clock if clock is not None else Clock()
        if clock is None:
            self.clock.advance(START)
        self.fake = FakeBridge(self.clock, chunks=3, delay=1.0)
        self.bridge = StubTreq(bridge if bridge is not None else self.fake.app.resource())
        self.store = store if store is not None else MemoryStore()
        self.config = evolve(GatewayConfig(), listen=(), bridge_url=BRIDGE, max_connections=16,
                             **config)
        self.gateway = Gateway(self.config, self.store, self.bridge, self.clock)
        self.client = StubTreq(make_site(self.gateway).resource)

    def register(self, **fields: Any) -> None:
        from support.client import SESSION

        registration = validate_registration(dict(SESSION, **fields), self.config.domains)
        result_of(self.store.register(registration, self.clock.seconds()))

    def settle(self) -> None:
        for _ in range(5):  # a request crosses both stubs and back: a few rounds suffice
            self.client.flush()
            self.bridge.flush()
        self.client.flush()

    def send(self, method: str, path: str, body: Any = None, headers: dict | None = None,
             **kwargs: Any) -> Deferred:
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        d = self.client.request(method, GATEWAY + path, data=data, headers=headers or {},
                                **kwargs)
        self.settle()
        return d

    def call(self, method: str, path: str, body: Any = None,
             headers: dict | None = None) -> Answer:
        """The whole answer, delivered in memory."""
        response = result_of(self.send(method, path, body, headers))
        content = self.client.content(response)
        self.settle()
        return Answer(response, result_of(content))

    def open(self, method: str, path: str, body: Any = None,
             headers: dict | None = None) -> tuple[Any, Collector]:
        """The response's headers and a collector its body streams into."""
        response = result_of(self.send(method, path, body, headers, unbuffered=True))
        collector = Collector()
        response.deliverBody(collector)
        self.settle()
        return response, collector
