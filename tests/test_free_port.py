"""free_port(): loopback ports from outside the kernel's ephemeral range, each handed out
once and only when a bind shows nothing holds it (see tests/support/processes.py)."""

from __future__ import annotations

import socket
from itertools import pairwise

import pytest

from support.processes import (
    EPHEMERAL_RANGE,
    IANA_EPHEMERAL,
    PortAllocator,
    bindable,
    free_port,
    listening_range,
    pid_offset,
)


def ephemeral(tmp_path, text: str):
    path = tmp_path / "ip_local_port_range"
    path.write_text(text)
    return path


def hold(port: int) -> socket.socket:
    held = socket.socket()
    held.bind(("127.0.0.1", port))
    held.listen()
    return held


def two_free_in_a_row(ports: range) -> int:
    """A port of ``ports`` that is free, with the next one free too."""
    for port in range(ports.start, ports.stop - 1):
        if bindable(port) and bindable(port + 1):
            return port
    raise AssertionError(f"no two free ports in a row in {ports}")


def test_the_range_is_below_the_kernels_ephemeral_range(tmp_path):
    assert listening_range(ephemeral(tmp_path, "32768\t60999\n")) == range(16384, 32768)
    assert listening_range(ephemeral(tmp_path, "10000 65535")) == range(1024, 10000)


def test_the_range_is_above_when_nothing_is_left_below(tmp_path):
    assert listening_range(ephemeral(tmp_path, "1500 59999")) == range(60000, 65536)


def test_a_kernel_that_lends_every_port_leaves_only_the_bind_check(tmp_path):
    assert listening_range(ephemeral(tmp_path, "1024 65535")) == range(1024, 65536)


@pytest.mark.parametrize("text", [None, "", "32768", "low high"])
def test_without_a_readable_range_the_iana_one_is_assumed(tmp_path, text):
    path = tmp_path / "missing" if text is None else ephemeral(tmp_path, text)
    first = IANA_EPHEMERAL[0]
    assert listening_range(path) == range(first - 16384, first)


def test_free_ports_are_distinct_and_outside_the_ephemeral_range():
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(port in listening_range() for port in ports)
    if EPHEMERAL_RANGE.exists():  # Linux
        first, last = (int(word) for word in EPHEMERAL_RANGE.read_text().split())
        assert not [port for port in ports if first <= port <= last]


def test_a_free_port_can_be_listened_on():
    port = free_port()
    hold(port).close()


def test_a_held_port_is_skipped():
    held_port = two_free_in_a_row(listening_range())
    with hold(held_port):
        allocator = PortAllocator(range(held_port, held_port + 2))
        assert allocator.take() == held_port + 1
        with pytest.raises(RuntimeError, match="handed out or held"):
            allocator.take()


def test_a_port_a_closed_server_left_in_time_wait_is_skipped():
    """Its listener had SO_REUSEADDR, as Twisted's do, so a bind with it would pass while the
    connection waits out TIME_WAIT; the check binds without it, so a port another run has
    just used is passed over."""
    port = free_port()
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listener.accept()
            accepted.close()  # the server closes first, so its side of it waits
            assert client.recv(1) == b""
    assert not bindable(port)
    with pytest.raises(RuntimeError):
        PortAllocator(range(port, port + 1)).take()


def test_no_port_is_handed_out_twice_after_wrapping_round():
    start = two_free_in_a_row(listening_range())
    allocator = PortAllocator(range(start, start + 2), start=start + 1)
    assert [allocator.take(), allocator.take()] == [start + 1, start]
    with pytest.raises(RuntimeError):
        allocator.take()


def test_the_start_must_be_one_of_the_ports():
    with pytest.raises(ValueError):
        PortAllocator(range(20000, 20010), start=20010)


def test_near_pids_start_far_apart():
    span, runs = 16384, 64
    starts = sorted(pid_offset(pid, span) for pid in range(4000, 4000 + runs))
    assert all(0 <= start < span for start in starts)
    gaps = [b - a for a, b in pairwise(starts)] + [starts[0] + span - starts[-1]]
    assert min(gaps) >= span // (4 * runs)  # each of 64 runs can take 64 ports before meeting another
