"""Every backend provides the interface it declares: the seams are checked, not hoped for."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyClass, verifyObject

import lmarena_gateway
from lmarena_gateway.config import build_config
from lmarena_gateway.store import (
    REDIS,
    SQLITE,
    ISecretSource,
    ISessionStore,
    ISessionTable,
    backend_of,
    open_store,
    open_table,
    secret_source,
)
from lmarena_gateway.store.redis import RedisSessionStore
from lmarena_gateway.store.redis_commands import RedisSessionFile
from lmarena_gateway.store.sqlite import DBMSessionStore, SessionFile
from lmarena_gateway.tokens import FileSecrets, RedisSecrets


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



def test_each_secret_source_provides_isecretsource(tmp_path):
    assert verifyObject(ISecretSource, FileSecrets(str(tmp_path / "registration.secret")))
    store = RedisSessionStore.from_url("redis://127.0.0.1:1/0", Clock())
    assert verifyObject(ISecretSource, RedisSecrets(store))


@pytest.mark.parametrize("storage, backend", [
    ("storage/sessions.sqlite3", SQLITE), ("/var/lib/x.db", SQLITE),
    ("redis://127.0.0.1:6379/0", REDIS), ("rediss://h/1", REDIS), ("unix:///run/redis.sock", REDIS),
])
def test_one_function_names_the_backend_of_a_storage_setting(storage, backend):
    assert backend_of(storage) == backend


def test_a_url_no_backend_owns_is_refused():
    with pytest.raises(ValueError, match="no store for memcached://"):
        backend_of("memcached://127.0.0.1:11211")


def test_the_openers_pick_the_backend_the_setting_names(tmp_path):
    file_config = build_config({"storage": str(tmp_path / "s.sqlite3")}, {})
    redis_config = build_config({"storage": "redis://127.0.0.1:1/0"}, {})
    file_store, redis_store = open_store(file_config, Clock()), open_store(redis_config, Clock())
    assert (file_store.backend, redis_store.backend) == (SQLITE, REDIS)
    assert isinstance(secret_source(file_config, file_store), FileSecrets)
    assert isinstance(secret_source(redis_config, redis_store), RedisSecrets)
    table = open_table(file_config, create=True)
    try:
        assert table.backend == SQLITE and verifyObject(ISessionTable, table)
    finally:
        table.close()


def test_no_module_outside_the_store_package_reads_a_storage_scheme():
    package = Path(lmarena_gateway.__file__).parent
    offenders = [
        str(path.relative_to(package)) for path in package.rglob("*.py")
        if path.parent.name != "store" and ('"://"' in path.read_text()
                                            or "startswith((\"redis" in path.read_text())
    ]
    assert offenders == []
