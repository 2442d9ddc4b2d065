"""The daemon raises its open-files limit: each stream holds two sockets."""

from __future__ import annotations

import resource

from lmarena_gateway.service import OPEN_FILES_CEILING, raise_open_files_limit


class FakeRlimit:
    RLIMIT_NOFILE = resource.RLIMIT_NOFILE
    RLIM_INFINITY = resource.RLIM_INFINITY

    def __init__(self, soft, hard, refuse=False) -> None:
        self.limits = (soft, hard)
        self.refuse = refuse
        self.set_calls: list = []

    def getrlimit(self, which):
        assert which == self.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which, limits):
        self.set_calls.append(limits)
        if self.refuse:
            raise ValueError("not allowed")
        self.limits = limits


def test_the_soft_limit_is_raised_to_the_hard_one():
    fake = FakeRlimit(1024, 20000)
    assert raise_open_files_limit(fake) == (1024, 20000)
    assert fake.limits == (20000, 20000)


def test_an_unlimited_hard_limit_raises_the_soft_one_to_the_kernel_default_ceiling():
    fake = FakeRlimit(1024, resource.RLIM_INFINITY)
    assert raise_open_files_limit(fake) == (1024, OPEN_FILES_CEILING)
    assert fake.set_calls == [(OPEN_FILES_CEILING, resource.RLIM_INFINITY)]


def test_nothing_is_set_when_the_soft_limit_is_already_there():
    fake = FakeRlimit(20000, 20000)
    assert raise_open_files_limit(fake) == (20000, 20000)
    assert fake.set_calls == []


def test_a_refusal_keeps_the_old_limit():
    fake = FakeRlimit(1024, 4096, refuse=True)
    assert raise_open_files_limit(fake) == (1024, 1024)
    assert fake.limits == (1024, 4096)


def open_files_limits(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def test_the_daemon_starts_with_its_soft_limit_at_the_hard_one(daemon_factory):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard > 512, f"this machine's hard open-files limit ({hard}) cannot show the raise"
    expected = OPEN_FILES_CEILING if hard == resource.RLIM_INFINITY else hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))  # the daemon inherits it
    try:
        daemon = daemon_factory()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert open_files_limits(daemon.process.pid)[0] == expected
    assert "open-files limit raised from 512 to" in daemon.log()
