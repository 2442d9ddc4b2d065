"""Where sessions live: one package, one module per backend, and the one place that
reads a storage setting.

``--storage`` is a file path (the embedded SQLite-dbm store) or a Redis URL; everything
that needs to know which (the daemon, the CLI, the token secret, config checks) asks
:func:`backend_of` or the three openers below, so a new backend is added here and in its
own module, nowhere else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

from .interfaces import ISecretSource, ISessionStore, ISessionTable

if TYPE_CHECKING:
    from ..config import GatewayConfig
    from ..tokens import FileSecrets, RedisSecrets
    from .redis import RedisSessionStore
    from .redis_commands import RedisSessionFile
    from .sqlite import DBMSessionStore, SessionFile

    # What mypy sees of each interface (zope's declarations are not types to it).
    Store: TypeAlias = DBMSessionStore | RedisSessionStore
    Table: TypeAlias = SessionFile | RedisSessionFile
    Secrets: TypeAlias = FileSecrets | RedisSecrets

__all__ = ["ISecretSource", "ISessionStore", "ISessionTable", "REDIS_SCHEMES", "SQLITE",
           "REDIS", "backend_of", "open_store", "open_table", "secret_source"]

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
SQLITE = "sqlite-dbm"
REDIS = "redis"


def backend_of(storage: str) -> str:
    """The backend a storage setting names; ValueError for a URL no backend owns."""
    if storage.startswith(REDIS_SCHEMES):
        return REDIS
    if "://" in storage:
        raise ValueError(f"no store for {storage.split('://', 1)[0]}:// "
                         f"(use a file path or one of {', '.join(REDIS_SCHEMES)})")
    return SQLITE


def open_store(config: GatewayConfig, reactor) -> Store:
    """The daemon's store: a service, started before the listeners."""
    if backend_of(config.storage) == REDIS:
        from .redis import RedisSessionStore

        return RedisSessionStore.from_url(config.storage, reactor, config=config)
    from .sqlite import DBMSessionStore

    return DBMSessionStore(config.storage, reactor)


def open_table(config: GatewayConfig, *, create: bool = False) -> Table:
    """The CLI's blocking table over the same data; OSError when it cannot be opened."""
    if backend_of(config.storage) == REDIS:
        from .redis_commands import RedisSessionFile

        return RedisSessionFile(config.storage, prefix=config.redis_prefix,
                                domains=config.domains)
    from .sqlite import open_file

    return open_file(config.storage, create=create)


def secret_source(config: GatewayConfig, store: Store) -> Secrets:
    """Where registration tokens' secret lives: beside the sessions it guards."""
    from ..tokens import FileSecrets, RedisSecrets

    if backend_of(config.storage) == REDIS:
        return RedisSecrets(store)
    return FileSecrets(config.registration_secret_file)
