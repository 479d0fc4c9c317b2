"""Backpressure before drops (slow_client_policy: backpressure, the default):
a room is read no faster than its members take it. A burst never costs a
healthy reader its connection; a member that stops reading is closed after
timeouts.slow_client and the room goes on; a sender that reads its own echoes
slowly is slowed down, not closed."""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import time

import websockets

from fastrelay._frames import CloseCode, Opcode
from relay_process import METRICS_ON
from scrape import scrape
from wsraw import RawClient, frame

MESSAGE = 16 * 1024
DEADLINE = 45.0


def numbered(seq: int, body: bytes) -> bytes:
    return frame(Opcode.BINARY, struct.pack("!I", seq) + body)


def burst(count: int) -> bytes:
    """`count` masked 16 KiB binary messages numbered 0.. (one random body,
    masked once per message)."""
    body = os.urandom(MESSAGE - 4)
    return b"".join(numbered(seq, body) for seq in range(count))


class Thread(threading.Thread):
    """Runs `work`, keeping its result or its error for the test."""

    def __init__(self, work) -> None:  # type: ignore[no-untyped-def]
        super().__init__(daemon=True)
        self.work = work
        self.result: object = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.work()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def outcome(self) -> object:
        self.join(DEADLINE)
        assert not self.is_alive(), "thread still running"
        if self.error is not None:
            raise self.error
        return self.result


def read_numbered(client: RawClient, count: int, pause: float = 0.0) -> list[int]:
    """Sequence numbers of the next `count` frames (all must be 16 KiB
    binary); `pause` seconds between reads makes a slow reader."""
    seen = []
    for _ in range(count):
        _, opcode, payload = client.recv_frame()
        assert opcode == Opcode.BINARY and len(payload) == MESSAGE, (opcode, len(payload))
        seen.append(struct.unpack("!I", payload[:4])[0])
        if pause:
            time.sleep(pause)  # pacing a slow reader, not waiting for anything
    return seen


async def read_with_websockets(url: str, count: int) -> list[int]:
    """A websockets client reading as fast as it can; afterwards it must
    still be connected (a ping round trip)."""
    async with websockets.connect(url, max_size=None, ping_interval=None) as ws:
        seen = []
        for _ in range(count):
            message = await asyncio.wait_for(ws.recv(), DEADLINE)
            assert isinstance(message, bytes) and len(message) == MESSAGE
            seen.append(struct.unpack("!I", message[:4])[0])
        await asyncio.wait_for(await ws.ping(), DEADLINE)
        return seen


def test_a_burst_never_costs_a_healthy_reader_its_connection(relay_factory) -> None:
    """8 MiB in 16 KiB messages, pushed as fast as TCP allows."""
    count = 8 * 1024 * 1024 // MESSAGE
    relay = relay_factory({**METRICS_ON, "relay": {"echo": False}})

    async def main() -> list[int]:
        reader = asyncio.create_task(read_with_websockets(relay.ws("/burst"), count))
        # The reader is in the room before the sender starts.
        while scrape(relay.metrics_url)["websocket_connected_clients"] < 1:
            await asyncio.sleep(0.01)
        sender = RawClient(relay.port, "/burst")
        pushing = Thread(lambda: sender.sock.sendall(burst(count)))
        pushing.start()
        seen = await reader
        pushing.outcome()
        sender.close()
        return seen

    assert asyncio.run(main()) == list(range(count))
    values = scrape(relay.metrics_url)
    assert values["websocket_slow_client_disconnects_total"] == 0


def test_a_member_that_stops_reading_is_closed_and_the_room_goes_on(relay_factory) -> None:
    count = 256  # 4 MiB: far more than the stuck member's buffers hold
    relay = relay_factory(
        {**METRICS_ON, "relay": {"echo": False}, "timeouts": {"slow_client": 1.0}}
    )
    stuck = RawClient(relay.port, "/stall", rcvbuf=4096)
    reader = RawClient(relay.port, "/stall")
    sender = RawClient(relay.port, "/stall")
    reading = Thread(lambda: read_numbered(reader, count))
    reading.start()
    pushing = Thread(lambda: sender.sock.sendall(burst(count)))
    pushing.start()
    assert reading.outcome() == list(range(count))
    pushing.outcome()
    values = scrape(relay.metrics_url)
    assert values["websocket_slow_client_disconnects_total"] == 1
    assert values['websocket_closes_total{code="1008"}'] == 1
    # The stuck member gets what was queued for it, then its close.
    stuck.sock.settimeout(DEADLINE)
    while True:
        _, opcode, payload = stuck.recv_frame()
        if opcode == Opcode.CLOSE:
            break
    assert struct.unpack("!H", payload[:2])[0] == CloseCode.POLICY_VIOLATION
    assert payload[2:] == b"reader stalled"
    for client in (stuck, reader, sender):
        client.close()


def test_a_sender_reading_its_echoes_slowly_is_slowed_down_not_closed(relay_factory) -> None:
    count = 256  # 4 MiB sent at once; echoes read at a fraction of that pace
    relay = relay_factory({**METRICS_ON, "timeouts": {"slow_client": 1.0}})
    sender = RawClient(relay.port, "/echo", rcvbuf=64 * 1024)
    pushing = Thread(lambda: sender.sock.sendall(burst(count)))
    pushing.start()
    assert read_numbered(sender, count, pause=0.002) == list(range(count))
    pushing.outcome()
    # Still connected: a ping is answered.
    sender.send(frame(Opcode.PING, b"still here"))
    assert sender.recv_frame() == (True, Opcode.PONG, b"still here")
    values = scrape(relay.metrics_url)
    assert values["websocket_slow_client_disconnects_total"] == 0
    sender.close()
