"""permessage-deflate (RFC 7692), negotiated without context takeover when
relay.compression is on: compressed and plain members share a room."""

from __future__ import annotations

import asyncio
import os
import struct
import zlib

import pytest
import websockets

from fastrelay._frames import CloseCode
from wsraw import RawClient, close_payload, frame, handshake_request

STEP = 10.0
OFFER = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"


def deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def inflate(data: bytes) -> bytes:
    return zlib.decompressobj(-15).decompress(data + b"\x00\x00\xff\xff")


def compressed_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    return frame(opcode, deflate(payload), fin=fin, rsv=4)


class DeflateClient(RawClient):
    def __init__(self, port: int, path: str, offer: str = OFFER) -> None:
        super().__init__(port, path, handshake=False)
        self.send(handshake_request(path, extra=offer))
        self.head = self.read_http_head()
        assert self.head.startswith(b"HTTP/1.1 101 ")

    def recv_raw(self) -> tuple[bool, bool, int, bytes]:
        """(fin, rsv1, opcode, payload) without the reserved-bit check."""
        b0, b1 = self._read_exact(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._read_exact(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._read_exact(8))
        return bool(b0 & 0x80), bool(b0 & 0x40), b0 & 0x0F, self._read_exact(n)


@pytest.fixture(scope="module")
def zrelay(module_relay_factory):
    return module_relay_factory({"relay": {"compression": True, "max_message_size": 65536}})


def test_negotiates_without_context_takeover(zrelay):
    client = DeflateClient(zrelay.port, "/neg")
    try:
        assert (
            b"Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; "
            b"client_no_context_takeover"
        ) in client.head
    finally:
        client.close()


def test_not_negotiated_when_off_or_not_offered(relay, zrelay):
    off = RawClient(relay.port, handshake=False)
    plain = RawClient(zrelay.port, handshake=False)
    odd = RawClient(zrelay.port, handshake=False)
    try:
        off.send(handshake_request("/x", extra=OFFER))
        assert b"Sec-WebSocket-Extensions" not in off.read_http_head()
        plain.send(handshake_request("/x"))
        assert b"Sec-WebSocket-Extensions" not in plain.read_http_head()
        # An offer limiting our window to 8 bits (which zlib cannot do raw)
        # is declined, not failed.
        odd.send(
            handshake_request(
                "/x",
                extra="Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=8\r\n",
            )
        )
        head = odd.read_http_head()
        assert head.startswith(b"HTTP/1.1 101 ") and b"Sec-WebSocket-Extensions" not in head
    finally:
        for c in (off, plain, odd):
            c.close()


def test_compressed_and_plain_members_get_the_same_message(zrelay):
    text = ("the same words again and again " * 40).encode()
    z = DeflateClient(zrelay.port, "/mixed")
    plain = RawClient(zrelay.port, "/mixed")
    try:
        # One compressed message in two frames: RSV1 on the first only.
        squeezed = deflate(text)
        z.send(frame(0x1, squeezed[:10], fin=False, rsv=4) + frame(0x0, squeezed[10:]))
        fin, rsv1, opcode, payload = z.recv_raw()
        assert fin and rsv1 and opcode == 0x1
        assert len(payload) < len(text) and inflate(payload) == text
        assert plain.recv_frame() == (True, 0x1, text)
        # Small messages stay uncompressed (RSV1 clear) for everyone.
        plain.send(frame(0x2, b"tiny"))
        assert z.recv_raw() == (True, False, 0x2, b"tiny")
        assert plain.recv_frame() == (True, 0x2, b"tiny")
    finally:
        z.close()
        plain.close()


CASES = {
    "rsv1 on a continuation": (
        [frame(0x1, b"a", fin=False), frame(0x0, deflate(b"b"), rsv=4)],
        CloseCode.PROTOCOL_ERROR,
    ),
    "rsv1 on a ping": ([frame(0x9, b"", rsv=4)], CloseCode.PROTOCOL_ERROR),
    "not deflate data": (
        [frame(0x2, b"\xff\xff\xff\xff garbage", rsv=4)],
        CloseCode.INVALID_PAYLOAD_DATA,
    ),
    "inflates over the size limit": (
        [compressed_frame(0x2, bytes(70000))],
        CloseCode.MESSAGE_TOO_BIG,
    ),
    "invalid utf-8 after inflating": (
        [compressed_frame(0x1, b"ok \xff" * 50)],
        CloseCode.INVALID_PAYLOAD_DATA,
    ),
    "rsv2 still reserved": ([frame(0x1, b"x", rsv=2)], CloseCode.PROTOCOL_ERROR),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compressed_violations(zrelay, case):
    frames, code = CASES[case]
    client = DeflateClient(zrelay.port, "/bad-z")
    try:
        client.send(b"".join(frames))
        assert client.expect_close()[0] == code
    finally:
        client.close()


def test_rsv1_without_negotiation_is_a_protocol_error(zrelay):
    client = RawClient(zrelay.port, "/no-z")
    try:
        client.send(compressed_frame(0x1, b"x" * 200))
        assert client.expect_close()[0] == CloseCode.PROTOCOL_ERROR
    finally:
        client.close()


def test_websockets_client_with_and_without_compression(zrelay):
    big = "compress me " * 2000

    async def main():
        async with (
            websockets.connect(zrelay.ws("/ws-z"), open_timeout=STEP) as z,
            websockets.connect(zrelay.ws("/ws-z"), open_timeout=STEP, compression=None) as plain,
        ):
            assert z.protocol.extensions, "permessage-deflate was not negotiated"
            assert not plain.protocol.extensions
            await z.send(big)
            assert await asyncio.wait_for(plain.recv(), STEP) == big
            assert await asyncio.wait_for(z.recv(), STEP) == big
            await plain.send(big.encode())
            assert await asyncio.wait_for(z.recv(), STEP) == big.encode()
            await z.close(4001, "bye")
            assert z.close_code == 4001

    asyncio.run(main())


def test_close_frame_is_never_compressed(zrelay):
    client = DeflateClient(zrelay.port, "/z-close")
    try:
        client.send(frame(0x8, close_payload(1000, b"x" * 100)))
        fin, rsv1, opcode, payload = client.recv_raw()
        assert (fin, rsv1, opcode) == (True, False, 0x8)
        assert payload == close_payload(1000, b"x" * 100)
    finally:
        client.close()


def inflate_through_window(data: bytes, bits: int) -> bytes:
    """Inflate as a client keeping only a `bits`-bit window would: output
    taken 64 bytes at a time, so a reference further back than the window
    fails ("invalid distance too far back")."""
    inflater = zlib.decompressobj(-bits)
    out, rest = b"", data + b"\x00\x00\xff\xff"
    while rest:
        out += inflater.decompress(rest, 64)
        rest = inflater.unconsumed_tail
    return out


def window_offer(bits: int) -> str:
    return f"Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits={bits}\r\n"


def test_each_server_window_offered_is_honoured(zrelay):
    """Members asking for a 10-bit, a 12-bit and the default window, and a
    plain member, in one room: each compressed frame inflates with the
    window its member asked for (RFC 7692 section 7.1.2.1)."""
    # Each random block repeats right away (400 bytes back: any window finds
    # it), and the whole first half repeats 3200 bytes later, which only a
    # window over 10 bits (1 KiB) reaches.
    half = b"".join(block + block for block in (os.urandom(400) for _ in range(4)))
    text = half + half
    clients = {
        bits: DeflateClient(zrelay.port, "/windows", window_offer(bits)) for bits in (10, 12)
    }
    clients[15] = DeflateClient(zrelay.port, "/windows")
    plain = RawClient(zrelay.port, "/windows")
    try:
        for bits in (10, 12):
            assert f"server_max_window_bits={bits}".encode() in clients[bits].head
        assert b"server_max_window_bits" not in clients[15].head
        plain.send(frame(0x2, text))
        for bits, client in clients.items():
            fin, rsv1, opcode, payload = client.recv_raw()
            assert fin and rsv1 and opcode == 0x2
            assert inflate_through_window(payload, bits) == text
        assert plain.recv_frame() == (True, 0x2, text)
        # A 15-bit stream of the same data does not fit a 10-bit window: the
        # check above would catch a relay that ignored the offer.
        with pytest.raises(zlib.error):
            inflate_through_window(deflate(text), 10)
    finally:
        for client in (*clients.values(), plain):
            client.close()
