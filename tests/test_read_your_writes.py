"""A registration acknowledged by one process is served by every other one at once.

Real processes on loopback: two daemons on one SQLite file, two on one Redis, and the CLI
beside a running daemon (``--workers 2`` is in test_workers.py). Each registers a new
session, then at once chats as that session through fresh connections: a 200 from
/session/register followed by a 404 is the bug.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

from support.client import SESSION
from support.processes import bin_path, http, wait_for

ROUNDS = 12  # a new session each round: once found, a process keeps it in memory
AT_ONCE = 16  # chats fired together right after each acknowledgement
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def chats_at_once(url: str, name: str) -> list[tuple[int, str | None]]:
    """AT_ONCE chats as ``name``, each on its own fresh connection: (status, error code)."""
    def one(_):
        status, _, body = http("POST", url + "/v1/chat/completions", CHAT,
                               {"X-Session-Name": name}, timeout=30)
        return status, body["error"]["code"] if status != 200 else None

    with ThreadPoolExecutor(AT_ONCE) as pool:
        return list(pool.map(one, range(AT_ONCE)))


def register_then_chat(register_url: str, chat_url: str, tag: str) -> list:
    """Every answer that was not a 200, over ROUNDS registrations."""
    wrong = []
    for i in range(ROUNDS):
        name = f"{tag}{i}"
        status, _, body = http("POST", register_url + "/session/register",
                               dict(SESSION, session_name=name))
        assert status == 200, body
        wrong += [(name, *answer) for answer in chats_at_once(chat_url, name)
                  if answer[0] != 200]
    return wrong


def test_two_instances_on_one_file_serve_a_registration_at_once(
        daemon_factory, fake_bridge_process):
    # Both use the factory's store file and secret file (same directory).
    a = daemon_factory("--bridge-url", fake_bridge_process)
    b = daemon_factory("--bridge-url", fake_bridge_process)
    assert register_then_chat(a.url, b.url, "file") == []


def test_two_instances_on_one_redis_serve_a_registration_at_once(
        redis_server, daemon_factory, fake_bridge_process):
    a, b = (daemon_factory("--storage", redis_server.url, "--bridge-url", fake_bridge_process)
            for _ in range(2))
    for daemon in (a, b):
        wait_for(lambda daemon=daemon: http("GET", daemon.url + "/health")[2]["store"]["status"]
                 == "ok", 10, what="the store to connect")
    assert register_then_chat(a.url, b.url, "redis") == []


def test_a_registration_is_served_while_the_change_channel_is_reconnecting(
        redis_server, daemon_factory, fake_bridge_process):
    # Redis drops the subscriptions (a failover, a proxy restart, an operator's CLIENT
    # KILL): until B has subscribed and reloaded again, the channel tells it nothing.
    a, b = (daemon_factory("--storage", redis_server.url, "--bridge-url", fake_bridge_process)
            for _ in range(2))
    for daemon in (a, b):
        wait_for(lambda daemon=daemon: http("GET", daemon.url + "/health")[2]["store"]["status"]
                 == "ok", 10, what="the store to connect")
    assert redis_server("CLIENT", "KILL", "TYPE", "pubsub") >= 2
    status, _, body = http("POST", a.url + "/session/register",
                           dict(SESSION, session_name="meanwhile"))
    assert status == 200, body
    assert [answer for answer in chats_at_once(b.url, "meanwhile") if answer[0] != 200] == []


def test_a_session_imported_by_the_cli_is_served_at_once(
        tmp_path, daemon_factory, fake_bridge_process):
    daemon = daemon_factory("--bridge-url", fake_bridge_process)
    for i in range(3):
        name = f"cli{i}"
        exported = {"domains": {"lmarena.ai": {name: {
            "session_id": SESSION["session_id"], "message_id": SESSION["message_id"],
            "created_at": "2026-01-01T00:00:00+00:00",
            "updated_at": "2026-01-01T00:00:00+00:00"}}}}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(exported))
        done = subprocess.run([bin_path("lmgateway"), "import", str(path), "--storage",
                               daemon.storage], capture_output=True, text=True, timeout=30)
        assert (done.returncode, done.stdout.strip()) == (0, "imported 1, skipped 0"), done
        assert [a for a in chats_at_once(daemon.url, name) if a[0] != 200] == []
