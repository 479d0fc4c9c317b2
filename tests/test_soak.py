"""5000 connect/disconnect cycles, clean and abrupt, mixed with messages:
file descriptors and the connected-clients gauge return to their baseline,
memory growth stays bounded, and the relay still serves."""

from __future__ import annotations

import socket
import struct
import time

import psutil
import pytest

from relay_process import METRICS_ON
from scrape import scrape
from wsraw import RawClient, close_payload, frame

CYCLES = 5000
# RSS growth allowed across the cycles, after a warm-up of 200 cycles: a
# leak of even 4 KiB per connection would show as ~20 MiB.
RSS_GROWTH_BOUND = 16 * 1024 * 1024


def cycle(port: int, i: int) -> None:
    client = RawClient(port, f"/soak-{i % 10}")
    try:
        body = f"m{i}".encode()
        client.send(frame(0x1, body))
        assert client.recv_frame() == (True, 0x1, body)
        kind = i % 3
        if kind == 0:  # clean close handshake
            client.send(frame(0x8, close_payload(1000)))
            assert client.expect_close()[0] == 1000
        elif kind == 2:  # reset
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # kind 1: plain TCP close without a close frame
    finally:
        client.close()


def wait_for(predicate, what: str, timeout: float = 20.0) -> None:
    # The relay notices abrupt disconnects asynchronously and there is no
    # event to wait on from outside: poll its state with a deadline.
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.timeout(240)
def test_soak_connect_disconnect(relay_factory):
    relay = relay_factory(METRICS_ON)
    server = psutil.Process(relay.pid)
    steady = RawClient(relay.port, "/steady")
    try:
        baseline_fds = server.num_fds()
        for i in range(200):
            cycle(relay.port, i)
        wait_for(lambda: scrape(relay.metrics_url)["websocket_connected_clients"] == 1, "warm-up")
        baseline_rss = server.memory_info().rss
        for i in range(200, CYCLES):
            cycle(relay.port, i)
            if i % 250 == 0:
                steady.send(frame(0x1, b"still there"))
                assert steady.recv_frame() == (True, 0x1, b"still there")
        wait_for(
            lambda: scrape(relay.metrics_url)["websocket_connected_clients"] == 1,
            "connected clients back to the baseline",
        )
        wait_for(lambda: server.num_fds() <= baseline_fds, "file descriptors back to the baseline")
        values = scrape(relay.metrics_url)
        assert values["websocket_connections_total"] == CYCLES + 1
        assert values["websocket_disconnections_total"] == CYCLES
        assert values["websocket_rooms"] == 1
        assert server.memory_info().rss - baseline_rss < RSS_GROWTH_BOUND
        steady.send(frame(0x1, b"after the soak"))
        assert steady.recv_frame() == (True, 0x1, b"after the soak")
    finally:
        steady.close()
