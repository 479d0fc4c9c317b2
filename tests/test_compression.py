"""permessage-deflate (RFC 7692), negotiated without context takeover when
relay.compression is on: compressed and plain members share a room."""

from __future__ import annotations

import asyncio
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
    def __init__(self, port: int, path: str) -> None:
        super().__init__(port, path, handshake=False)
        self.send(handshake_request(path, extra=OFFER))
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
        # An offer limiting our window below 15 bits is declined, not failed.
        odd.send(
            handshake_request(
                "/x",
                extra="Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=10\r\n",
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
