"""Clients that never read, never answer, never finish, or come too many:
none of it slows or breaks service for the others."""

from __future__ import annotations

import asyncio
import socket
import struct

import psutil
import pytest

from fastrelay._frames import CloseCode
from relay_process import METRICS_ON
from scrape import scrape
from wsraw import RawClient, frame, handshake_request

MESSAGE = 16 * 1024
COUNT = 2000
HEALTHY = 20
# Server RSS after pushing 2000 x 16 KiB to 21 clients, one of which never
# reads: the backlog limit (1 MiB) bounds what is held for the slow client.
RSS_BOUND = 200 * 1024 * 1024


# The sender stays at most this many messages ahead of the slowest healthy
# reader: healthy means keeping up, and the readers share one Python process.
WINDOW = 16


async def healthy_reader(
    port: int,
    path: str,
    ready: asyncio.Event,
    counter: list,
    progress: list[int],
    moved: asyncio.Event,
    index: int,
) -> list[int]:
    """Raw reader: every frame is binary, 16 KiB, carrying its sequence
    number in the first 4 bytes. Returns the numbers in arrival order."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(handshake_request(path))
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    counter.append(1)
    if len(counter) == HEALTHY:
        ready.set()
    seqs = []
    header = bytes([0x82, 126]) + struct.pack("!H", MESSAGE)
    while len(seqs) < COUNT:
        got = await reader.readexactly(4 + MESSAGE)
        assert got[:4] == header
        seqs.append(struct.unpack("!I", got[4:8])[0])
        progress[index] = len(seqs)
        moved.set()
    writer.close()
    return seqs


def run_slow_consumer_room(relay, path: str) -> tuple[list[list[int]], RawClient]:
    async def main():
        ready = asyncio.Event()
        moved = asyncio.Event()
        counter: list = []
        progress = [0] * HEALTHY
        readers = [
            asyncio.create_task(
                healthy_reader(relay.port, path, ready, counter, progress, moved, i)
            )
            for i in range(HEALTHY)
        ]
        await asyncio.wait_for(ready.wait(), 20)
        slow = RawClient(relay.port, path)  # joins, then never reads
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sender_reader, sender = await asyncio.open_connection("127.0.0.1", relay.port)
        sender.write(handshake_request(path))
        await sender_reader.readuntil(b"\r\n\r\n")
        for seq in range(COUNT):
            while seq - min(progress) > WINDOW:
                moved.clear()
                await asyncio.wait_for(moved.wait(), 30)
            sender.write(frame(0x2, struct.pack("!I", seq) + bytes(MESSAGE - 4)))
            await sender.drain()
        results = await asyncio.wait_for(asyncio.gather(*readers), 120)
        sender.close()
        return results, slow

    return asyncio.run(main())


@pytest.mark.timeout(180)  # 32 MiB to 21 clients; generous for a loaded CI machine
def test_slow_consumer_is_disconnected_and_others_get_everything(relay_factory):
    relay = relay_factory({**METRICS_ON, "relay": {"echo": False}, "timeouts": {"close": 1.0}})
    results, slow = run_slow_consumer_room(relay, "/slow")
    try:
        for seqs in results:
            assert seqs == list(range(COUNT))
        assert psutil.Process(relay.pid).memory_info().rss < RSS_BOUND
        # The slow client was cut off: its socket ends (close frame somewhere
        # in what was queued, then EOF or reset once the close timeout hits).
        slow.sock.settimeout(30)
        try:
            while slow.sock.recv(1 << 20):
                pass
        except ConnectionResetError:
            pass
        values = scrape(relay.metrics_url)
        assert values["websocket_slow_client_disconnects_total"] == 1
        assert values['websocket_closes_total{code="1008"}'] == 1
    finally:
        slow.close()


@pytest.mark.timeout(180)
def test_drop_policy_skips_messages_for_the_slow_client(relay_factory):
    policy = {"slow_client_policy": "drop"}
    relay = relay_factory({**METRICS_ON, "relay": {"echo": False}, "limits": policy})
    results, slow = run_slow_consumer_room(relay, "/drop")
    try:
        for seqs in results:
            assert seqs == list(range(COUNT))
        assert psutil.Process(relay.pid).memory_info().rss < RSS_BOUND
        values = scrape(relay.metrics_url)
        assert values["websocket_slow_client_drops_total"] > 0
        assert values["websocket_slow_client_disconnects_total"] == 0
        assert values["websocket_connected_clients"] >= 1  # the slow one is still there
    finally:
        slow.close()


def test_keepalive_closes_a_client_that_stops_answering(relay_factory):
    relay = relay_factory({"timeouts": {"ping_interval": 0.2, "ping_timeout": 0.2, "close": 0.5}})
    silent = RawClient(relay.port, "/ka")
    try:
        # The server pings; this client never pongs. Expect a ping, then
        # the close 1011, then the end of the connection.
        fin, opcode, payload = silent.recv_frame()
        assert opcode == 0x9
        while True:
            fin, opcode, payload = silent.recv_frame()
            if opcode == 0x8:
                break
            assert opcode == 0x9
        assert struct.unpack("!H", payload[:2])[0] == CloseCode.INTERNAL_ERROR
        assert silent.buf + silent.read_to_eof() == b""
    finally:
        silent.close()


def test_keepalive_keeps_a_client_that_answers(relay_factory):
    import websockets

    relay = relay_factory({"timeouts": {"ping_interval": 0.1, "ping_timeout": 0.5}})

    async def main():
        async with websockets.connect(relay.ws("/ka-ok"), open_timeout=10) as ws:
            # Several keepalive rounds pass while we wait for our own echo
            # from a message sent after each of 20 round trips.
            for i in range(20):
                waiter = await ws.ping()
                await asyncio.wait_for(waiter, 10)
                await ws.send(str(i))
                assert await asyncio.wait_for(ws.recv(), 10) == str(i)

    asyncio.run(main())


def test_max_connections_answers_503(relay_factory):
    relay = relay_factory({"limits": {"max_connections": 3}})
    clients = [RawClient(relay.port, "/full") for _ in range(3)]
    extra = RawClient(relay.port, handshake=False)
    try:
        extra.send(handshake_request("/full"))
        status, _head, _body = extra.read_http_response()
        assert status == 503
        clients.pop().close()
        # A slot frees up once the server has seen that close.
        for _ in range(200):
            again = RawClient(relay.port, handshake=False)
            again.send(handshake_request("/full"))
            head = again.read_http_head()
            again.close()
            if head.startswith(b"HTTP/1.1 101 "):
                break
        else:
            pytest.fail("slot never freed")
    finally:
        for c in clients + [extra]:
            c.close()


def test_handshake_timeout_closes_a_trickling_client(relay_factory):
    relay = relay_factory({**METRICS_ON, "timeouts": {"handshake": 0.3}})
    client = RawClient(relay.port, handshake=False)
    try:
        client.send(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finishes
        assert client.read_to_eof() == b""
        assert (
            scrape(relay.metrics_url)['websocket_handshake_failures_total{reason="timeout"}'] == 1
        )
    finally:
        client.close()


def test_allowed_origins(relay_factory):
    relay = relay_factory({"limits": {"allowed_origins": ["https://good.example"]}})
    good = RawClient(relay.port, handshake=False)
    bad = RawClient(relay.port, handshake=False)
    missing = RawClient(relay.port, handshake=False)
    try:
        good.send(handshake_request("/o", extra="Origin: https://good.example\r\n"))
        assert good.read_http_head().startswith(b"HTTP/1.1 101 ")
        bad.send(handshake_request("/o", extra="Origin: https://evil.example\r\n"))
        assert bad.read_http_response()[0] == 403
        missing.send(handshake_request("/o"))
        assert missing.read_http_response()[0] == 403
    finally:
        for c in (good, bad, missing):
            c.close()


def test_message_rate_limit_closes_with_1008(relay_factory):
    relay = relay_factory({"limits": {"max_messages_per_second": 50}})
    client = RawClient(relay.port, "/rate")
    try:
        client.send(b"".join(frame(0x1, b"x") for _ in range(200)))
        opcodes = []
        while True:
            fin, opcode, payload = client.recv_frame()
            opcodes.append(opcode)
            if opcode == 0x8:
                break
        assert struct.unpack("!H", payload[:2])[0] == CloseCode.POLICY_VIOLATION
        assert opcodes.count(0x1) <= 100  # at most two windows' worth got through
    finally:
        client.close()
