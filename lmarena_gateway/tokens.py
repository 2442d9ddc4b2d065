"""Registration tokens: what lets a userscript register ids for its own session name only.

A token is an HMAC of the session name and that name's generation under a server secret.
With the file store the secret is a file created once (mode 0600) beside the store; with
Redis it lives in Redis, so every instance behind a balancer accepts every instance's
tokens. Replacing the secret revokes every token; ``lmgateway revoke NAME`` bumps one
name's generation to revoke that name's.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import threading

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from zope.interface import implementer

from .store.interfaces import ISecretSource

log = Logger()
PREFIX = "lmrt1"


def revocations_path(secret_path: str) -> str:
    return secret_path + ".revoked.json"


def load_or_create_secret(path: str) -> bytes:
    """The secret, created with mode 0600 on first use; never logged."""
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except FileNotFoundError:
        secret = secrets.token_hex(32).encode()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            return load_or_create_secret(path)
        with os.fdopen(fd, "wb") as f:
            f.write(secret + b"\n")
            f.flush()
            os.fsync(f.fileno())
    if len(secret) < 32:
        raise ValueError(f"the secret in {path!r} is shorter than 32 bytes")
    return secret


def load_generations(secret_path: str) -> dict[str, int]:
    try:
        with open(revocations_path(secret_path), encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    return {str(k): int(v) for k, v in data.items()}


def revoke(secret_path: str, name: str) -> int:
    """Bump ``name``'s generation, atomically on disk; returns the new generation.

    Blocking (the CLI, or a thread): a lock file beside it serialises the
    read-modify-write, so two revocations at once (two workers, the CLI beside the
    daemon) both count instead of one overwriting the other.
    """
    target = revocations_path(secret_path)
    lock = os.open(target + ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        generations = load_generations(secret_path)
        generations[name] = generations.get(name, 0) + 1
        temporary = f"{target}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(generations, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, target)
        return generations[name]
    finally:
        os.close(lock)  # and with it the lock


def make_token(secret: bytes, name: str, generation: int) -> str:
    mac = hmac.new(secret, f"register\0{name}\0{generation}".encode(), hashlib.sha256).digest()
    return f"{PREFIX}.{generation}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"


@implementer(ISecretSource)
class FileSecrets:
    """The secret and the generations in two files beside the store."""

    def __init__(self, secret_path: str) -> None:
        self.secret_path = secret_path
        self._stamp: tuple | None = None

    def read(self):
        """(secret, generations), or None when neither file changed since the last read."""
        if self._stamp is not None and self._files() == self._stamp:
            return None
        result = load_or_create_secret(self.secret_path), load_generations(self.secret_path)
        # Stamped after reading: a secret created just now is not "changed" at the next poll.
        self._stamp = self._files()
        return result

    def _files(self):
        return tuple(
            (st.st_mtime_ns, st.st_ino) if st else None
            for st in map(_stat, (self.secret_path, revocations_path(self.secret_path)))
        )

    def refresh(self):
        return deferToThread(self.read)

    def revoke(self, name: str):
        """Fires with the name's new generation once it is on disk."""
        return deferToThread(revoke, self.secret_path, name)


@implementer(ISecretSource)
class RedisSecrets:
    """The secret and the generations in Redis, beside the sessions they guard.

    ``{prefix}token-secret`` is set once (SET NX) by whichever instance comes first;
    ``{prefix}token-generations`` is a hash of session name -> generation.
    """

    def __init__(self, store) -> None:
        self.store = store

    def read(self):
        return None  # nothing to read synchronously: the first refresh fills it in

    def refresh(self):
        from twisted.internet.defer import succeed

        sessions = self.store.sessions
        if sessions is None or not sessions.connected:
            return succeed(None)  # keep what we have; registrations fail 503 meanwhile
        secret_key = f"{self.store.prefix}token-secret"
        generations_key = f"{self.store.prefix}token-generations"

        def read_both(_):
            return sessions.command("GET", secret_key).addCallback(
                lambda secret: sessions.command("HGETALL", generations_key).addCallback(
                    lambda flat: (_text(secret).encode(), _pairs(flat))))

        return sessions.command("SET", secret_key, secrets.token_hex(32), "NX").addCallback(read_both)

    def revoke(self, name: str):
        """Fires with the name's new generation once Redis has it; fails 503 while it is down."""
        from twisted.internet.defer import fail

        from .store.redis_commands import unavailable

        sessions = self.store.sessions
        if sessions is None or not sessions.connected:
            return fail(unavailable("Redis is not connected"))
        return sessions.command("HINCRBY", f"{self.store.prefix}token-generations", name, 1
                                ).addCallback(int)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(reply) -> dict[str, int]:
    if isinstance(reply, dict):
        return {_text(k): int(v) for k, v in reply.items()}
    return {_text(reply[i]): int(reply[i + 1]) for i in range(0, len(reply), 2)}


class RegistrationTokens(Service):
    """Issues and checks tokens; notices a new secret or a revocation within a second."""

    def __init__(self, source, reactor, poll_interval: float = 1.0) -> None:
        self.source = source
        self._reactor = reactor
        self._secret = b""
        self._generations: dict[str, int] = {}
        self._poll = LoopingCall(self._check)
        self._poll.clock = reactor
        self._poll_interval = poll_interval

    @property
    def secret_path(self) -> str | None:
        return getattr(self.source, "secret_path", None)

    def _apply(self, result) -> None:
        if result is not None:
            self._secret, self._generations = result

    def startService(self) -> None:
        # At startup, before serving: reading a small file here blocks no one.
        self._apply(self.source.read())
        self._poll.start(self._poll_interval, now=True).addErrback(
            lambda f: log.failure("registration token reload stopped", f))
        super().startService()

    def stopService(self):
        if self._poll.running:
            self._poll.stop()
        return super().stopService()

    def _check(self):
        return self.source.refresh().addCallback(self._apply).addErrback(
            lambda f: log.error("could not re-read the registration secret: {why}",
                                why=f.getErrorMessage()))

    @property
    def ready(self) -> bool:
        """False until the secret is known (with Redis: until Redis first answered)."""
        return bool(self._secret)

    def token_for(self, name: str) -> str:
        if not self._secret:
            raise ValueError("the registration secret is not loaded")
        return make_token(self._secret, name, self._generations.get(name, 0))

    def revoke(self, name: str):
        """Revoke every token of ``name``; fires once this process refuses them too."""
        def applied(generation):
            return self._check().addCallback(lambda _: generation)

        return self.source.revoke(name).addCallback(applied)

    def derived_key(self, purpose: str) -> bytes | None:
        """A key for ``purpose`` shared by every instance that shares the secret."""
        if not self._secret:
            return None
        return hmac.new(self._secret, f"derive\0{purpose}".encode(), hashlib.sha256).digest()

    def is_valid(self, name: str, token) -> bool:
        # Tokens are ASCII; anything else (a lone surrogate cannot even be encoded) is wrong.
        if not isinstance(token, str) or not token.isascii() or not self._secret:
            return False
        return hmac.compare_digest(token.encode(), self.token_for(name).encode())


def _stat(path: str):
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
