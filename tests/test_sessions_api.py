"""POST /session/register, GET /session/list, DELETE /session/...: the PHP gateway's API."""

import json

import pytest
import pytest_twisted

from support.client import SESSION, call

SID = SESSION["session_id"]
MID = SESSION["message_id"]


async def register(gw, body):
    return await call("POST", gw.url + "/session/register", body)


async def listing(gw, query=""):
    return await call("GET", gw.url + "/session/list" + query)


@pytest_twisted.ensureDeferred
async def test_register_then_list(gateway_factory):
    gw = await gateway_factory()
    status, _, body = await register(gw, dict(SESSION, session_id=SID.upper(), models={"gpt-4": "claude-x"},
                                              bridge_base_url="http://127.0.0.1:5999/",
                                              bridge_api_key="k-123"))
    assert (status, body) == (200, {"status": "ok", "domain": "lmarena.ai", "session_name": "team-alpha"})
    status, _, body = await listing(gw)
    record = body["domains"]["lmarena.ai"]["team-alpha"]
    assert record["session_id"] == SID  # stored lowercase
    assert record["message_id"] == MID
    assert record["bridge_base_url"] == "http://127.0.0.1:5999"
    assert record["models"] == {"gpt-4": "claude-x"}
    assert record["has_bridge_api_key"] is True
    assert "bridge_api_key" not in record and "k-123" not in json.dumps(body)
    assert record["created_at"].endswith("Z") and record["last_used_at"] is None


@pytest_twisted.ensureDeferred
async def test_register_is_an_upsert_keeping_created_at(gateway_factory, reactor):
    gw = await gateway_factory()
    await register(gw, SESSION)
    first = gw.store.get("lmarena.ai", "team-alpha")
    new_mid = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    status, _, _ = await register(gw, dict(SESSION, message_id=new_mid))
    assert status == 200
    second = gw.store.get("lmarena.ai", "team-alpha")
    assert second.message_id == new_mid
    assert second.created_at == first.created_at
    assert second.updated_at >= first.updated_at
    _, _, body = await listing(gw)
    assert list(body["domains"]["lmarena.ai"]) == ["team-alpha"]


@pytest_twisted.ensureDeferred
async def test_same_name_in_two_domains_are_two_sessions(gateway_factory):
    gw = await gateway_factory()
    await register(gw, SESSION)
    other = dict(SESSION, domain="canary.lmarena.ai", message_id="11111111-2222-3333-4444-555555555555")
    await register(gw, other)
    assert gw.store.get("lmarena.ai", "team-alpha").message_id == MID
    assert gw.store.get("canary.lmarena.ai", "team-alpha").message_id == other["message_id"]


REFUSALS = [
    ({k: v for k, v in SESSION.items() if k != "session_id"}, 400, "MISSING_FIELDS", "session_id"),
    (dict(SESSION, domain=""), 400, "MISSING_FIELDS", "domain"),
    (dict(SESSION, message_id=None), 400, "MISSING_FIELDS", "message_id"),
    (dict(SESSION, domain="evil.example"), 400, "INVALID_DOMAIN", "lmarena.ai"),
    (dict(SESSION, domain=["lmarena.ai"]), 400, "INVALID_DOMAIN", ""),
    (dict(SESSION, session_name="has space"), 400, "INVALID_SESSION_NAME", ""),
    (dict(SESSION, session_name="x" * 65), 400, "INVALID_SESSION_NAME", ""),
    (dict(SESSION, session_name=42), 400, "INVALID_SESSION_NAME", ""),
    (dict(SESSION, session_name="a/b"), 400, "INVALID_SESSION_NAME", ""),
    (dict(SESSION, session_id="not-a-uuid"), 400, "INVALID_UUID", "session_id"),
    (dict(SESSION, message_id=12345), 400, "INVALID_UUID", "message_id"),
    (dict(SESSION, bridge_base_url="file:///etc/passwd"), 400, "INVALID_URL", ""),
    (dict(SESSION, bridge_base_url="gopher://h:70"), 400, "INVALID_URL", ""),
    (dict(SESSION, bridge_base_url="http://u:p@h:1"), 400, "INVALID_URL", ""),
    (dict(SESSION, bridge_base_url="http://h:1/?q=1"), 400, "INVALID_URL", ""),
    (dict(SESSION, bridge_base_url="http://h:1/#f"), 400, "INVALID_URL", ""),
    (dict(SESSION, bridge_base_url="/relative"), 400, "INVALID_URL", ""),
    (dict(SESSION, bridge_base_url=["http://h"]), 400, "INVALID_URL", ""),
    (dict(SESSION, bridge_api_key="a\r\nX-Injected: 1"), 400, "INVALID_BRIDGE_API_KEY", ""),
    (dict(SESSION, bridge_api_key="two words"), 400, "INVALID_BRIDGE_API_KEY", ""),
    (dict(SESSION, bridge_api_key="k" * 513), 400, "INVALID_BRIDGE_API_KEY", ""),
    (dict(SESSION, bridge_api_key=7), 400, "INVALID_BRIDGE_API_KEY", ""),
    (dict(SESSION, models=["gpt-4"]), 400, "INVALID_MODELS", ""),
    (dict(SESSION, models={"gpt-4": 1}), 400, "INVALID_MODELS", ""),
    (dict(SESSION, models={f"m{i}": "x" for i in range(201)}), 400, "INVALID_MODELS", ""),
    (["not", "an", "object"], 400, "MISSING_FIELDS", "session_id"),  # PHP's code
    (b"", 400, "MISSING_FIELDS", "session_id"),
    (b"  \n", 400, "MISSING_FIELDS", "session_id"),
    (b"null", 400, "MISSING_FIELDS", "session_id"),
    (b"{not json", 400, "INVALID_JSON", ""),
    (b"\xff\xfe", 400, "INVALID_JSON", ""),
    (b"{" + b" " * (64 * 1024) + b"}", 413, "BODY_TOO_LARGE", ""),
]


@pytest.mark.parametrize("body, status, code, mentioned", REFUSALS)
@pytest_twisted.ensureDeferred
async def test_refusals_change_nothing(gateway_factory, body, status, code, mentioned):
    gw = await gateway_factory()
    await register(gw, dict(SESSION, session_name="keeper"))
    _, _, before = await listing(gw)
    got_status, _, got = await register(gw, body)
    assert got_status == status
    assert got["error"]["code"] == code
    assert mentioned in got["error"]["message"]
    assert set(got["error"]) == {"message", "type", "code"}
    assert (await listing(gw))[2] == before


@pytest_twisted.ensureDeferred
async def test_models_limit_is_inclusive(gateway_factory):
    gw = await gateway_factory()
    status, _, _ = await register(gw, dict(SESSION, models={f"m{i}": "x" for i in range(200)}))
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_list_shape_and_domain_filter(gateway_factory):
    gw = await gateway_factory()
    await register(gw, SESSION)
    await register(gw, dict(SESSION, domain="beta.lmarena.ai", session_name="b"))
    _, _, everything = await listing(gw)
    assert set(everything) == {"domains"}
    assert everything["domains"]["lmarena.ai"].keys() == {"team-alpha"}
    assert everything["domains"]["beta.lmarena.ai"].keys() == {"b"}
    status, _, only_beta = await listing(gw, "?domain=beta.lmarena.ai")
    assert status == 200
    assert only_beta == {"domains": {"beta.lmarena.ai": everything["domains"]["beta.lmarena.ai"]}}
    status, _, bad = await listing(gw, "?domain=evil.example")
    assert status == 400 and bad["error"]["code"] == "INVALID_DOMAIN"


@pytest_twisted.ensureDeferred
async def test_delete(gateway_factory):
    gw = await gateway_factory()
    await register(gw, SESSION)
    status, _, body = await call("DELETE", gw.url + "/session/lmarena.ai/team-alpha")
    assert (status, body) == (200, {"status": "deleted", "domain": "lmarena.ai",
                                    "session_name": "team-alpha"})
    assert gw.store.get("lmarena.ai", "team-alpha") is None
    status, _, body = await call("DELETE", gw.url + "/session/lmarena.ai/team-alpha")
    assert status == 404 and body["error"]["code"] == "SESSION_NOT_FOUND"


@pytest_twisted.ensureDeferred
async def test_delete_percent_decodes_once(gateway_factory):
    gw = await gateway_factory()
    await register(gw, dict(SESSION, session_name="team_a-1"))
    status, _, _ = await call("DELETE", gw.url + "/session/lmarena%2Eai/team%5Fa%2D1")
    assert status == 200
    assert gw.store.get("lmarena.ai", "team_a-1") is None


@pytest.mark.parametrize("path, code", [
    ("/session/lmarena.ai/a%2Fb", "INVALID_SESSION_NAME"),     # an encoded slash stays in the name
    ("/session/lmarena.ai/a%252Db", "INVALID_SESSION_NAME"),   # decoded once: "a%2Db"
    ("/session/evil.example/x", "INVALID_DOMAIN"),
    ("/session/lmarena.ai/a%20b", "INVALID_SESSION_NAME"),
])
@pytest_twisted.ensureDeferred
async def test_delete_validates_after_decoding(gateway_factory, path, code):
    gw = await gateway_factory()
    await register(gw, SESSION)
    status, _, body = await call("DELETE", gw.url + path)
    assert status == 400 and body["error"]["code"] == code
    assert gw.store.get("lmarena.ai", "team-alpha") is not None


@pytest_twisted.ensureDeferred
async def test_concurrent_registrations_all_stored(gateway_factory):
    """500 registrations over 50 concurrent connections: all acknowledged, all stored, none mixed up."""
    import treq
    from twisted.internet import reactor
    from twisted.internet.defer import DeferredSemaphore, gatherResults
    from twisted.web.client import HTTPConnectionPool

    gw = await gateway_factory()
    pool = HTTPConnectionPool(reactor)
    pool.maxPersistentPerHost = 50
    client = treq.client.HTTPClient(treq.api.Agent(reactor, pool=pool))
    limit = DeferredSemaphore(50)

    def body(i):
        return dict(SESSION, session_name=f"s{i}", session_id=f"{i:08x}-0000-4000-8000-{i:012x}",
                    message_id=f"{i:08x}-1111-4000-8000-{i:012x}",
                    domain=("lmarena.ai", "canary.lmarena.ai")[i % 2])

    async def one(i):
        response = await client.post(gw.url + "/session/register", json=body(i))
        await treq.content(response)
        return response.code

    from twisted.internet.defer import Deferred

    codes = await gatherResults([limit.run(lambda i=i: Deferred.fromCoroutine(one(i))) for i in range(500)])
    await pool.closeCachedConnections()
    assert codes == [200] * 500
    from lmarena_gateway.store.sqlite import SessionFile

    on_disk, broken = SessionFile(gw.config.storage).load()
    assert not broken and len(on_disk) == 500
    for i in range(500):
        expected = body(i)
        record = on_disk[f"{expected['domain']}/s{i}"]
        assert (record.session_id, record.message_id) == (expected["session_id"], expected["message_id"])
