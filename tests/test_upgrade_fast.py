"""The compiled upgrade scan (fastrelay/_upgrade.pxi) against the reference
parser (fastrelay/handshake.py): for any request, a connection with the scan
on writes exactly the bytes, and joins exactly the room, that one with the
scan off does. The scan may only accept what the reference accepts, with the
same 101; everything else it defers."""

from __future__ import annotations

import base64
import logging
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from test_connection_sansio import ManualLoop, RecordingTransport, feed

from fastrelay import auth, handshake
from fastrelay._frames import Connection, Hub, State
from fastrelay.upgrade import Gate, GateSettings


class CountingGate(Gate):
    """The real gate, counting how often it was asked."""

    def __init__(
        self,
        limits: handshake.Limits,
        max_connections: int = 0,
        verifier: auth.Verifier | None = None,
    ) -> None:
        super().__init__(
            GateSettings(limits, max_connections, None, verifier), logging.getLogger("t")
        )
        self.asked = 0

    def decide(self, head: memoryview, scan_from: int, conn: Connection) -> Any:
        self.asked += 1
        return super().decide(head, scan_from, conn)


def upgrade(
    request: bytes,
    fast: bool,
    limits: handshake.Limits,
    step: int = 0,
    verifier: auth.Verifier | None = None,
) -> tuple[bytes, list[str], State, int]:
    """What one connection writes for `request`, the rooms that exist
    afterwards, its state, and how often the gate was asked."""
    loop = ManualLoop()
    gate = CountingGate(limits, verifier=verifier)
    hub = Hub(loop, gate, ping_interval=0.0)
    hub.fast_upgrade = fast
    hub.fast_needs_grant = verifier is not None
    hub.max_request_head = limits.max_head
    hub.max_headers = limits.max_headers
    hub.compression = limits.compression
    conn = Connection(hub)
    transport = RecordingTransport()
    conn.connection_made(transport)
    feed(conn, request, step)
    loop.run_turn()
    return transport.take(), sorted(hub.rooms), (conn.state, conn.read_only), gate.asked


KEY = base64.b64encode(bytes(range(16))).decode()
ORDINARY = (
    f"GET /chat?x=1 HTTP/1.1\r\nHost: relay.example:8443\r\nUpgrade: websocket\r\n"
    f"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
    "Sec-WebSocket-Version: 13\r\nUser-Agent: test\r\n\r\n"
).encode()


def test_an_ordinary_upgrade_is_accepted_in_c_with_the_reference_response() -> None:
    limits = handshake.Limits()
    fast = upgrade(ORDINARY, True, limits)
    slow = upgrade(ORDINARY, False, limits)
    assert fast[:3] == slow[:3]
    assert fast[0].startswith(b"HTTP/1.1 101 ") and fast[1] == ["/chat"]
    assert fast[3] == 0 and slow[3] == 1  # the gate was not asked on the fast path


def test_over_the_connection_limit_the_gate_answers() -> None:
    loop = ManualLoop()
    gate = CountingGate(handshake.Limits(), max_connections=1)
    hub = Hub(loop, gate, ping_interval=0.0)
    hub.fast_upgrade = True
    hub.max_connections = 1
    answers = []
    for _ in range(2):
        conn = Connection(hub)
        transport = RecordingTransport()
        conn.connection_made(transport)
        feed(conn, ORDINARY)
        loop.run_turn()
        answers.append(transport.take().split(b"\r\n", 1)[0])
    assert answers == [b"HTTP/1.1 101 Switching Protocols", b"HTTP/1.1 503 Service Unavailable"]
    assert gate.asked == 1


# Request parts: the variations valid requests come in, and mistakes. Half
# of the requests use valid parts only, so that the scan's accepting side is
# exercised as much as its deferring side.
VALID = {
    "path": ["/", "/room", "/a/b?c=d", "/r-1_~.!$&'()*+,;=:@", "/q?", "/x?y?z", "//"],
    "host": ["relay", "relay:8443", "[::1]:80", "127.0.0.1", "a.b-c_d~"],
    "key": [KEY, "dGhlIHNhbXBsZSBub25jZQ==", "+/+/+/+/+/+/+/+/+/+/+A=="],
    "connection": ["Upgrade", "upgrade", "keep-alive, Upgrade", "keep-alive,upgrade ", "UPGRADE"],
    "upgrade": ["websocket", "WebSocket", "h2c, websocket", " websocket "],
    "version": ["13", " 13 ", "13\t"],
    "method": ["GET"],
    "http": ["HTTP/1.1"],
    "extra": ["X-Thing: 1", "X-Tab: a\tb", "X-Empty:", "User-Agent: t/1.0 (x; y)"],
}
INVALID = {
    "path": ["/caf%C3%A9", "/a#b", "/\u00e4", "/a%2", "/sp ace", "/\x01", "*", "http://h/r"],
    "host": ["", "a b", "r\x7f", "h@x", "\u00fc", "h/x"],
    "key": [KEY[:-1], KEY[:-2] + "A=", "!" + KEY[1:], KEY + "x", KEY[:-2] + "==="],
    "connection": ["close", "Upgrade2", ""],
    "upgrade": ["websocket2", ""],
    "version": ["8", "13, 13", ""],
    "method": ["POST", "get"],
    "http": ["HTTP/1.0", "HTTP/2"],
    "extra": [
        "Content-Length: 0",
        "Content-Length: 5",
        "Transfer-Encoding: chunked",
        "Sec-WebSocket-Extensions: permessage-deflate",
        "Origin: http://x",
        "Host: again",
        "Sec-WebSocket-Key: " + KEY,
        "Sec-WebSocket-Version: 13",
        "Upgrade: websocket",
        " folded",
        "Bad Name: x",
        "X-Bin: \u00e9",
        "X-Ctl: a\x01b",
    ],
}


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    valid_only = draw(st.booleans())

    def part(name: str) -> str:
        pool = VALID[name] if valid_only else VALID[name] * 3 + INVALID[name]
        return draw(st.sampled_from(pool))

    lines = [
        f"Host: {part('host')}",
        f"Upgrade: {part('upgrade')}",
        f"Connection: {part('connection')}",
        f"Sec-WebSocket-Key: {part('key')}",
        f"Sec-WebSocket-Version: {part('version')}",
        *[part("extra") for _ in range(draw(st.integers(0, 2)))],
    ]
    lines = draw(st.permutations(lines))
    head = f"{part('method')} {part('path')} {part('http')}\r\n"
    head += "".join(f"{line}\r\n" for line in lines)
    data = bytearray((head + "\r\n").encode("utf-8"))
    # Now and then one byte changed anywhere, the blank line included.
    if not valid_only and draw(st.integers(0, 3)) == 0:
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    return bytes(data) + draw(st.sampled_from([b"", b"\x81\x80abcd"]))


@settings(max_examples=600, deadline=None)
@given(
    request=requests(),
    step=st.sampled_from([0, 0, 1, 7]),
    compression=st.booleans(),
    max_headers=st.sampled_from([64, 5]),
    max_head=st.sampled_from([8192, 150]),
)
def test_the_scan_never_disagrees_with_the_reference(
    request: bytes, step: int, compression: bool, max_headers: int, max_head: int
) -> None:
    limits = handshake.Limits(max_head=max_head, max_headers=max_headers, compression=compression)
    fast = upgrade(request, True, limits, step)
    slow = upgrade(request, False, limits, step)
    assert fast[:3] == slow[:3]


SECRET = b"s" * 32
TOKENS = {
    "lobby": auth.mint(SECRET, "HS256", ["/lobby"], 3600),
    "lobby, read-only": auth.mint(SECRET, "HS256", ["/lobby"], 3600, read_only=True),
    "other room": auth.mint(SECRET, "HS256", ["/elsewhere"], 3600),
    "expired": auth.mint(SECRET, "HS256", ["/lobby"], -3600),
    "bad signature": auth.mint(b"t" * 32, "HS256", ["/lobby"], 3600),
    "garbage": "not.a.token",
}


@settings(max_examples=300, deadline=None)
@given(
    token=st.sampled_from([None, *TOKENS]),
    second=st.sampled_from([None, *TOKENS]),
    where=st.sampled_from(["query", "header", "both", "two headers"]),
    room=st.sampled_from(["/lobby", "/elsewhere"]),
)
def test_with_tokens_the_scan_and_the_reference_grant_the_same(
    token: str | None, second: str | None, where: str, room: str
) -> None:
    """Access checks on: same refusals (401/403), same grants (read-only)."""
    verifier = auth.Verifier(SECRET, ["HS256"])
    first_value = TOKENS[token] if token else ""
    second_value = TOKENS[second] if second else first_value
    target, headers = room, ""
    if where in ("query", "both") and token:
        target += f"?x=1&token={first_value}"
    if where in ("header", "both") and token:
        headers += f"Authorization: Bearer {second_value if where == 'both' else first_value}\r\n"
    if where == "two headers" and token:
        headers += f"Authorization: Bearer {first_value}\r\nAuthorization: Basic abc\r\n"
    request = (
        f"GET {target} HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
        f"Sec-WebSocket-Version: 13\r\n{headers}\r\n"
    ).encode()
    limits = handshake.Limits()
    fast = upgrade(request, True, limits, verifier=verifier)
    slow = upgrade(request, False, limits, verifier=verifier)
    assert fast[:3] == slow[:3]
