"""The opening handshake from the client's side (RFC 6455 section 4.1): the
upgrade request, and the check of the server's 101 against it."""

from __future__ import annotations

import base64
import hashlib
import os

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class HandshakeError(Exception):
    pass


def upgrade_request(host: str, port: int, path: str) -> tuple[bytes, bytes]:
    """The request to send, and the Sec-WebSocket-Accept it must get back."""
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    req = (
        b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n" % (path.encode(), host.encode(), port, key)
    )
    return req, accept


def check_response(head: bytes, accept: bytes) -> None:
    """A 101 with the right Sec-WebSocket-Accept, or HandshakeError."""
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 101"):
        raise HandshakeError("server answered %r" % lines[0])
    got = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "sec-websocket-accept":
            got = value.strip().encode()
    if got != accept:
        raise HandshakeError("bad Sec-WebSocket-Accept %r" % got)
