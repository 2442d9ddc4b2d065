"""A store file corrupted mid-file stops the daemon with one line that says what to do."""

import json
import os

import pytest

from lmarena_gateway.store import sqlitedbm

from support.processes import Daemon

SESSIONS = 400
pytestmark = pytest.mark.process  # it starts twistd itself


def filled_store(path):
    with sqlitedbm.open(str(path), "c") as db:
        with db.transaction():
            for n in range(SESSIONS):
                db[f"lmarena.ai/team-{n}"] = json.dumps({"padding": "x" * 300, "n": n})
    # Fold the WAL into the main file, so the damage below hits real pages.
    with sqlitedbm.open(str(path), "w") as db:
        db._cx.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


@pytest.mark.parametrize("where", ["middle", "header"])
def test_a_corrupt_store_is_one_line_and_exit_1(tmp_path, where):
    store = filled_store(tmp_path / "sessions.sqlite3")
    size = os.path.getsize(store)
    with open(store, "r+b") as f:
        f.seek(size // 2 if where == "middle" else 0)
        f.write(os.urandom(4096) if where == "middle" else b"not a database, truly " * 8)
    daemon = Daemon(tmp_path, env={"STORAGE_PATH": str(store)})
    daemon.start(wait=False)
    assert daemon.process.wait(30) == 1
    lines = [line for line in daemon.log().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert str(store) in lines[0]
    assert "lmgateway export" in lines[0] and "move it aside" in lines[0]
    assert "Traceback" not in daemon.log()
