"""The close frame always arrives (RFC 6455 sections 7.1.1 and 7.1.7), even to
a client that is still sending when the relay closes: the relay half-closes
after its close frame and reads and drops what the client still sends, so
the client reads the close frame and then a clean EOF, never a reset.

Each client here is a raw socket that keeps streaming from a thread while
the test reads."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import psutil

from fastrelay._frames import CloseCode, Opcode
from relay_process import METRICS_ON
from scrape import scrape
from wsraw import RawClient, frame

MIB = 1024 * 1024
# How much the relay's RSS may grow while a client streams megabytes at it
# after being closed: what is dropped is never buffered.
RSS_GROWTH_BOUND = 32 * MIB
DEADLINE = 20.0


class Streamer(threading.Thread):
    """Sends `data` on the socket from a thread; records any error."""

    def __init__(self, sock: socket.socket, data: bytes) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.data = data
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.sock.sendall(self.data)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def masked_fragments(total: int, piece: int) -> bytes:
    """One binary message of `total` bytes in fragments of `piece` bytes."""
    payload = os.urandom(piece)
    count = total // piece
    parts = [frame(Opcode.BINARY, payload, fin=False)]
    parts += [frame(Opcode.CONTINUATION, payload, fin=False)] * (count - 2)
    parts.append(frame(Opcode.CONTINUATION, payload, fin=True))
    return b"".join(parts)


def read_close_then_eof(client: RawClient) -> int:
    """Frames up to the close, then EOF; a reset fails the test. Returns the
    close code."""
    while True:
        _, opcode, payload = client.recv_frame()
        if opcode == Opcode.CLOSE:
            break
    code: int = struct.unpack("!H", payload[:2])[0]
    rest = client.buf
    while True:
        chunk = client.sock.recv(65536)  # ConnectionResetError fails the test
        if not chunk:
            break
        rest += chunk
    assert rest == b"", "nothing may follow the close frame"
    return code


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def test_a_message_over_the_limit_still_streaming_gets_its_close(relay_factory) -> None:
    relay = relay_factory({"relay": {"max_message_size": MIB}})
    before = rss(relay.pid)
    client = RawClient(relay.port, "/big")
    streamer = Streamer(client.sock, masked_fragments(4 * MIB, 64 * 1024))
    streamer.start()
    assert read_close_then_eof(client) == CloseCode.MESSAGE_TOO_BIG
    streamer.join(DEADLINE)
    assert not streamer.is_alive() and streamer.error is None
    assert rss(relay.pid) - before < RSS_GROWTH_BOUND
    client.close()


def test_a_protocol_error_followed_by_more_frames_gets_its_close(relay_factory) -> None:
    relay = relay_factory()
    client = RawClient(relay.port, "/bad")
    violation = frame(Opcode.TEXT, b"not masked", mask=False)
    more = frame(Opcode.BINARY, os.urandom(16 * 1024)) * 64  # 1 MiB of valid frames
    streamer = Streamer(client.sock, violation + more)
    streamer.start()
    assert read_close_then_eof(client) == CloseCode.PROTOCOL_ERROR
    streamer.join(DEADLINE)
    assert not streamer.is_alive() and streamer.error is None
    client.close()


def test_a_slow_client_that_keeps_sending_gets_its_close(relay_factory) -> None:
    relay = relay_factory(
        {
            **METRICS_ON,
            "relay": {"echo": False},
            "limits": {"max_backlog": 256 * 1024, "slow_client_policy": "disconnect"},
        }
    )
    slow_client = RawClient(relay.port, "/slow", rcvbuf=4096)
    sender = RawClient(relay.port, "/slow")
    message = frame(Opcode.BINARY, os.urandom(16 * 1024))
    deadline = time.monotonic() + DEADLINE
    key = "websocket_slow_client_disconnects_total"
    # Push until the relay has given up on the reader that does not read.
    while scrape(relay.metrics_url).get(key, 0) < 1:
        assert time.monotonic() < deadline, "the slow client was never closed"
        sender.send(message * 16)
    # It keeps sending after the relay's decision, then reads everything.
    streamer = Streamer(slow_client.sock, frame(Opcode.BINARY, os.urandom(64 * 1024)) * 16)
    streamer.start()
    assert read_close_then_eof(slow_client) == CloseCode.POLICY_VIOLATION
    streamer.join(DEADLINE)
    assert not streamer.is_alive() and streamer.error is None
    slow_client.close()
    sender.close()
