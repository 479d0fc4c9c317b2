"""The compiled module's memory handling, for the sanitizer run
(.ci/sanitizers.sh): regression tests for what it found, and the buffer
paths that the other tests of that run do not reach. Each passes on any
correct build; under the AddressSanitizer + UBSan build an out-of-bounds
access, a use after free, a leak or undefined behaviour on these paths
aborts the process.

Found: a fragmented message whose first frames carry no payload made the
reassembly copy zero bytes into a buffer that did not exist yet (memcpy to
NULL, undefined behaviour even for zero bytes; UBSan: "null pointer passed
as argument 1" in Connection.append_fragment).

Reached here only: the reassembly buffer freed after a big message, a frame
larger than the shared read buffer followed by part of the next one, the
arena given back after a turn over 4 MiB, a partial sendmsg over several
slices (the rest queued in the transport), and a write to a vanished peer
(EPIPE: the connection is dropped)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from test_connection_sansio import (
    REQUEST,
    RecordingTransport,
    Relay,
    client_frame,
    feed,
    frames_of,
)

from fastrelay._frames import Connection, Opcode, State

# (frames the client sends, the one message every member must get)
EMPTY_FRAGMENTS = {
    "empty first fragment": (
        [(Opcode.TEXT, b"", False), (Opcode.CONTINUATION, b"hello", True)],
        (Opcode.TEXT, b"hello"),
    ),
    "empty first and middle fragments": (
        [
            (Opcode.BINARY, b"", False),
            (Opcode.CONTINUATION, b"", False),
            (Opcode.CONTINUATION, b"\x00\x01", True),
        ],
        (Opcode.BINARY, b"\x00\x01"),
    ),
    "empty fragments only": (
        [(Opcode.TEXT, b"", False), (Opcode.CONTINUATION, b"", True)],
        (Opcode.TEXT, b""),
    ),
    "empty middle fragment": (
        [
            (Opcode.TEXT, b"ab", False),
            (Opcode.CONTINUATION, b"", False),
            (Opcode.CONTINUATION, b"cd", True),
        ],
        (Opcode.TEXT, b"abcd"),
    ),
}


@pytest.mark.parametrize("name", list(EMPTY_FRAGMENTS))
@pytest.mark.parametrize("step", [0, 1], ids=["one read", "byte by byte"])
def test_empty_fragments_reassemble(name: str, step: int) -> None:
    frames, (opcode, payload) = EMPTY_FRAGMENTS[name]
    relay = Relay()
    sender, sender_out = relay.join()
    member, member_out = relay.join()
    data = b"".join(client_frame(op, body, fin) for op, body, fin in frames)
    feed(sender, data, step)
    relay.loop.run_turn()
    assert frames_of(member_out.take()) == [(True, opcode, payload)]
    assert frames_of(sender_out.take()) == [(True, opcode, payload)]  # echo
    # The connection is still usable: the next message is relayed whole.
    feed(sender, client_frame(Opcode.TEXT, b"next"))
    relay.loop.run_turn()
    assert frames_of(member_out.take()) == [(True, Opcode.TEXT, b"next")]


def test_a_big_fragmented_message_then_small_ones() -> None:
    """Over 64 KiB reassembled: the buffer is freed after the message and
    a new one grows from nothing for the next."""
    relay = Relay(max_message_size=1 << 20)
    sender, _ = relay.join()
    member, member_out = relay.join()
    big = bytes(range(256)) * 1024  # 256 KiB
    pieces = [big[:1000], big[1000:200_000], big[200_000:]]
    data = client_frame(Opcode.BINARY, pieces[0], fin=False)
    data += client_frame(Opcode.CONTINUATION, pieces[1], fin=False)
    data += client_frame(Opcode.CONTINUATION, pieces[2])
    data += client_frame(Opcode.TEXT, b"sm", fin=False) + client_frame(Opcode.CONTINUATION, b"all")
    feed(sender, data, step=65536)
    relay.loop.run_turn()
    assert frames_of(member_out.take()) == [
        (True, Opcode.BINARY, big),
        (True, Opcode.TEXT, b"small"),
    ]


def read_in(conn: Connection, data: bytes, most: int) -> None:
    """Deliver data as the event loop does: each read fills at most the
    buffer the connection offers, and at most `most` bytes."""
    while data:
        buffer = conn.get_buffer(-1)
        n = min(len(buffer), most, len(data))
        buffer[:n] = data[:n]
        conn.buffer_updated(n)
        data = data[n:]


def test_a_frame_over_the_shared_buffer_then_part_of_the_next() -> None:
    """A 5 MiB frame is read into the connection's own buffer; the read that
    ends it also starts the next frame, which is kept (moved to the front of
    that buffer). The turn's 5 MiB grow the arena past 4 MiB, so the flush
    gives the memory back, and the next turn writes from the smaller arena."""
    relay = Relay(max_message_size=8 << 20)
    sender, _ = relay.join()
    member, member_out = relay.join()
    big = bytes(range(251)) * (5 * 1024 * 1024 // 251)
    after = client_frame(Opcode.TEXT, b"after the big one")
    data = client_frame(Opcode.BINARY, big) + after
    read_in(sender, data[: -len(after) + 3], 300_000)  # ends 3 bytes into `after`
    relay.loop.run_turn()
    assert frames_of(member_out.take()) == [(True, Opcode.BINARY, big)]
    read_in(sender, data[-len(after) + 3 :], 300_000)
    relay.loop.run_turn()
    assert frames_of(member_out.take()) == [(True, Opcode.TEXT, b"after the big one")]


class SocketTransport(RecordingTransport):
    """A transport holding a real socket: the connection then writes with
    sendmsg (the plain-TCP path), and only what the socket does not take
    goes through write()."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else super().get_extra_info(name, default)


def join_with_socket(
    relay: Relay, ours: socket.socket, peer: socket.socket, room: str = "/r"
) -> tuple[Connection, SocketTransport]:
    ours.setblocking(False)
    conn = Connection(relay.hub)
    transport = SocketTransport(ours)
    conn.connection_made(transport)
    feed(conn, REQUEST.format(room=room).encode())
    relay.loop.run_turn()
    peer.settimeout(5)
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += peer.recv(1)
    assert head.startswith(b"HTTP/1.1 101 ") and conn.state == State.OPEN
    return conn, transport


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(relay side, client side) of a TCP connection on 127.0.0.1, with
    small buffers so that the relay's sendmsg takes only part of a turn."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        client.connect(listener.getsockname())
        ours, _ = listener.accept()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    return ours, client


def test_a_partial_sendmsg_over_several_slices_queues_the_rest() -> None:
    """Messages of two rooms alternate in one turn, so a member of one room
    has many separate slices of the arena; the socket takes a part that ends
    inside a later slice, and the rest is copied out for the transport."""
    relay = Relay(max_message_size=1 << 20)
    ours, client = tcp_pair()
    with ours, client:
        member, member_out = join_with_socket(relay, ours, client, "/a")
        sender_a, _ = relay.join("/a")
        sender_b, _ = relay.join("/b")
        expected = []
        for i in range(100):
            payload = bytes([i]) * 4000
            if i % 2 == 0:
                feed(sender_a, client_frame(Opcode.BINARY, payload))
                expected.append((True, Opcode.BINARY, payload))
            else:
                feed(sender_b, client_frame(Opcode.BINARY, payload))
        relay.loop.run_turn()
        client.setblocking(False)
        direct = b""
        while True:
            try:
                chunk = client.recv(1 << 20)
            except BlockingIOError:
                break
            assert chunk, "the relay closed the connection"
            direct += chunk
        queued = member_out.take()
        # The socket took more than one slice (a frame: 4 header bytes and
        # the payload), and not all of them.
        assert len(direct) > 4004 and queued
        assert frames_of(direct + queued) == expected
        assert member.state == State.OPEN


def test_a_write_to_a_vanished_peer_drops_the_connection() -> None:
    """The peer's end is closed: sendmsg fails with EPIPE (no SIGPIPE: the
    flag, or CPython ignoring the signal, see fastrelay/_compat.h); the
    member is dropped and the room goes on without it."""
    relay = Relay()
    ours, peer = socket.socketpair()
    with ours, peer:
        member, member_transport = join_with_socket(relay, ours, peer)
        sender, sender_out = relay.join()
        peer.close()
        feed(sender, client_frame(Opcode.TEXT, b"to nobody"))
        relay.loop.run_turn()
        assert member_transport.aborted and member.state == State.CLOSED
        assert len(relay.hub.rooms["/r"]) == 1
        feed(sender, client_frame(Opcode.TEXT, b"still here"))
        relay.loop.run_turn()
        assert frames_of(sender_out.take()) == [
            (True, Opcode.TEXT, b"to nobody"),
            (True, Opcode.TEXT, b"still here"),
        ]
