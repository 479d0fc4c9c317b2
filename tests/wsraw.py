"""A deliberately small, independent WebSocket client over a blocking
socket, for what a well-behaved client cannot send. Every read is bounded
by the socket timeout."""

from __future__ import annotations

import base64
import os
import socket
import struct

TIMEOUT = 10.0


def handshake_request(path: str = "/", key: str | None = None, extra: str = "") -> bytes:
    key = key or base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    key: bytes | None = None,
) -> bytes:
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", first, mbit | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mbit | 127, n)
    if not mask:
        return head + payload
    key = key if key is not None else os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + masked


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


class RawClient:
    def __init__(
        self, port: int, path: str = "/", *, handshake: bool = True, rcvbuf: int = 0
    ) -> None:
        self.sock = socket.socket()
        self.sock.settimeout(TIMEOUT)
        if rcvbuf:
            # Before connect, so the window the relay sees is small from the start.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.buf = b""
        if handshake:
            self.sock.sendall(handshake_request(path))
            status = self.read_http_head().split(b"\r\n", 1)[0]
            assert status == b"HTTP/1.1 101 Switching Protocols", status

    def read_http_head(self) -> bytes:
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"EOF before end of HTTP head: {self.buf!r}")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        return head

    def read_http_response(self) -> tuple[int, bytes, bytes]:
        """Status, head, and the body (read to EOF: the relay closes)."""
        head = self.read_http_head()
        body = self.buf + self.read_to_eof()
        self.buf = b""
        return int(head.split(b" ", 2)[1]), head, body

    def read_to_eof(self) -> bytes:
        out = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return out
            if not chunk:
                return out
            out += chunk

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("EOF inside a frame")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = self._read_exact(2)
        assert not b1 & 0x80, "server frames must not be masked"
        assert not b0 & 0x70, "server frames must not set reserved bits"
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._read_exact(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._read_exact(8))
        return bool(b0 & 0x80), b0 & 0x0F, self._read_exact(n)

    def expect_close(self) -> tuple[int, bytes]:
        """Next frame must be a close; returns (code, reason) and checks the
        server then closes the TCP connection."""
        fin, opcode, payload = self.recv_frame()
        assert opcode == 0x8, (opcode, payload)
        code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
        assert self.buf + self.read_to_eof() == b""
        return code, payload[2:]

    def close(self) -> None:
        self.sock.close()


VALID_CLOSE_CODES = set(range(1000, 1004)) | set(range(1007, 1015)) | set(range(3000, 5000))


def check_server_output(stream: bytes) -> None:
    """What a relay writes after the 101 must be well-formed server frames
    (unmasked, no reserved bits); a close, if any, comes last with a code
    RFC 6455 §7.4 allows on the wire and a UTF-8 reason."""
    pos = 0
    while pos < len(stream):
        assert len(stream) - pos >= 2, "truncated frame header"
        b0, b1 = stream[pos], stream[pos + 1]
        assert b0 & 0x70 == 0 and not b1 & 0x80
        n, pos = b1 & 0x7F, pos + 2
        if n == 126:
            n, pos = struct.unpack("!H", stream[pos : pos + 2])[0], pos + 2
        elif n == 127:
            n, pos = struct.unpack("!Q", stream[pos : pos + 8])[0], pos + 8
        payload, pos = stream[pos : pos + n], pos + n
        assert len(payload) == n, "truncated payload"
        if b0 & 0x0F == 0x8:
            assert pos == len(stream), "bytes after the close frame"
            if payload:
                assert struct.unpack("!H", payload[:2])[0] in VALID_CLOSE_CODES
                payload[2:].decode("utf-8")
