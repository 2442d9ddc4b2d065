"""Talking to a gateway from a test on the reactor."""

from __future__ import annotations

import json

SESSION = {
    "domain": "lmarena.ai",
    "session_name": "team-alpha",
    "session_id": "12345678-1234-1234-1234-123456789abc",
    "message_id": "87654321-4321-4321-4321-cba987654321",
}


async def call(method: str, url: str, body=None, headers=None):
    """treq on the reactor: (status, headers, parsed JSON or bytes)."""
    import treq

    kwargs = {"headers": headers or {}}
    if body is not None:
        kwargs["data"] = body if isinstance(body, bytes) else json.dumps(body).encode()
        kwargs["headers"] = {"Content-Type": "application/json", **kwargs["headers"]}
    response = await treq.request(method, url, **kwargs)
    raw = await treq.content(response)
    try:
        return response.code, response.headers, json.loads(raw)
    except ValueError:
        return response.code, response.headers, raw


async def sessions_on_two_bridges(gateway_factory, listen, reactor, name: str, text: str,
                                  models: dict[str, str] | None = None, **config):
    """A gateway whose ``default`` session is on its default bridge (``gw.bridge``) and
    session ``name`` on a second FakeBridge answering ``text``; returns (gw, that bridge).

    A client that names its session gets ``text``, one that does not gets the default
    bridge's answer, so the words a client shows tell which session served it.
    """
    from lmarena_gateway.fakebridge import FakeBridge

    gw = await gateway_factory(**config)
    bridge = FakeBridge(reactor, chunks=4, delay=0.001, text=text)
    bridge_url = await listen(bridge.app.resource())
    for session_name, url in (("default", None), (name, bridge_url)):
        body = dict(SESSION, session_name=session_name, models=dict(models or {}))
        if url is not None:
            body["bridge_base_url"] = url
        status, _, answer = await call("POST", gw.url + "/session/register", body)
        assert status == 200, answer
    return gw, bridge


def record_requests(gw) -> list[dict]:
    """What reaches the gateway's socket, as the client sent it (before the forgiving path
    collapses ``//``): a list that fills as each request finishes."""
    site = gw.service.getServiceNamed("listen-0").port.factory
    seen: list[dict] = []
    log = site.log

    def recording(request):
        seen.append({"method": request.method.decode(), "uri": request.uri.decode(),
                     "session": (request.getHeader(b"x-session-name") or b"").decode(),
                     "status": request.code})
        log(request)

    site.log = recording
    return seen
