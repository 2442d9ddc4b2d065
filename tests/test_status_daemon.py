"""The status page's revoke against real daemons: the file secret, and Redis shared by two."""

from __future__ import annotations

import re
from urllib.parse import urlencode

from support.client import SESSION
from support.processes import http, wait_for

ADMIN = "status-daemon-admin-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def token_of(daemon, name: str) -> str:
    wait_for(lambda: http("GET", f"{daemon.url}/userscript/{name}.user.js", headers=AUTH)[0] == 200,
             10, what="the registration secret")
    _, _, script = http("GET", f"{daemon.url}/userscript/{name}.user.js", headers=AUTH)
    return script.decode().split('var REGISTRATION_TOKEN = "', 1)[1].split('"', 1)[0]


def csrf_of(daemon) -> str:
    status, _, page = http("GET", daemon.url + "/status", headers=AUTH)
    assert status == 200
    return re.search(r'name="csrf" value="([^"]+)"', page.decode()).group(1)


def post_form(daemon, path: str, form: dict):
    return http("POST", daemon.url + path, urlencode(form).encode(),
                {**AUTH, "Content-Type": "application/x-www-form-urlencoded"})


def test_revoke_from_the_page_with_the_file_secret(daemon_factory, fake_bridge_process):
    daemon = daemon_factory("--bridge-url", fake_bridge_process, env={"GATEWAY_ADMIN_TOKEN": ADMIN})
    token = token_of(daemon, "team-r")
    body = dict(SESSION, session_name="team-r", registration_token=token)
    assert http("POST", daemon.url + "/session/register", body)[0] == 200
    status, _, page = post_form(daemon, "/status/revoke",
                                {"csrf": csrf_of(daemon), "session_name": "team-r", "confirm": "yes"})
    assert status == 200 and b"now generation 1" in page
    # refused at once by this process, and the CLI's file says the same
    assert http("POST", daemon.url + "/session/register", body)[0] == 403
    assert token_of(daemon, "team-r") != token


def test_revoke_and_csrf_tokens_hold_on_every_instance_sharing_redis(
        tmp_path, redis_server, daemon_factory, fake_bridge_process):
    a, b = (daemon_factory("--storage", redis_server.url, "--bridge-url", fake_bridge_process,
                           env={"GATEWAY_ADMIN_TOKEN": ADMIN,
                                "GATEWAY_SECRET_FILE": str(tmp_path / f"secret-{i}")})
            for i in range(2))
    token = token_of(a, "team-r")
    assert token_of(b, "team-r") == token
    body = dict(SESSION, session_name="team-r", registration_token=token)
    assert http("POST", b.url + "/session/register", body)[0] == 200
    wait_for(lambda: any(s["session_name"] == "team-r" for s in
                         http("GET", a.url + "/status.json", headers=AUTH)[2]["sessions"]),
             10, what="the session on the other instance's page")
    # the page's token from instance a is good on instance b (behind one balancer)
    status, _, page = post_form(b, "/status/revoke",
                                {"csrf": csrf_of(a), "session_name": "team-r", "confirm": "yes"})
    assert status == 200, page
    assert http("POST", b.url + "/session/register", body)[0] == 403
    wait_for(lambda: http("POST", a.url + "/session/register", body)[0] == 403, 5,
             what="the revocation to reach the other instance")
