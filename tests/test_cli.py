"""``lmgateway stats | cleanup | import | export``: the PHP gateway's maintenance, and more."""

import io
import json
import subprocess
import time
from pathlib import Path

import pytest
from attrs import evolve

from lmarena_gateway.cli import main
from lmarena_gateway.sessions import SessionRecord, iso
from lmarena_gateway.store.sqlite import SessionFile

from support.processes import bin_path

PHP_FILE = Path(__file__).parent / "data" / "php-sessions.json"


# The PHP file's team-alpha uses its own bridge host, which an operator allows on import.
ALLOW = {"GATEWAY_BRIDGE_ALLOW": "custom-bridge, loopback"}


def run(*argv, environ=None):
    out = io.StringIO()
    try:
        code = main(list(argv), environ=ALLOW if environ is None else environ, out=out)
    except SystemExit as e:
        return e.code, out.getvalue()
    return code, out.getvalue()


@pytest.fixture
def storage(tmp_path):
    (tmp_path / "store").mkdir()
    return str(tmp_path / "store" / "sessions.sqlite3")


def test_import_of_a_php_file(storage):
    code, output = run("import", str(PHP_FILE), "--storage", storage)
    assert code == 1  # something was skipped
    assert "imported 3, skipped 4" in output
    for reason in ("lmarena.ai/bad name!: INVALID_SESSION_NAME",
                   "lmarena.ai/injector: INVALID_BRIDGE_API_KEY",
                   "canary.lmarena.ai/not-a-uuid: INVALID_UUID", "evil.example.com/x: INVALID_DOMAIN"):
        assert f"skipped {reason}" in output
    records, _ = SessionFile(storage).load()
    assert sorted(records) == ["canary.lmarena.ai/team-alpha", "lmarena.ai/team-alpha", "lmarena.ai/team-b"]
    alpha = records["lmarena.ai/team-alpha"]
    assert alpha.session_id == "12345678-1234-1234-1234-123456789abc"
    assert alpha.bridge_base_url == "http://custom-bridge:5102"
    assert alpha.bridge_api_key == "team-alpha-key"
    assert alpha.models == {"gpt-4": "claude-3-5-sonnet-20241022"}
    assert iso(alpha.created_at) == "2024-01-15T10:30:00Z"
    assert iso(alpha.updated_at) == "2024-02-01T08:00:00Z"
    # marked used by the import, so the daemon's first pruning pass keeps it
    assert abs(alpha.last_used_at - time.time()) < 5
    assert records["lmarena.ai/team-b"].models == {}
    assert records["canary.lmarena.ai/team-alpha"].bridge_base_url is None


def test_import_is_idempotent(storage):
    run("import", str(PHP_FILE), "--storage", storage)
    first = SessionFile(storage).load()[0]
    code, output = run("import", str(PHP_FILE), "--storage", storage)
    assert "imported 3, skipped 4" in output
    again = SessionFile(storage).load()[0]
    assert {k: evolve(r, last_used_at=None) for k, r in again.items()} == \
        {k: evolve(r, last_used_at=None) for k, r in first.items()}


def test_clean_import_exits_0(storage, tmp_path):
    data = json.loads(PHP_FILE.read_text())
    data["domains"]["lmarena.ai"] = {k: v for k, v in data["domains"]["lmarena.ai"].items()
                                     if k in ("team-alpha", "team-b")}
    del data["domains"]["canary.lmarena.ai"]["not-a-uuid"]
    del data["domains"]["evil.example.com"]
    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps(data))
    assert run("import", str(clean), "--storage", storage) == (0, "imported 3, skipped 0\n")


def test_export_import_round_trip(storage, tmp_path):
    run("import", str(PHP_FILE), "--storage", storage)
    code, exported = run("export", "--storage", storage)
    assert code == 0
    data = json.loads(exported)
    assert set(data) == {"domains", "created_at"}
    assert data["domains"]["lmarena.ai"]["team-alpha"]["bridge_api_key"] == "team-alpha-key"
    dump = tmp_path / "dump.json"
    dump.write_text(exported)
    other = str(tmp_path / "other.sqlite3")
    assert run("import", str(dump), "--storage", other) == (0, "imported 3, skipped 0\n")
    moved, kept = SessionFile(other).load()[0], SessionFile(storage).load()[0]
    assert moved.keys() == kept.keys()
    for key in kept:  # the same but for the import's own use mark, never earlier
        assert evolve(moved[key], last_used_at=None) == evolve(kept[key], last_used_at=None)
        assert moved[key].last_used_at >= kept[key].last_used_at


def test_stats(storage):
    run("import", str(PHP_FILE), "--storage", storage)
    code, output = run("stats", "--storage", storage)
    assert code == 0
    lines = dict(line.split("\t", 1) for line in output.splitlines())
    assert lines["lmarena.ai"] == "2" and lines["canary.lmarena.ai"] == "1" and lines["total"] == "3"
    assert "backend sqlite-dbm" in lines["store"]


def put(storage, name, days_idle, domain="lmarena.ai"):
    when = time.time() - days_idle * 86400
    file = SessionFile(storage)
    file.put(SessionRecord(domain, name, "12345678-1234-1234-1234-123456789abc",
                           "87654321-4321-4321-4321-cba987654321", created_at=when, updated_at=when))
    file.close()


def test_cleanup(storage):
    SessionFile(storage).close()
    put(storage, "old", 40)
    put(storage, "new", 5)
    put(storage, "old", 12, domain="beta.lmarena.ai")
    code, output = run("cleanup", "10", "--storage", storage)
    assert code == 0
    assert "lmarena.ai\t1 removed" in output and "beta.lmarena.ai\t1 removed" in output
    assert "removed 2 sessions" in output
    assert list(SessionFile(storage).load()[0]) == ["lmarena.ai/new"]


def test_cleanup_defaults_to_the_configured_days(storage):
    SessionFile(storage).close()
    put(storage, "a", 40)
    put(storage, "b", 20)
    code, output = run("cleanup", "--storage", storage)  # default 30 days
    assert "removed 1 sessions" in output
    code, output = run("cleanup", "--storage", storage,
                       environ={"GATEWAY_SESSION_CLEANUP_DAYS": "7", **ALLOW})
    assert "removed 1 sessions" in output
    assert not SessionFile(storage).load()[0]


def test_cleanup_0_only_prints_stats(storage):
    SessionFile(storage).close()
    put(storage, "ancient", 4000)
    code, output = run("cleanup", "0", "--storage", storage)
    assert code == 0 and "total\t1" in output
    assert list(SessionFile(storage).load()[0]) == ["lmarena.ai/ancient"]


@pytest.mark.parametrize("command", [["stats"], ["export"], ["cleanup", "1"]])
@pytest.mark.process
def test_missing_store_is_a_clear_error(tmp_path, command):
    result = subprocess.run([bin_path("lmgateway"), *command, "--storage", str(tmp_path / "none.sqlite3")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "no session store at" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "none.sqlite3").exists()


@pytest.mark.process
def test_unreadable_store_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"garbage" * 1000)
    result = subprocess.run([bin_path("lmgateway"), "stats", "--storage", str(junk)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "cannot open the session store" in result.stderr and "Traceback" not in result.stderr


def test_unreadable_import_file(storage, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    code, _ = run("import", str(bad), "--storage", storage)
    assert code not in (0, None) and "bad.json" in str(code)
    code, _ = run("import", str(tmp_path / "missing.json"), "--storage", storage)
    assert "cannot read" in str(code)


def test_import_refuses_bridges_off_the_allow_list(storage):
    code, output = run("import", str(PHP_FILE), "--storage", storage, environ={})
    assert "skipped lmarena.ai/team-alpha: BRIDGE_NOT_ALLOWED" in output
    assert "imported 2, skipped 5" in output and code == 1
    code, output = run("import", str(PHP_FILE), "--storage", storage, "--bridge-allow", "custom-bridge")
    assert "imported 3, skipped 4" in output


def test_import_keeps_the_session_limit(storage):
    code, output = run("import", str(PHP_FILE), "--storage", storage,
                       environ={**ALLOW, "GATEWAY_MAX_SESSIONS_PER_DOMAIN": "1"})
    assert "skipped lmarena.ai/team-b: SESSION_LIMIT" in output
    assert sorted(SessionFile(storage).load()[0]) == ["canary.lmarena.ai/team-alpha", "lmarena.ai/team-alpha"]


@pytest.mark.parametrize("when", ["Infinity", 1e20, -5, "10000-01-01T00:00:00"])
def test_import_skips_impossible_times(storage, tmp_path, when):
    data = json.loads(PHP_FILE.read_text())
    data["domains"]["lmarena.ai"]["team-b"]["created_at"] = when
    source = tmp_path / "times.json"
    source.write_text(json.dumps(data).replace('"Infinity"', "Infinity"))
    code, output = run("import", str(source), "--storage", storage)
    assert "skipped lmarena.ai/team-b: INVALID_TIME" in output
    assert "imported 2, skipped 5" in output


def test_cli_reads_only_its_own_settings(storage):
    run("import", str(PHP_FILE), "--storage", storage)
    environ = {"GATEWAY_LISTEN": "systemd:domain=INET:name=gone", "GATEWAY_ADMIN_TOKEN": "short",
               "GATEWAY_API_KEYS_FILE": "/nonexistent"}
    code, output = run("stats", "--storage", storage, environ=environ)
    assert code == 0 and "total\t3" in output


def test_reading_commands_create_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _ = run("stats", "--storage", str(tmp_path / "nothere" / "s.sqlite3"))
    assert "no session store" in str(code)
    code, _ = run("stats", environ={})
    assert "no session store" in str(code)
    assert list(tmp_path.iterdir()) == []


def test_revoke_without_a_secret_says_so(tmp_path):
    code, _ = run("revoke", "team-x", "--storage", str(tmp_path / "nowhere" / "s.sqlite3"))
    assert "no registration secret" in str(code)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_revocations_all_count(tmp_path):
    """Two revocations at once (two workers, or the CLI beside the daemon) must not lose
    one: each read-modify-write of the revocations file holds its lock."""
    from concurrent.futures import ThreadPoolExecutor

    from lmarena_gateway.tokens import load_generations, load_or_create_secret, revoke

    secret = str(tmp_path / "registration.secret")
    load_or_create_secret(secret)
    with ThreadPoolExecutor(8) as pool:
        generations = list(pool.map(lambda _: revoke(secret, "team-x"), range(80)))
    assert sorted(generations) == list(range(1, 81))  # each bump saw the one before it
    assert load_generations(secret) == {"team-x": 80}
