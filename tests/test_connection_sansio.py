"""The compiled Connection and Hub driven without sockets: bytes in through
the BufferedProtocol hooks, bytes out through a transport that records what
it is given, time moved by hand. The frame rules, the fan-out's one write
per member per turn, the close handshake, the slow-client policies and the
deadlines of the sweep, each checked on the exact bytes.

A transport without a socket makes the connection write through
`transport.write`, the path TLS connections take; the plain-TCP `sendmsg`
path is exercised by the end-to-end tests."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import socket
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrelay import handshake
from fastrelay._frames import CloseCode, Connection, Hub, Opcode, State
from fastrelay._testing import FrameReader, encode_frame
from fastrelay.upgrade import Gate, GateSettings

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
REQUEST = (
    "GET {room} HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class RecordingTransport:
    """What the connection asks of a transport, recorded."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.objects: list[object] = []  # what write() was given, as given
        self.buffered = 0  # what get_write_buffer_size() reports
        self.closed = False
        self.eof_written = False  # our side half-closed (write_eof)
        self.aborted = False
        self.reading = True  # pause_reading() / resume_reading()
        self.limits: tuple[int, int] | None = None  # set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        assert not (self.ended or self.aborted), "write after the end"
        self.objects.append(data)
        self.writes.append(bytes(data))

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        self.limits = (high, low)

    def pause_reading(self) -> None:
        assert self.reading, "paused twice"
        self.reading = False

    def resume_reading(self) -> None:
        assert not self.reading, "resumed while reading"
        self.reading = True

    def can_write_eof(self) -> bool:
        return True  # like a plain TCP transport

    def write_eof(self) -> None:
        self.eof_written = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    @property
    def ended(self) -> bool:
        """Our side is done: half-closed or closed."""
        return self.eof_written or self.closed

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def take(self) -> bytes:
        out = b"".join(self.writes)
        self.writes.clear()
        return out


class ManualLoop:
    """What the hub asks of an event loop; time moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.soon: list[Any] = []
        self.errors: list[dict[str, Any]] = []

    def time(self) -> float:
        return self.now

    def call_soon(self, callback: Any, *args: Any) -> None:
        self.soon.append((callback, args))

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        self.errors.append(context)

    def run_turn(self) -> None:
        while self.soon:
            callback, args = self.soon.pop(0)
            callback(*args)


class GrantingGate(Gate):
    """The real gate, then a grant narrowed as an access check would: the
    test sets `grant` (Accept fields) before a client joins."""

    def __init__(self, settings: GateSettings, log: logging.Logger) -> None:
        super().__init__(settings, log)
        self.grant: dict[str, Any] = {}

    def decide(self, head: memoryview, scan_from: int, conn: Connection) -> Any:
        decision = super().decide(head, scan_from, conn)
        if isinstance(decision, handshake.Accept):
            return dataclasses.replace(decision, **self.grant)
        return decision


class Relay:
    """A hub with the real gate, and helpers to add clients and feed them."""

    def __init__(self, **hub_options: Any) -> None:
        self.loop = ManualLoop()
        settings = GateSettings(limits=handshake.Limits(), max_connections=0, demo_page=None)
        self.gate = GrantingGate(settings, logging.getLogger("test"))
        options: dict[str, Any] = {
            "handshake_timeout": 10.0,
            "close_timeout": 5.0,
            "ping_interval": 0.0,
        }
        options.update(hub_options)
        self.hub = Hub(self.loop, self.gate, **options)

    def connect(self) -> tuple[Connection, RecordingTransport]:
        conn = Connection(self.hub)
        transport = RecordingTransport()
        conn.connection_made(transport)
        return conn, transport

    def join(self, room: str = "/r") -> tuple[Connection, RecordingTransport]:
        conn, transport = self.connect()
        feed(conn, REQUEST.format(room=room).encode())
        self.loop.run_turn()
        assert transport.take().startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        assert conn.state == State.OPEN
        return conn, transport

    def sweep(self, seconds: float) -> int:
        self.loop.now += seconds
        timed_out: int = self.hub.sweep(self.loop.now)
        self.loop.run_turn()
        return timed_out


def feed(conn: Connection, data: bytes, step: int = 0) -> None:
    """Deliver data as the event loop would, in reads of `step` bytes (all
    at once when 0)."""
    step = step or len(data) or 1
    start = 0
    while start < len(data):
        buffer = conn.get_buffer(step)
        chunk = data[start : start + min(step, len(buffer))]
        buffer[: len(chunk)] = chunk
        conn.buffer_updated(len(chunk))
        start += len(chunk)


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    return encode_frame(opcode, payload, fin, mask=os.urandom(4))


def frames_of(data: bytes) -> list[tuple[bool, int, bytes]]:
    return FrameReader(require_mask=False).feed(data)


def close_body(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


# -- the upgrade --------------------------------------------------------------


def test_request_a_byte_at_a_time_then_frames_in_the_same_read() -> None:
    relay = Relay()
    conn, transport = relay.connect()
    request = REQUEST.format(room="/a%20b").encode()
    feed(conn, request[:-1], step=1)
    assert conn.state == State.HANDSHAKE and transport.writes == []
    # The request's last byte and a message arrive together: nothing is lost.
    feed(conn, request[-1:] + client_frame(Opcode.TEXT, b"hello"))
    relay.loop.run_turn()
    out = transport.take()
    head, _, rest = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    assert frames_of(rest) == [(True, Opcode.TEXT, b"hello")]
    assert list(relay.hub.rooms) == ["/a b"]


def test_on_plain_tcp_the_101_goes_to_the_socket_without_waiting_for_the_flush() -> None:
    """An idle connection never takes part in a flush: its 101 is sent
    from the read that completed the request, then a message that came
    in the same read follows through the flush, in order."""
    ours, theirs = socket.socketpair()

    class Plain(RecordingTransport):
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return ours if name == "socket" else super().get_extra_info(name, default)

    try:
        theirs.setblocking(False)
        relay = Relay()
        idle, idle_transport = Connection(relay.hub), Plain()
        idle.connection_made(idle_transport)
        feed(idle, REQUEST.format(room="/p").encode())
        assert theirs.recv(4096).startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        assert relay.loop.soon == [] and idle_transport.writes == []
        chatty = Connection(relay.hub)
        chatty.connection_made(Plain())
        feed(chatty, REQUEST.format(room="/p").encode() + client_frame(Opcode.TEXT, b"hi"))
        assert theirs.recv(4096).startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        relay.loop.run_turn()
        # Both members share one socket here: the message, once per member.
        assert frames_of(theirs.recv(4096)) == [(True, Opcode.TEXT, b"hi")] * 2
    finally:
        ours.close()
        theirs.close()


def test_a_refusal_is_written_then_the_connection_closes() -> None:
    relay = Relay()
    conn, transport = relay.connect()
    feed(conn, b"POST / HTTP/1.1\r\nHost: x\r\n\r\n")
    relay.loop.run_turn()
    assert transport.take().startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert transport.ended and conn.state == State.CLOSED
    assert relay.gate.failures == {"method_not_allowed": 1}
    assert relay.hub.connected == 0


def test_the_gate_decides_and_the_connection_acts() -> None:
    """The seam an access check uses: the decision is a value."""

    class RefuseRoomB(Gate):
        def decide(self, head: memoryview, scan_from: int, conn: Connection) -> Any:
            decision = super().decide(head, scan_from, conn)
            if isinstance(decision, handshake.Accept) and decision.room == "/b":
                return handshake.refuse("forbidden_origin", "not this room")
            return decision

    relay = Relay()
    relay.hub = Hub(relay.loop, RefuseRoomB(relay.gate.settings, relay.gate.log))
    relay.join("/a")
    conn, transport = relay.connect()
    feed(conn, REQUEST.format(room="/b").encode())
    relay.loop.run_turn()
    assert transport.take().startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert transport.ended and list(relay.hub.rooms) == ["/a"]


# -- frame rules -----------------------------------------------------------------


def unmasked(opcode: int, payload: bytes) -> bytes:
    return encode_frame(opcode, payload)


VIOLATIONS = {
    "unmasked": (unmasked(Opcode.TEXT, b"x"), CloseCode.PROTOCOL_ERROR),
    "reserved bits": (
        bytes([0xC1]) + client_frame(Opcode.TEXT, b"x")[1:],
        CloseCode.PROTOCOL_ERROR,
    ),
    "reserved opcode": (client_frame(0x3, b"x"), CloseCode.PROTOCOL_ERROR),
    "reserved control opcode": (client_frame(0xB, b""), CloseCode.PROTOCOL_ERROR),
    "fragmented control": (client_frame(Opcode.PING, b"", fin=False), CloseCode.PROTOCOL_ERROR),
    "control too long": (client_frame(Opcode.PING, b"x" * 126), CloseCode.PROTOCOL_ERROR),
    "lone continuation": (client_frame(Opcode.CONTINUATION, b"x"), CloseCode.PROTOCOL_ERROR),
    "message inside a message": (
        client_frame(Opcode.TEXT, b"a", fin=False) + client_frame(Opcode.TEXT, b"b"),
        CloseCode.PROTOCOL_ERROR,
    ),
    "invalid UTF-8": (client_frame(Opcode.TEXT, b"ok \xc3\x28"), CloseCode.INVALID_PAYLOAD_DATA),
    "UTF-8 cut at the end": (
        client_frame(Opcode.TEXT, b"\xe2\x82"),
        CloseCode.INVALID_PAYLOAD_DATA,
    ),
    "too big": (client_frame(Opcode.BINARY, b"x" * 1025), CloseCode.MESSAGE_TOO_BIG),
    "too big in fragments": (
        client_frame(Opcode.BINARY, b"x" * 1000, fin=False)
        + client_frame(Opcode.CONTINUATION, b"x" * 100),
        CloseCode.MESSAGE_TOO_BIG,
    ),
    "1-byte close": (client_frame(Opcode.CLOSE, b"\x03"), CloseCode.PROTOCOL_ERROR),
    "reserved close code": (client_frame(Opcode.CLOSE, close_body(1005)), CloseCode.PROTOCOL_ERROR),
    "close reason not UTF-8": (
        client_frame(Opcode.CLOSE, close_body(1000, b"\xff")),
        CloseCode.INVALID_PAYLOAD_DATA,
    ),
}


@pytest.mark.parametrize("name", list(VIOLATIONS))
def test_a_violation_closes_with_its_code_and_spares_the_room(name: str) -> None:
    data, code = VIOLATIONS[name]
    relay = Relay(max_message_size=1024)
    bystander, bystander_out = relay.join()
    conn, transport = relay.join()
    feed(conn, data)
    relay.loop.run_turn()
    frames = frames_of(transport.take())
    assert frames[-1][1] == Opcode.CLOSE
    assert int.from_bytes(frames[-1][2][:2], "big") == code
    # Nothing was relayed, and the connection is closed after its close frame
    # (RFC 6455 section 7.1.7).
    assert all(opcode == Opcode.CLOSE for _, opcode, _ in frames)
    assert transport.ended and conn.state == State.CLOSED and conn.close_code == code
    assert relay.hub.protocol_errors == 1 and relay.hub.counters()["closes"] == {code: 1}
    assert bystander_out.writes == [] and len(relay.hub.rooms["/r"]) == 1
    # The bystander is still served.
    feed(bystander, client_frame(Opcode.TEXT, b"still here"))
    relay.loop.run_turn()
    assert frames_of(bystander_out.take()) == [(True, Opcode.TEXT, b"still here")]


def test_a_ping_is_answered_with_its_payload() -> None:
    relay = Relay()
    conn, transport = relay.join()
    feed(conn, client_frame(Opcode.PING, b"are you there"))
    relay.loop.run_turn()
    assert frames_of(transport.take()) == [(True, Opcode.PONG, b"are you there")]


def test_fragments_with_interleaved_control_frames_become_one_message() -> None:
    relay = Relay()
    conn, transport = relay.join()
    stream = (
        client_frame(Opcode.TEXT, "h\u00e9".encode()[:2], fin=False)
        + client_frame(Opcode.PING, b"p")
        + client_frame(Opcode.CONTINUATION, "h\u00e9".encode()[2:] + b"llo")
    )
    feed(conn, stream, step=3)
    relay.loop.run_turn()
    assert frames_of(transport.take()) == [
        (True, Opcode.PONG, b"p"),
        (True, Opcode.TEXT, "h\u00e9llo".encode()),
    ]


# -- fan-out ---------------------------------------------------------------------


def test_every_member_gets_one_write_per_turn_holding_every_frame() -> None:
    relay = Relay()
    members = [relay.join() for _ in range(3)]
    outsider, outsider_out = relay.join("/other")
    sender = members[0][0]
    messages = [(Opcode.TEXT, b"one"), (Opcode.BINARY, b"\x00\x01"), (Opcode.TEXT, b"")]
    feed(sender, b"".join(client_frame(op, data) for op, data in messages))
    relay.loop.run_turn()
    expected = [(True, op, data) for op, data in messages]
    for _, transport in members:
        # The frames of a turn are adjacent in the arena: one write each.
        assert len(transport.writes) == 1
        assert frames_of(transport.take()) == expected
    assert outsider_out.writes == []
    counters = relay.hub.counters()
    assert counters["messages_total"] == 3 and counters["deliveries_total"] == 9


def test_without_echo_the_sender_is_left_out() -> None:
    relay = Relay(echo=False)
    (sender, sender_out), (_, other_out) = relay.join(), relay.join()
    feed(sender, client_frame(Opcode.TEXT, b"hi"))
    relay.loop.run_turn()
    assert sender_out.writes == []
    assert frames_of(other_out.take()) == [(True, Opcode.TEXT, b"hi")]


def test_rooms_vanish_with_their_last_member() -> None:
    relay = Relay()
    (a, _), (b, _) = relay.join("/x"), relay.join("/x")
    assert len(relay.hub.rooms["/x"]) == 2
    a.connection_lost(None)
    assert len(relay.hub.rooms["/x"]) == 1
    b.connection_lost(None)
    assert relay.hub.rooms == {} and relay.hub.clients_count == 0
    assert relay.hub.counters()["closes"] == {CloseCode.ABNORMAL_CLOSURE: 2}


def test_a_closed_connection_is_freed_without_the_cyclic_gc() -> None:
    """Connection is not GC-tracked, so no cycle may go through it: the one
    a real transport makes (it holds its protocol) ends in connection_lost,
    and reference counting alone frees both."""
    freed: list[str] = []

    class Transport(RecordingTransport):
        def __del__(self) -> None:
            freed.append("transport")

    relay = Relay()
    conn = Connection(relay.hub)
    transport = Transport()
    transport.protocol = conn  # type: ignore[attr-defined]
    conn.connection_made(transport)
    feed(conn, REQUEST.format(room="/r").encode())
    relay.loop.run_turn()
    assert conn.state == State.OPEN and not gc.is_tracked(conn)
    gc.disable()
    try:
        conn.connection_lost(None)
        del conn, transport
        assert freed == ["transport"]
    finally:
        gc.enable()
    assert relay.hub.clients_count == 0


# -- closing -----------------------------------------------------------------------


def test_the_peers_close_is_echoed_then_tcp_closes() -> None:
    relay = Relay()
    conn, transport = relay.join()
    feed(conn, client_frame(Opcode.CLOSE, close_body(4321, b"see you")))
    relay.loop.run_turn()
    assert frames_of(transport.take()) == [(True, Opcode.CLOSE, close_body(4321, b"see you"))]
    # RFC 6455 section 7.1.1: the server closes the TCP connection first.
    assert transport.ended and conn.close_code == 4321 and relay.hub.rooms == {}


def test_an_empty_close_is_answered_with_an_empty_close() -> None:
    relay = Relay()
    conn, transport = relay.join()
    feed(conn, client_frame(Opcode.CLOSE, b""))
    relay.loop.run_turn()
    assert frames_of(transport.take()) == [(True, Opcode.CLOSE, b"")]
    assert conn.close_code == CloseCode.NO_STATUS_RECEIVED


def test_shutdown_close_waits_for_the_peer_then_its_deadline() -> None:
    relay = Relay(close_timeout=5.0)
    (polite, polite_out), (silent, silent_out) = relay.join(), relay.join()
    relay.hub.close_all(CloseCode.GOING_AWAY, "bye")
    relay.loop.run_turn()
    for conn, transport in ((polite, polite_out), (silent, silent_out)):
        assert frames_of(transport.take()) == [(True, Opcode.CLOSE, close_body(1001, b"bye"))]
        assert conn.state == State.CLOSING and not transport.ended
    # Data still in flight after our close is discarded (section 5.5.1).
    feed(polite, client_frame(Opcode.TEXT, b"late") + client_frame(Opcode.CLOSE, close_body(1001)))
    relay.loop.run_turn()
    assert polite_out.writes == [] and polite_out.ended
    assert relay.sweep(4.0) == 0 and not silent_out.aborted
    relay.sweep(1.5)
    assert silent_out.aborted and silent.state == State.CLOSED


def test_after_a_failure_the_client_is_read_and_dropped_within_a_budget() -> None:
    """Lingering close: our close frame, then a half-close (write_eof), then
    what the client still sends is discarded; past 8 x max(max_message_size,
    1 MiB) the connection is reset."""
    relay = Relay(max_message_size=1024)
    conn, transport = relay.join()
    feed(conn, unmasked(Opcode.TEXT, b"x"))
    relay.loop.run_turn()
    assert frames_of(transport.take())[-1][1] == Opcode.CLOSE
    assert transport.eof_written and not transport.closed
    chunk = bytes(256 * 1024)
    for _ in range(32):  # 8 MiB: the whole budget
        feed(conn, chunk)
    assert not transport.aborted and transport.writes == []
    feed(conn, b"x")
    assert transport.aborted


# -- slow clients --------------------------------------------------------------------


def test_backpressure_pauses_the_room_until_the_slow_member_drains() -> None:
    relay = Relay(max_backlog=1 << 20)
    (_, sender_out), (reader, reader_out) = relay.join(), relay.join()
    assert reader_out.limits == (1 << 18, 1 << 16)  # a quarter, a sixteenth of max_backlog
    # The transport reports the reader over its high-water mark.
    reader_out.buffered = 300_000
    reader.pause_writing()
    assert not sender_out.reading and not reader_out.reading
    late, late_out = relay.join()  # a newcomer waits with the room
    assert not late_out.reading
    reader_out.buffered = 1000
    reader.resume_writing()
    assert sender_out.reading and reader_out.reading and late_out.reading
    assert reader.state == State.OPEN and relay.hub.slow_disconnects == 0


def test_backpressure_closes_a_member_that_makes_no_progress() -> None:
    relay = Relay(slow_client_timeout=5.0)
    (_, sender_out), (stuck, stuck_out) = relay.join(), relay.join()
    (slow, slow_out) = relay.join()
    stuck_out.buffered = slow_out.buffered = 300_000
    stuck.pause_writing()
    slow.pause_writing()
    relay.sweep(3.0)
    slow_out.buffered = 200_000  # the slow one reads a little
    relay.sweep(2.5)
    assert frames_of(stuck_out.take()) == [
        (True, Opcode.CLOSE, close_body(1008, b"reader stalled"))
    ]
    assert stuck.state == State.CLOSED and slow.state == State.OPEN
    assert relay.hub.slow_disconnects == 1
    assert not sender_out.reading  # the slow one still holds the room
    relay.sweep(5.5)  # ... and made no progress since
    assert slow.state == State.CLOSED
    assert sender_out.reading  # the room goes on


def test_disconnect_policy_closes_a_member_over_its_backlog() -> None:
    relay = Relay(max_backlog=1024, slow_client_policy="disconnect")
    (sender, sender_out), (slow, slow_out) = relay.join(), relay.join()
    slow_out.buffered = 4096  # the transport holds more than the limit
    feed(sender, client_frame(Opcode.BINARY, b"x" * 100))
    relay.loop.run_turn()
    frames = frames_of(slow_out.take())
    assert frames[0] == (True, Opcode.BINARY, b"x" * 100)
    assert frames[1] == (True, Opcode.CLOSE, close_body(1008, b"backlog limit exceeded"))
    assert slow_out.ended and slow.close_code == CloseCode.POLICY_VIOLATION
    assert relay.hub.slow_disconnects == 1
    # The room goes on without it.
    feed(sender, client_frame(Opcode.BINARY, b"y"))
    relay.loop.run_turn()
    assert frames_of(sender_out.take())[-1] == (True, Opcode.BINARY, b"y")
    assert len(relay.hub.rooms["/r"]) == 1


def test_drop_policy_skips_a_member_until_it_drains() -> None:
    relay = Relay(max_backlog=1024, slow_client_policy="drop")
    (sender, _), (slow, slow_out) = relay.join(), relay.join()
    slow_out.buffered = 4096
    feed(sender, client_frame(Opcode.BINARY, b"first"))
    relay.loop.run_turn()
    feed(sender, client_frame(Opcode.BINARY, b"dropped"))
    relay.loop.run_turn()
    assert frames_of(slow_out.take()) == [(True, Opcode.BINARY, b"first")]
    assert relay.hub.slow_drops == 1 and slow.state == State.OPEN
    slow_out.buffered = 0  # drained
    feed(sender, client_frame(Opcode.BINARY, b"again"))
    relay.loop.run_turn()
    assert frames_of(slow_out.take()) == [(True, Opcode.BINARY, b"again")]


# -- deadlines ---------------------------------------------------------------------


def test_an_unfinished_handshake_is_dropped_at_its_deadline() -> None:
    relay = Relay(handshake_timeout=2.0)
    conn, transport = relay.connect()
    feed(conn, b"GET / HTTP/1.1\r\nHost:")
    assert relay.sweep(1.0) == 0 and not transport.aborted
    assert relay.sweep(1.5) == 1 and transport.aborted


def test_keepalive_pings_and_closes_whoever_does_not_answer() -> None:
    relay = Relay(ping_interval=10.0, ping_timeout=3.0)
    (answers, answers_out), (silent, silent_out) = relay.join(), relay.join()
    relay.sweep(10.5)
    for transport in (answers_out, silent_out):
        assert frames_of(transport.take()) == [(True, Opcode.PING, b"")]
    feed(answers, client_frame(Opcode.PONG, b""))
    relay.sweep(3.0)
    assert answers_out.writes == [] and answers.state == State.OPEN
    assert frames_of(silent_out.take()) == [
        (True, Opcode.CLOSE, close_body(1011, b"keepalive ping timeout"))
    ]
    assert silent.state == State.CLOSING


# -- what the gate may grant: read-only members, expiry; publishing from outside ----


def test_a_read_only_member_receives_but_is_closed_when_it_sends() -> None:
    relay = Relay()
    speaker, _ = relay.join()
    relay.gate.grant = {"read_only": True}
    listener, listener_out = relay.join()
    assert listener.read_only
    feed(speaker, client_frame(Opcode.TEXT, b"news"))
    relay.loop.run_turn()
    assert frames_of(listener_out.take()) == [(True, Opcode.TEXT, b"news")]
    # Pings are fine; a data frame is not.
    feed(listener, client_frame(Opcode.PING, b""))
    feed(listener, client_frame(Opcode.TEXT, b"me too"))
    relay.loop.run_turn()
    assert frames_of(listener_out.take()) == [
        (True, Opcode.PONG, b""),
        (True, Opcode.CLOSE, close_body(1008, b"read-only")),
    ]
    assert listener.close_code == CloseCode.POLICY_VIOLATION


def test_a_grant_that_expires_closes_the_connection_at_its_time() -> None:
    relay = Relay()
    relay.gate.grant = {"expires_at": relay.loop.now + 30.0}
    conn, transport = relay.join()
    relay.sweep(29.0)
    assert conn.state == State.OPEN and transport.writes == []
    relay.sweep(1.5)
    assert frames_of(transport.take()) == [(True, Opcode.CLOSE, close_body(1008, b"token expired"))]
    assert conn.state == State.CLOSING


def test_publish_delivers_to_the_rooms_members_once_encoded() -> None:
    relay = Relay(max_message_size=1024)
    members = [relay.join("/news") for _ in range(3)]
    assert relay.hub.publish("/news", True, "héllo".encode()) == 3
    assert relay.hub.publish("/nobody", False, b"x") == 0
    relay.loop.run_turn()
    for _, transport in members:
        assert frames_of(transport.take()) == [(True, Opcode.TEXT, "héllo".encode())]
    with pytest.raises(ValueError):
        relay.hub.publish("/news", False, bytes(1025))


# -- the backplane seam ------------------------------------------------------------


class RecordingBackplane:
    """What the hub hands a backplane, recorded."""

    def __init__(self, ready: bool = True) -> None:
        self.batches: list[list[tuple[str, bytes, int]]] = []
        self.events: list[tuple[str, str]] = []
        self.ready = ready  # what room_opened answers: subscribed already?

    def send_batch(self, batch: list[tuple[str, bytes, int]]) -> None:
        self.batches.append(batch)

    def room_opened(self, room: str) -> bool:
        self.events.append(("opened", room))
        return self.ready

    def room_closed(self, room: str) -> None:
        self.events.append(("closed", room))


def packet_body(*messages: tuple[int, bytes]) -> bytes:
    """A backplane packet body: per message opcode, 4-byte length, payload."""
    return b"".join(struct.pack(">BI", op, len(p)) + p for op, p in messages)


def test_local_messages_are_shared_once_per_turn_and_remote_ones_are_not() -> None:
    relay = Relay(echo=False)
    backplane = relay.hub.backplane = RecordingBackplane()
    (sender, sender_out), (other, other_out) = relay.join("/b"), relay.join("/b")
    assert backplane.events == [("opened", "/b")]
    feed(sender, client_frame(Opcode.TEXT, b"one") + client_frame(Opcode.BINARY, b"two"))
    relay.loop.run_turn()
    body = packet_body((Opcode.TEXT, b"one"), (Opcode.BINARY, b"two"))
    assert backplane.batches == [[("/b", body, 2)]]
    # From another process (a packet: 9 bytes of header, then a body): every
    # local member gets each message (the sender is elsewhere), and nothing
    # is published again.
    remote = b"H" * 9 + packet_body((Opcode.TEXT, b"remote"), (Opcode.BINARY, b""))
    assert relay.hub.deliver_packet("/b", remote, 9) == 2
    assert relay.hub.deliver_packet("/nobody", remote, 9) == 2
    relay.loop.run_turn()
    assert len(backplane.batches) == 1
    # Counted where they entered: the two local ones only, so that a total
    # over processes counts each message once.
    assert relay.hub.counters()["messages_total"] == 2
    assert frames_of(sender_out.take()) == [
        (True, Opcode.TEXT, b"remote"),
        (True, Opcode.BINARY, b""),
    ]
    assert frames_of(other_out.take())[-2:] == [
        (True, Opcode.TEXT, b"remote"),
        (True, Opcode.BINARY, b""),
    ]
    sender.connection_lost(None)
    other.connection_lost(None)
    assert backplane.events == [("opened", "/b"), ("closed", "/b")]


def test_a_truncated_packet_delivers_nothing() -> None:
    relay = Relay()
    relay.hub.backplane = RecordingBackplane()
    member, out = relay.join("/t")
    body = packet_body((Opcode.TEXT, b"first"), (Opcode.TEXT, b"second"))
    for cut in (len(body) - 1, len(body) - 7, 3):
        with pytest.raises(ValueError, match="truncated"):
            relay.hub.deliver_packet("/t", body[:cut], 0)
    relay.loop.run_turn()
    assert frames_of(out.take()) == []


@settings(max_examples=300, deadline=None)
@given(
    messages=st.lists(
        st.tuples(st.sampled_from([0, 1, 2, 8, 9, 255]), st.binary(max_size=300)), max_size=6
    ),
    garbage=st.binary(max_size=40),
    start=st.integers(min_value=-2, max_value=12),
)
def test_any_packet_is_delivered_whole_or_refused(
    messages: list[tuple[int, bytes]], garbage: bytes, start: int
) -> None:
    """Whatever arrives from Redis (well-formed bodies, any opcode byte,
    garbage after them, a start anywhere): each text and binary message is
    relayed as it was, or the packet is refused with ValueError and nothing
    is relayed. Run under ASan in .ci/sanitizers.sh."""
    relay = Relay()
    relay.hub.backplane = RecordingBackplane()
    member, out = relay.join("/p")
    packet = b"H" * 9 + packet_body(*messages) + garbage
    try:
        count = relay.hub.deliver_packet("/p", packet, start)
    except ValueError:
        relay.loop.run_turn()
        assert frames_of(out.take()) == []
        return
    relay.loop.run_turn()
    got = frames_of(out.take())
    assert count >= len(got)
    if start == 9 and not garbage:
        assert count == len(messages)
        assert got == [(True, op, p) for op, p in messages if op in (Opcode.TEXT, Opcode.BINARY)]


def test_a_busy_room_is_published_in_packets_of_bounded_size() -> None:
    relay = Relay(max_message_size=300_000)
    backplane = relay.hub.backplane = RecordingBackplane()
    sender, _ = relay.join("/big")
    payloads = [bytes([i]) * 100_000 for i in range(5)] + [b"z" * 300_000, b"tail"]
    feed(sender, b"".join(client_frame(Opcode.BINARY, p) for p in payloads))
    relay.loop.run_turn()
    (batch,) = backplane.batches
    # 256 KiB per packet at most, unless one message alone is bigger; in order.
    assert [count for _, _, count in batch] == [2, 2, 1, 1, 1]
    assert all(len(body) <= 262_144 or count == 1 for _, body, count in batch)
    assert b"".join(body for _, body, _ in batch) == packet_body(
        *((Opcode.BINARY, p) for p in payloads)
    )


def test_a_publish_keeps_its_place_after_a_room_empties() -> None:
    relay = Relay()
    backplane = relay.hub.backplane = RecordingBackplane()
    sender, _ = relay.join("/gone")
    feed(sender, client_frame(Opcode.TEXT, b"last words"))
    sender.connection_lost(None)  # the room empties within the turn
    assert relay.hub.publish("/gone", True, b"after") == 0
    relay.loop.run_turn()
    assert backplane.batches == [
        [
            ("/gone", packet_body((Opcode.TEXT, b"last words")), 1),
            ("/gone", packet_body((Opcode.TEXT, b"after")), 1),
        ]
    ]


def test_a_lone_member_without_echo_still_reaches_other_processes() -> None:
    relay = Relay(echo=False)
    backplane = relay.hub.backplane = RecordingBackplane()
    sender, sender_out = relay.join("/solo")
    feed(sender, client_frame(Opcode.TEXT, b"anyone?"))
    relay.loop.run_turn()
    assert sender_out.writes == []
    assert backplane.batches == [[("/solo", packet_body((Opcode.TEXT, b"anyone?")), 1)]]


# -- text validated as it arrives ---------------------------------------------------


def test_invalid_utf8_early_in_a_long_text_frame_closes_at_once() -> None:
    relay = Relay()
    conn, transport = relay.join()
    whole = client_frame(Opcode.TEXT, b"fine so far \xff" + b"x" * 500_000)
    feed(conn, whole[:2048])  # the frame is far from complete
    relay.loop.run_turn()
    frames = frames_of(transport.take())
    assert frames == [(True, Opcode.CLOSE, close_body(1007, b"invalid UTF-8"))]
    assert conn.state == State.CLOSED


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(min_size=0, max_size=3000),
    pieces=st.integers(min_value=1, max_value=4),
    cuts=st.lists(st.integers(min_value=1, max_value=997), min_size=1, max_size=12),
)
def test_text_checked_as_it_arrives_is_relayed_intact(
    text: str, pieces: int, cuts: list[int]
) -> None:
    """Any split of the reads, any fragmentation, multi-byte characters cut
    anywhere: the bytes relayed are the bytes sent."""
    relay = Relay(max_message_size=1 << 20)
    conn, transport = relay.join()
    data = text.encode()
    step = max(1, len(data) // pieces)
    parts = [data[i : i + step] for i in range(0, len(data), step)] or [b""]
    stream = b"".join(
        client_frame(Opcode.TEXT if i == 0 else Opcode.CONTINUATION, part, fin=i == len(parts) - 1)
        for i, part in enumerate(parts)
    )
    start = 0
    for cut in cuts:
        feed(conn, stream[start : start + cut])
        start += cut
    feed(conn, stream[start:])
    relay.loop.run_turn()
    assert frames_of(transport.take()) == [(True, Opcode.TEXT, data)]


def test_a_new_room_holds_its_members_output_until_the_subscription_is_confirmed() -> None:
    """Nobody hears "joined" (the 101) before messages from other processes
    can reach them; what the room says meanwhile follows the 101, in order."""
    relay = Relay()
    relay.hub.backplane = RecordingBackplane(ready=False)
    first, first_out = relay.connect()
    feed(first, REQUEST.format(room="/new").encode())
    second, second_out = relay.connect()
    feed(second, REQUEST.format(room="/new").encode() + client_frame(Opcode.TEXT, b"early"))
    relay.loop.run_turn()
    assert first_out.writes == [] and second_out.writes == []
    assert relay.hub.rooms["/new"].pending
    relay.hub.room_ready("/new")
    for transport in (first_out, second_out):
        head, _, rest = transport.take().partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        assert frames_of(rest) == [(True, Opcode.TEXT, b"early")]
    # Later output follows, in order.
    feed(first, client_frame(Opcode.TEXT, b"later"))
    relay.loop.run_turn()
    assert frames_of(second_out.take()) == [(True, Opcode.TEXT, b"later")]


def test_losing_the_backplane_releases_rooms_waiting_for_it() -> None:
    relay = Relay()
    relay.hub.backplane = RecordingBackplane(ready=False)
    conn, transport = relay.connect()
    feed(conn, REQUEST.format(room="/wait").encode())
    relay.loop.run_turn()
    assert transport.writes == []
    relay.hub.release_pending_rooms()
    assert transport.take().startswith(b"HTTP/1.1 101 ")
    assert not relay.hub.rooms["/wait"].pending


def test_an_empty_first_fragment_then_a_continuation() -> None:
    """A message whose first fragment is empty: nothing to copy yet (the
    reassembly buffer does not exist); regression for a memcpy to NULL found
    by UBSan."""
    relay = Relay()
    conn, transport = relay.join()
    feed(conn, client_frame(Opcode.BINARY, b"", fin=False))
    feed(conn, client_frame(Opcode.CONTINUATION, b"", fin=False))
    feed(conn, client_frame(Opcode.CONTINUATION, b"tail"))
    relay.loop.run_turn()
    assert frames_of(transport.take()) == [(True, Opcode.BINARY, b"tail")]


def test_a_burst_of_big_messages_is_not_a_slow_reader() -> None:
    """Under backpressure, one turn may queue a few whole messages beyond
    max_backlog for a member that reads: it waits, it is not closed."""
    relay = Relay(max_backlog=1 << 20, max_message_size=1 << 20)
    (sender, _), (reader, reader_out) = relay.join(), relay.join()
    reader_out.buffered = 3 << 20  # three 1 MiB messages still queued
    feed(sender, client_frame(Opcode.BINARY, bytes(1 << 20)))
    relay.loop.run_turn()
    assert reader.state == State.OPEN and relay.hub.slow_disconnects == 0
    reader_out.buffered = (5 << 20) + 1  # past max_backlog + 4 x max_message_size
    feed(sender, client_frame(Opcode.BINARY, b"x"))
    relay.loop.run_turn()
    assert reader.state == State.CLOSED and relay.hub.slow_disconnects == 1


def test_a_big_message_is_one_object_for_every_member_not_a_copy_each() -> None:
    """What a socket could not take goes to the transports; a big message
    goes as one bytes object shared by all members (the transport keeps a
    reference), small frames around it are copied together."""
    relay = Relay(max_message_size=1 << 20)
    members = [relay.join() for _ in range(3)]
    sender = members[0][0]
    big = bytes(range(256)) * 400  # 100 KB
    feed(sender, client_frame(Opcode.TEXT, b"before") + client_frame(Opcode.BINARY, big))
    relay.loop.run_turn()
    shared = [transport.objects[-1] for _, transport in members]
    assert shared[0] is shared[1] is shared[2]
    for _, transport in members:
        assert frames_of(transport.take()) == [
            (True, Opcode.TEXT, b"before"),
            (True, Opcode.BINARY, big),
        ]
