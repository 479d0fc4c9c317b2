"""The relay as users see it, through the reference `websockets` client; the
control frames (ping, close) on a raw socket, to check the bytes the relay
writes rather than what a client library makes of them."""

from __future__ import annotations

import asyncio

import pytest
import websockets

from wsraw import RawClient, close_payload, frame

TEXT, CLOSE, PING, PONG = 0x1, 0x8, 0x9, 0xA

# Every await below is bounded: a lost message fails the test, never hangs it.
STEP = 10.0


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 50))


async def recv(ws):
    return await asyncio.wait_for(ws.recv(), STEP)


async def assert_silent(ws):
    """Nothing is queued for ws: a marker sent through its own room arrives
    first. (A bounded check, no sleep: the marker follows anything that was
    relayed to ws before it.)"""
    await ws.send("__marker__")
    assert await recv(ws) == "__marker__"


def connect(relay, path="/", **kw):
    return websockets.connect(
        relay.ws(path), open_timeout=STEP, close_timeout=STEP, max_size=None, **kw
    )


def test_relays_to_every_member_including_sender(relay):
    async def main():
        async with (
            connect(relay, "/room") as a,
            connect(relay, "/room") as b,
            connect(relay, "/room") as c,
        ):
            await a.send("hello")
            assert [await recv(a), await recv(b), await recv(c)] == ["hello"] * 3

    run(main())


def test_rooms_are_isolated(relay):
    async def main():
        async with (
            connect(relay, "/a") as a,
            connect(relay, "/b") as b,
            connect(relay, "/") as root,
            connect(relay, "/a?x=1") as a2,
        ):
            await a.send("for a")
            assert await recv(a) == "for a"
            assert await recv(a2) == "for a"  # the query string is not part of the room
            await assert_silent(b)
            await assert_silent(root)
            await b.send("for b")
            assert await recv(b) == "for b"
            await assert_silent(a)
            await root.send("for root")
            assert await recv(root) == "for root"
            await assert_silent(b)

    run(main())


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 1 << 20])
def test_payload_sizes_text_and_binary(relay_factory, size):
    relay = relay_factory({"relay": {"max_message_size": 2 << 20}})

    async def main():
        async with connect(relay, "/s") as a, connect(relay, "/s") as b:
            text = ("é" * size)[: size // 2] + "x" * (size - 2 * (size // 2))
            await a.send(text)
            assert await recv(a) == text
            assert await recv(b) == text
            data = bytes(range(256)) * (size // 256) + bytes(size % 256)
            await b.send(data)
            got_a, got_b = await recv(a), await recv(b)
            assert isinstance(got_a, bytes) and got_a == data and got_b == data

    run(main())


def test_fragmented_messages_are_reassembled(relay):
    async def main():
        async with connect(relay, "/f") as a, connect(relay, "/f") as b:
            await a.send(["frag", "men", "ted ", "ünïcode"])
            assert await recv(b) == "fragmented ünïcode"
            assert await recv(a) == "fragmented ünïcode"
            await a.send([b"\x00\x01", b"", b"\x02"])
            assert await recv(b) == b"\x00\x01\x02"

    run(main())


@pytest.mark.parametrize("payload", [b"", b"payload-123", bytes(range(125))])
def test_ping_gets_one_unmasked_pong_with_the_same_payload(relay, payload):
    client = RawClient(relay.port, "/p")
    try:
        client.send(frame(PING, payload))  # masked, as a client frame must be
        # recv_frame() also fails on a masked server frame or a reserved bit.
        assert client.recv_frame() == (True, PONG, payload)
        # Exactly one pong: the echo of the next message is the next frame.
        client.send(frame(TEXT, b"after the ping"))
        assert client.recv_frame() == (True, TEXT, b"after the ping")
    finally:
        client.close()


def test_close_code_and_reason_are_echoed_then_tcp_closed(relay):
    reason = "see you ✓".encode()
    leaving = RawClient(relay.port, "/c")
    staying = RawClient(relay.port, "/c")
    try:
        leaving.send(frame(CLOSE, close_payload(4321, reason)))
        # RFC 6455 §5.5.1: the answer is a close frame echoing the code; the
        # relay echoes the reason bytes too.
        assert leaving.recv_frame() == (True, CLOSE, close_payload(4321, reason))
        # Then the relay ends TCP: nothing follows, and it is an orderly FIN
        # (a reset would raise ConnectionResetError here).
        assert leaving.buf == b""
        assert leaving.sock.recv(1) == b""
        # The room keeps working for the others, and the close was not relayed.
        staying.send(frame(TEXT, b"still here"))
        assert staying.recv_frame() == (True, TEXT, b"still here")
    finally:
        leaving.close()
        staying.close()


def test_echo_false_leaves_sender_out(relay_factory):
    relay = relay_factory({"relay": {"echo": False}})

    async def main():
        async with connect(relay, "/e") as a, connect(relay, "/e") as b:
            await a.send("from a")
            assert await recv(b) == "from a"
            await b.send("from b")
            assert await recv(a) == "from b"  # a did not get its own message first

    run(main())


def test_order_per_sender_with_concurrent_senders(relay):
    count, senders = 1000, 3

    async def main():
        async with connect(relay, "/order") as listener:
            clients = [await connect(relay, "/order") for _ in range(senders)]
            try:

                async def send_all(i, ws):
                    for n in range(count):
                        await ws.send(f"{i}:{n}")

                async def drain(ws):
                    # Each sender also receives everything; keep its queue moving.
                    for _ in range(count * senders):
                        await recv(ws)

                drains = [asyncio.create_task(drain(ws)) for ws in clients]
                await asyncio.gather(*(send_all(i, ws) for i, ws in enumerate(clients)))
                seen = {i: [] for i in range(senders)}
                for _ in range(count * senders):
                    i, n = (await recv(listener)).split(":")
                    seen[int(i)].append(int(n))
                await asyncio.gather(*drains)
                for i in range(senders):
                    assert seen[i] == list(range(count))
            finally:
                for ws in clients:
                    await ws.close()

    run(main())


def test_client_leaving_does_not_disturb_room(relay):
    async def main():
        async with connect(relay, "/l") as a:
            b = await connect(relay, "/l")
            await b.close()
            await a.send("after")
            assert await recv(a) == "after"

    run(main())
