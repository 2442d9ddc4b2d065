"""Several gateway processes sharing one redis-server: what an operator would do to them.

Two ``twistd lmgateway`` daemons on one Redis and one fake bridge; Redis is killed and
restarted under them, one daemon is killed under load, and the CLI moves a file store
into Redis while a daemon watches.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import openai

from lmarena_gateway.fakebridge import TEXT

from support.client import SESSION
from support.processes import bin_path, free_port, http, wait_for

PHP_FILE = Path(__file__).parent / "data" / "php-sessions.json"


def start_pair(tmp_path, daemon_factory, redis_url: str, bridge_url: str, count: int = 2):
    # The registration secret lives in Redis: nothing else to share.
    daemons = [daemon_factory("--storage", redis_url, "--bridge-url", bridge_url)
               for _ in range(count)]
    for daemon in daemons:
        wait_for(lambda daemon=daemon: store_status(daemon) == "ok", 10, what="the store to connect")
    return daemons


def store_status(daemon) -> str | None:
    try:
        return http("GET", daemon.url + "/health", timeout=2)[2]["store"]["status"]
    except OSError:
        return None


def register(daemon, name: str, **fields):
    return http("POST", daemon.url + "/session/register",
                dict(SESSION, session_name=name, **fields))


def names(daemon, domain: str = "lmarena.ai") -> set[str]:
    return set(http("GET", f"{daemon.url}/session/list?domain={domain}")[2]["domains"][domain])


def stream_chat(daemon, name: str) -> str:
    """A streamed chat through the openai SDK, as a user would; the text it read."""
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0,
                           default_headers={"X-Session-Name": name,
                                            "X-Target-Domain": "lmarena.ai"})
    stream = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=True)
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


class Writer(threading.Thread):
    """Registers new sessions through one daemon until stopped; notes every answer."""

    def __init__(self, daemon, tag: str) -> None:
        super().__init__(daemon=True)
        self.url = daemon.url
        self.tag = tag
        self.answers: list[tuple[str, int | None, str | None]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        for i in range(100_000):
            if self.stopping.is_set():
                return
            name = f"{self.tag}{i}"
            try:
                status, _, body = http("POST", self.url + "/session/register",
                                       dict(SESSION, session_name=name), timeout=10)
                code = body["error"]["code"] if status != 200 else None
            except OSError:
                status, code = None, "connection failed"
            self.answers.append((name, status, code))
            self.stopping.wait(0.002)  # pacing, so an outage is not thousands of requests

    def acknowledged(self) -> set[str]:
        return {name for name, status, _ in self.answers if status == 200}

    def stop(self) -> None:
        self.stopping.set()
        self.join(15)


def test_registered_on_one_instance_streamed_through_the_other(
        tmp_path, redis_server, daemon_factory, fake_bridge_process):
    a, b = start_pair(tmp_path, daemon_factory, redis_server.url, fake_bridge_process)
    assert register(a, "team-alpha", models={"fast": "fake-model"})[0] == 200
    wait_for(lambda: "team-alpha" in names(b), 1.0, 0.005, "B to see A's registration")
    assert stream_chat(b, "team-alpha") == TEXT

    # a delete through B is seen by A (bench/redis_invalidation.py measures how fast)
    for i in range(10):
        assert register(a, f"gone{i}")[0] == 200
        wait_for(lambda i=i: f"gone{i}" in names(b), 10, 0.005, "the registration on B")
        assert http("DELETE", f"{b.url}/session/lmarena.ai/gone{i}")[0] == 200
        wait_for(lambda i=i: f"gone{i}" not in names(a), 10, 0.005, "the deletion on A")
    status, _, body = http("POST", a.url + "/v1/chat/completions",
                           {"model": "m", "messages": [{"role": "user", "content": "x"}]},
                           {"X-Session-Name": "gone0"})
    assert (status, body["error"]["code"]) == (404, "SESSION_NOT_FOUND")


def test_redis_restarted_loses_nothing_acknowledged_and_never_says_ok_while_down(
        tmp_path, redis_server, daemon_factory, fake_bridge_process):
    a, b = start_pair(tmp_path, daemon_factory, redis_server.url, fake_bridge_process)
    assert register(a, "known")[0] == 200
    wait_for(lambda: "known" in names(b), 1.0, what="B to see the session")
    writer = Writer(a, "w")
    writer.start()
    try:
        wait_for(lambda: len(writer.acknowledged()) >= 20, 15, what="writes before the outage")
        redis_server.kill()
        wait_for(lambda: store_status(a) == store_status(b) == "degraded", 10,
                 what="both instances to report the store degraded")
        status, headers, body = register(b, "during-outage")
        assert (status, body["error"]["code"]) == (503, "STORAGE_UNAVAILABLE")
        assert headers["Retry-After"] == "2"  # the reconnection interval
        status, _, body = http("DELETE", f"{b.url}/session/lmarena.ai/known")
        assert (status, body["error"]["code"]) == (503, "STORAGE_UNAVAILABLE")
        assert stream_chat(b, "known") == TEXT  # known sessions keep working from memory
        assert http("GET", a.url + "/health")[2]["status"] == "degraded"
        wait_for(lambda: sum(s == 503 for _, s, _ in writer.answers) >= 3, 10,
                 what="the writer to be refused too")

        redis_server.start()
        wait_for(lambda: store_status(a) == store_status(b) == "ok", 15,
                 what="both instances to reconnect")
        after = len(writer.acknowledged())
        wait_for(lambda: len(writer.acknowledged()) >= after + 20, 15, what="writes after")
    finally:
        writer.stop()

    assert {(s, c) for _, s, c in writer.answers} <= {(200, None), (503, "STORAGE_UNAVAILABLE")}
    acknowledged = writer.acknowledged() | {"known"}
    in_redis = {key.split("/", 1)[1] for key in redis_server("HKEYS", "lmgw:sessions")}
    assert acknowledged <= in_redis, f"lost: {sorted(acknowledged - in_redis)}"
    assert "during-outage" not in in_redis
    for daemon in (a, b):
        wait_for(lambda daemon=daemon: acknowledged <= names(daemon), 1.0, what="every instance to list them")
    # changes flow between the instances again
    assert http("DELETE", f"{a.url}/session/lmarena.ai/known")[0] == 200
    wait_for(lambda: "known" not in names(b), 1.0, what="B to see the delete after the restart")


def test_an_instance_killed_under_load_loses_nothing_acknowledged(
        tmp_path, redis_server, daemon_factory, fake_bridge_process):
    a, b = start_pair(tmp_path, daemon_factory, redis_server.url, fake_bridge_process)
    assert register(a, "chatty")[0] == 200
    writers = [Writer(a, f"k{j}-") for j in range(4)]
    chats_done = threading.Event()

    def chat_load():
        while not chats_done.is_set():
            try:
                stream_chat(a, "chatty")
            except openai.APIError:
                return  # the instance is gone

    chatter = threading.Thread(target=chat_load, daemon=True)
    for thread in (*writers, chatter):
        thread.start()
    try:
        wait_for(lambda: sum(len(w.acknowledged()) for w in writers) >= 100, 20,
                 what="load on A")
        a.kill()
    finally:
        chats_done.set()
        for writer in writers:
            writer.stop()
        chatter.join(15)

    acknowledged = set().union(*(w.acknowledged() for w in writers))
    assert len(acknowledged) >= 100
    in_redis = {key.split("/", 1)[1] for key in redis_server("HKEYS", "lmgw:sessions")}
    assert acknowledged <= in_redis, f"lost: {sorted(acknowledged - in_redis)}"
    wait_for(lambda: acknowledged <= names(b), 1.0, what="B to list every acknowledged one")
    # a replacement instance starts with all of them
    (c,) = start_pair(tmp_path, daemon_factory, redis_server.url, fake_bridge_process, count=1)
    assert acknowledged | {"chatty"} <= names(c)
    assert stream_chat(c, "chatty") == TEXT


def lmgateway(*args, stdin=None, input_text=None):
    return subprocess.run([bin_path("lmgateway"), *args], stdin=stdin, input=input_text,
                          capture_output=True, text=True, timeout=30)


def test_export_from_a_file_store_imported_into_redis_gives_the_same_sessions(
        tmp_path, redis_server, daemon_factory, fake_bridge_process):
    (daemon,) = start_pair(tmp_path, daemon_factory, redis_server.url, fake_bridge_process, count=1)
    old_store = str(tmp_path / "old.sqlite3")
    assert "imported 3, skipped 4" in lmgateway("import", str(PHP_FILE), "--storage",
                                                old_store, "--bridge-allow", "custom-bridge").stdout

    export = subprocess.Popen([bin_path("lmgateway"), "export", "--storage", old_store],
                              stdout=subprocess.PIPE)
    imported = lmgateway("import", "-", "--storage", redis_server.url, "--bridge-allow",
                         "custom-bridge", stdin=export.stdout)
    export.stdout.close()
    assert export.wait(30) == 0
    assert (imported.returncode, imported.stdout.strip()) == (0, "imported 3, skipped 0")

    before = json.loads(lmgateway("export", "--storage", old_store).stdout)
    after = json.loads(lmgateway("export", "--storage", redis_server.url).stdout)
    def unmarked(domains):  # each import marks its records used: compare the rest
        return {d: {n: dict(r, last_used_at=None) for n, r in s.items()}
                for d, s in domains.items()}

    assert unmarked(after["domains"]) == unmarked(before["domains"])
    assert len(after["domains"]["lmarena.ai"]) == 2
    # the running daemon heard about the import
    wait_for(lambda: names(daemon) == {"team-alpha", "team-b"}, 1.0, what="the daemon to see it")
    assert names(daemon, "canary.lmarena.ai") == {"team-alpha"}

    stats = lmgateway("stats", "--storage", redis_server.url).stdout
    assert "lmarena.ai\t2" in stats and "total\t3" in stats and "backend redis" in stats
    # the import marked them used just now: once a second has passed, a cleanup of
    # sessions idle for over 0.00001 days (under a second) removes them, everywhere
    wait_for(lambda: "removed 3 sessions" in lmgateway(
        "cleanup", "0.00001", "--storage", redis_server.url).stdout, 10,
        what="the cleanup to remove the imported sessions")
    wait_for(lambda: not names(daemon) and not names(daemon, "canary.lmarena.ai"), 1.0,
             what="the daemon to see the cleanup")
    assert redis_server("HLEN", "lmgw:sessions") == 0


def test_cli_without_redis_is_a_clear_error():
    result = lmgateway("stats", "--storage", f"redis://127.0.0.1:{free_port()}/0")
    assert result.returncode == 1
    assert result.stderr.startswith("lmgateway: the session store (Redis) is unavailable")


def test_registration_tokens_work_on_every_instance_and_revoke_everywhere(
        tmp_path, redis_server, daemon_factory, fake_bridge_process):
    """The secret lives in Redis: a script from one instance registers through another."""
    admin = {"GATEWAY_ADMIN_TOKEN": "cluster-admin-token-0123"}
    a, b = (daemon_factory("--storage", redis_server.url, "--bridge-url", fake_bridge_process,
                           env={**admin, "GATEWAY_SECRET_FILE": str(tmp_path / f"secret-{i}")})
            for i in range(2))
    auth = {"Authorization": "Bearer cluster-admin-token-0123"}
    for daemon in (a, b):  # each has read the secret once Redis answered
        wait_for(lambda daemon=daemon: http("GET", daemon.url + "/userscript/team-r.user.js",
                                            headers=auth)[0] == 200,
                 10, what="the secret from Redis")
    _, _, script = http("GET", a.url + "/userscript/team-r.user.js", headers=auth)
    token = script.decode().split('var REGISTRATION_TOKEN = "', 1)[1].split('"', 1)[0]
    _, _, other = http("GET", b.url + "/userscript/team-r.user.js", headers=auth)
    assert token in other.decode()  # both instances issue the same token
    body = dict(SESSION, session_name="team-r", registration_token=token)
    assert http("POST", b.url + "/session/register", body)[0] == 200
    assert not (tmp_path / "secret-0").exists() and not (tmp_path / "secret-1").exists()

    revoked = lmgateway("revoke", "team-r", "--storage", redis_server.url)
    assert revoked.returncode == 0, revoked.stderr
    for daemon in (a, b):
        wait_for(lambda daemon=daemon: http("POST", daemon.url + "/session/register", body)[0] == 403, 5,
                 what="the revocation to reach every instance")
