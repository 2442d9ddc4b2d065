"""Every backend provides the interface it declares: the seams are checked, not hoped for."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyClass, verifyObject

from lmarena_gateway.store.redis import RedisSessionStore
from lmarena_gateway.store.redis_commands import RedisSessionFile
from lmarena_gateway.store.sqlite import DBMSessionStore, ISessionStore, ISessionTable, SessionFile


def test_the_file_store_provides_isessionstore(tmp_path):
    assert verifyObject(ISessionStore, DBMSessionStore(str(tmp_path / "s.sqlite3"), Clock()))


def test_the_redis_store_provides_isessionstore():
    # from_url connects nothing until startService
    store = RedisSessionStore.from_url("redis://127.0.0.1:1/0", Clock())
    assert verifyObject(ISessionStore, store)


def test_the_session_file_provides_isessiontable(tmp_path):
    table = SessionFile(str(tmp_path / "s.sqlite3"))
    try:
        assert verifyObject(ISessionTable, table)
    finally:
        table.close()


@pytest.mark.parametrize("table", [SessionFile, RedisSessionFile])
def test_each_blocking_table_class_implements_isessiontable(table):
    # RedisSessionFile runs a reactor in a thread of its own, which cannot share a test
    # process with pytest-twisted's: the CLI's process tests use it for real.
    assert verifyClass(ISessionTable, table)

