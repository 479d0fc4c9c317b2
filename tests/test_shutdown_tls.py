"""Graceful shutdown of a real process with many clients, and TLS next to
clients that get it wrong."""

from __future__ import annotations

import asyncio
import signal
import ssl
import struct

import pytest
import trustme
import websockets
from websockets.exceptions import ConnectionClosed, InvalidMessage

from relay_process import METRICS_ON
from scrape import scrape
from wsraw import RawClient, frame

CLIENTS = 50


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_closes_fifty_clients_with_1001_and_exits_0(relay_factory, sig):
    relay = relay_factory({"timeouts": {"shutdown": 10}})

    async def main():
        clients = [
            await websockets.connect(relay.ws(f"/room{i % 5}"), open_timeout=10)
            for i in range(CLIENTS)
        ]
        relay.send_signal(sig)
        codes = []
        for ws in clients:
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 15)
            codes.append(info.value.rcvd.code if info.value.rcvd else None)
        return codes

    codes = asyncio.run(main())
    assert codes == [1001] * CLIENTS
    assert relay.wait() == 0


def test_stops_accepting_and_a_silent_client_cannot_hold_it(relay_factory):
    shutdown = 1.5
    relay = relay_factory({"timeouts": {"shutdown": shutdown, "close": 30}})
    silent = RawClient(relay.port, "/s")  # never answers the close
    polite = RawClient(relay.port, "/s")
    try:
        relay.send_signal(signal.SIGTERM)
        fin, opcode, payload = polite.recv_frame()
        assert opcode == 0x8 and struct.unpack("!H", payload[:2])[0] == 1001
        polite.send(frame(0x8, payload[:2]))
        assert polite.read_to_eof() == b""
        # New connections are refused once shutdown began.
        with pytest.raises(OSError):
            RawClient(relay.port, "/late")
        # The silent client would hold it for the 30 s close timeout; the
        # 1.5 s shutdown timeout ends it first (the wait is a hang bound).
        assert relay.wait(shutdown + 10) == 0
        fin, opcode, payload = silent.recv_frame()
        assert opcode == 0x8
        assert silent.buf + silent.read_to_eof() == b""
    finally:
        silent.close()
        polite.close()


@pytest.fixture
def tls_files(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(client_ctx)
    return tmp_path / "cert.pem", tmp_path / "key.pem", client_ctx


def test_wss_with_verified_chain_and_plain_client_fails_cleanly(relay_factory, tls_files):
    cert, key, client_ctx = tls_files
    tls = {"enabled": True, "cert_file": str(cert), "key_file": str(key)}
    relay = relay_factory({"server": {"tls": tls}, **METRICS_ON})
    assert relay.url.startswith("wss://")
    wss = relay.ws("/secure")

    async def main():
        async with (
            websockets.connect(wss, ssl=client_ctx, open_timeout=10) as a,
            websockets.connect(wss, ssl=client_ctx, open_timeout=10) as b,
        ):
            # A plain ws:// client on the TLS port: its handshake fails...
            with pytest.raises((InvalidMessage, OSError, EOFError)):
                async with websockets.connect(
                    f"ws://127.0.0.1:{relay.port}/secure", open_timeout=5
                ):
                    pass
            # ...and the TLS clients never notice.
            await a.send("x" * 70000)
            assert await asyncio.wait_for(b.recv(), 10) == "x" * 70000
            assert await asyncio.wait_for(a.recv(), 10) == "x" * 70000

    asyncio.run(main())
    values = scrape(relay.metrics_url)
    assert values["websocket_messages_total"] == 1
    assert values["websocket_deliveries_total"] == 2


def test_metrics_exact_after_known_traffic(relay_factory):
    relay = relay_factory(METRICS_ON)

    async def main():
        a = await websockets.connect(relay.ws("/m"), open_timeout=10)
        b = await websockets.connect(relay.ws("/m"), open_timeout=10)
        c = await websockets.connect(relay.ws("/other"), open_timeout=10)
        for text in ("one", "two", "three"):
            await a.send(text)
            await asyncio.wait_for(b.recv(), 10)
            await asyncio.wait_for(a.recv(), 10)
        before_close = scrape(relay.metrics_url)
        await c.close(4000, "done")
        await b.close()
        await a.send("after")
        await asyncio.wait_for(a.recv(), 10)
        after = scrape(relay.metrics_url)
        await a.close()
        return before_close, after

    before, after = asyncio.run(main())
    assert before["websocket_connected_clients"] == 3
    assert before["websocket_connections_total"] == 3
    assert before["websocket_messages_total"] == 3
    assert before["websocket_deliveries_total"] == 6
    assert before["websocket_rooms"] == 2
    assert before["websocket_disconnections_total"] == 0
    # 3 text frames of 3-5 bytes to 2 members: 2 x (5 + 5 + 7) bytes + 2 x 101 responses.
    assert before["websocket_sent_bytes_total"] > 2 * 17
    assert after["websocket_connected_clients"] == 1
    assert after["websocket_disconnections_total"] == 2
    assert after["websocket_messages_total"] == 4
    assert after["websocket_rooms"] == 1
    assert after['websocket_closes_total{code="4000"}'] == 1
    assert after['websocket_closes_total{code="1000"}'] == 1
