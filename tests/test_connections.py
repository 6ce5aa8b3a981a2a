"""connections.py on its own: admission, making room, and every deadline at and past its edge.

The table is driven with a fake clock and real socket pairs (the server's end is what the
table holds; the client's end shows what the client would see), and `sweep()` is called by
hand where the watchdog would call it every TICK_S. tests/test_edge.py checks the same
behaviour through a real server.
"""
from __future__ import annotations

import socket
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, ROOT)
import connections  # noqa: E402  (the module under test)
import httphead  # noqa: E402


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Body:
    def __init__(self, length):
        self.length = self.remaining = length


@pytest.fixture
def pairs():
    made = []

    def make():
        server_end, client_end = socket.socketpair()
        server_end.settimeout(1)
        client_end.settimeout(1)
        made.append((server_end, client_end))
        return server_end, client_end

    yield make
    for ends in made:
        for sock in ends:
            sock.close()


def table(max_connections=4, per_client=4, **kw):
    clock = Clock()
    limits = connections.Limits(max_connections, per_client, header_timeout=10,
                                idle_timeout=5, min_body_rate=1000, body_rate_window=2, **kw)
    return connections.Connections(limits, clock=clock), clock


def admitted(connections_table, pairs, client="10.0.0.1"):
    server_end, client_end = pairs()
    assert connections_table.admit(server_end, client) is None
    return connections_table.slot_of(server_end), client_end


def idle(connections_table, slot, clock, at):
    clock.now = at
    connections_table.serving(slot)
    connections_table.await_request(slot, first=False)


def cut(slot):
    """The server's end was shut for reading: its next read is the end of the stream."""
    return slot.cut_reason is not None and slot.sock.recv(1) == b""


def test_a_full_table_closes_the_connection_idle_longest(pairs):
    connection_table, clock = table(max_connections=3)
    slots = [admitted(connection_table, pairs)[0] for _ in range(3)]
    for slot, at in zip(slots, (1003.0, 1001.0, 1002.0)):      # slots[1] idle longest
        idle(connection_table, slot, clock, at)
    newcomer, _ = pairs()
    assert connection_table.admit(newcomer, "10.0.0.9") is None
    assert [s.evicted for s in slots] == [False, True, False]
    assert connection_table.count() == 3


def test_a_full_table_without_an_idle_connection_refuses_with_503(pairs):
    connection_table, clock = table(max_connections=2)
    for _ in range(2):
        admitted(connection_table, pairs)                        # mid-head: not idle
    refused, _ = pairs()
    assert connection_table.admit(refused, "10.0.0.9")[:2] == (503, "server_busy")


def test_the_per_address_cap_at_and_past_its_edge(pairs):
    connection_table, clock = table(max_connections=8, per_client=2)
    admitted(connection_table, pairs)
    admitted(connection_table, pairs)                           # 2 of 2: in
    third, _ = pairs()
    assert connection_table.admit(third, "10.0.0.1")[:2] == (429, "too_many_connections")
    assert connection_table.admit(third, "10.0.0.2") is None     # another address


def test_an_address_at_its_cap_makes_room_from_its_own_idle_connections_only(pairs):
    connection_table, clock = table(max_connections=8, per_client=1)
    other, _ = admitted(connection_table, pairs, client="10.0.0.2")
    idle(connection_table, other, clock, 1001.0)                # idle, but another address
    mine, client_end = admitted(connection_table, pairs)
    idle(connection_table, mine, clock, 1002.0)
    newcomer, _ = pairs()
    assert connection_table.admit(newcomer, "10.0.0.1") is None
    assert mine.evicted and not other.evicted
    assert client_end.recv(1) == b""                            # the client saw it close


def test_the_head_deadline_at_and_past_its_edge(pairs):
    connection_table, clock = table()
    slot, _ = admitted(connection_table, pairs)
    clock.now += 9.9
    connection_table.sweep()
    assert slot.cut_reason is None
    clock.now += 0.2
    connection_table.sweep()
    assert cut(slot) and "--header-timeout" in slot.cut_reason


def test_a_later_head_is_due_from_its_request_line(pairs):
    connection_table, clock = table()
    slot, _ = admitted(connection_table, pairs)
    idle(connection_table, slot, clock, clock.now + 30)          # the first request: done
    clock.now += 4
    connection_table.head_started(slot)                         # the next request line
    clock.now += 9.9
    connection_table.sweep()
    assert slot.cut_reason is None
    clock.now += 0.2
    connection_table.sweep()
    assert cut(slot) and "--header-timeout" in slot.cut_reason


def test_the_idle_deadline_at_and_past_its_edge(pairs):
    connection_table, clock = table()
    slot, _ = admitted(connection_table, pairs)
    idle(connection_table, slot, clock, clock.now)
    clock.now += 4.9
    connection_table.sweep()
    assert slot.cut_reason is None
    clock.now += 0.2
    connection_table.sweep()
    assert cut(slot) and "--idle-timeout" in slot.cut_reason


def test_no_deadline_while_the_handler_runs(pairs):
    connection_table, clock = table()
    slot, _ = admitted(connection_table, pairs)
    assert connection_table.serving(slot)
    clock.now += 3600                                           # an event stream, say
    connection_table.sweep()
    assert slot.cut_reason is None


def test_the_body_rate_at_and_past_its_edge(pairs):
    connection_table, clock = table()                           # 1000 B/s over 2 s windows
    slot, _ = admitted(connection_table, pairs)
    connection_table.serving(slot)
    body = Body(100000)
    connection_table.body_started(slot, body)
    clock.now += 2.0
    body.remaining -= 2000                                      # exactly the minimum
    connection_table.sweep()
    assert slot.cut_reason is None
    clock.now += 2.0
    body.remaining -= 1999                                      # one byte short
    connection_table.sweep()
    assert cut(slot) and "--min-body-rate" in slot.cut_reason


def test_a_finished_body_is_not_measured(pairs):
    connection_table, clock = table()
    slot, _ = admitted(connection_table, pairs)
    connection_table.serving(slot)
    body = Body(10)
    connection_table.body_started(slot, body)
    body.remaining = 0                                          # read whole, then a long reply
    clock.now += 60
    connection_table.sweep()
    assert slot.cut_reason is None


def test_a_cut_connection_is_not_served_when_its_head_arrives_late(pairs):
    connection_table, clock = table()
    slot, _ = admitted(connection_table, pairs)
    clock.now += 11
    connection_table.sweep()
    assert not connection_table.serving(slot)                   # the handler answers 408


def test_a_refused_socket_is_closed_by_the_sweep_after_lingering(pairs):
    connection_table, clock = table()
    refused, client_end = pairs()
    client_end.sendall(b"GET / HTTP/1.1\r\n")
    connection_table.linger(refused)
    assert client_end.recv(1) == b""                            # our side of it is shut
    connection_table.sweep()
    assert refused.fileno() != -1                               # still lingering
    clock.now += connections.REFUSAL_LINGER_S + 0.1
    connection_table.sweep()
    assert refused.fileno() == -1                               # closed


def test_release_frees_the_slot_and_the_address(pairs):
    connection_table, clock = table(max_connections=1, per_client=1)
    slot, _ = admitted(connection_table, pairs)
    connection_table.release(slot.sock)
    assert connection_table.count() == 0
    admitted(connection_table, pairs)


@pytest.mark.parametrize("text,value", [
    ("0", 0), ("007", 7), ("9" * 18, 10 ** 18 - 1), ("9" * 19, None), ("", None),
    ("\u00b2", None), ("1\u00b3", None), ("\u0661", None), ("+1", None), ("-1", None),
    (" 1", None), ("1 ", None), ("1_000", None), ("0x1", None), ("1e3", None),
])
def test_number_takes_ascii_digits_only_with_a_length_cap(text, value):
    assert httphead.number(text) == value


def test_number_takes_a_shorter_cap():
    assert httphead.number("1234567", 7) == 1234567
    assert httphead.number("12345678", 7) is None
