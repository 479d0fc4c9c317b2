"""The HTTP upgrade: a table of requests against a real relay, and the pure
parser under every split of its input."""

from __future__ import annotations

import base64
import hashlib

import pytest

from fastrelay import handshake
from wsraw import RawClient, frame, handshake_request

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3's example key
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def request(lines: list[str]) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def good(path="/", *, drop=(), replace=None, method="GET", version="HTTP/1.1"):
    headers = {
        "Host": "127.0.0.1",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
    }
    headers.update(replace or {})
    return request(
        [f"{method} {path} {version}"] + [f"{k}: {v}" for k, v in headers.items() if k not in drop]
    )


TABLE = {
    "valid": (good(), 101),
    "missing key": (good(drop=("Sec-WebSocket-Key",)), 400),
    "key not base64": (good(replace={"Sec-WebSocket-Key": "not base64!!"}), 400),
    "key of 15 bytes": (
        good(replace={"Sec-WebSocket-Key": base64.b64encode(b"x" * 15).decode()}),
        400,
    ),
    "wrong version": (good(replace={"Sec-WebSocket-Version": "8"}), 426),
    "missing version": (good(drop=("Sec-WebSocket-Version",)), 426),
    "POST": (good(method="POST"), 405),
    "HTTP/1.0": (good(version="HTTP/1.0"), 400),
    "missing Upgrade on a websocket request": (good(drop=("Upgrade",)), 426),
    "Upgrade of another protocol": (good(replace={"Upgrade": "h2c"}), 426),
    "missing Connection token": (good(drop=("Connection",)), 400),
    "Connection: keep-alive only": (good(replace={"Connection": "keep-alive"}), 400),
    "Connection: keep-alive, Upgrade": (good(replace={"Connection": "keep-alive, Upgrade"}), 101),
    "missing Host": (good(drop=("Host",)), 400),
    "lowercase names and values": (
        request(
            [
                "GET /x HTTP/1.1",
                "host: h",
                "upgrade: WebSocket",
                "connection: upgrade",
                f"sec-websocket-key: {KEY}",
                "sec-websocket-version: 13",
            ]
        ),
        101,
    ),
    "UPPERCASE names and values": (
        request(
            [
                "GET /x HTTP/1.1",
                "HOST: h",
                "UPGRADE: WEBSOCKET",
                "CONNECTION: UPGRADE",
                f"SEC-WEBSOCKET-KEY: {KEY}",
                "SEC-WEBSOCKET-VERSION: 13",
            ]
        ),
        101,
    ),
    "head over the limit": (good(replace={"X-Filler": "a" * 9000}), 431),
    "too many headers": (
        request(["GET / HTTP/1.1", "Host: h"] + [f"X-{i}: v" for i in range(70)]),
        431,
    ),
    "plain GET without upgrade": (request(["GET / HTTP/1.1", "Host: h"]), 426),
    "garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(40)), 400),
    "malformed request line": (request(["GET /", "Host: h"]), 400),
    "header without colon": (
        good(replace={"Broken header line": ""}).replace(b"Broken header line: ", b"Broken"),
        400,
    ),
    # RFC 9112 §3.2.2: a server MUST accept the absolute-form.
    "absolute-form target": (good(path="http://example.test/"), 101),
    "asterisk-form target": (good(path="*"), 400),
    "authority-form target": (good(path="example.test:443"), 400),
    "Transfer-Encoding on the upgrade": (good(replace={"Transfer-Encoding": "chunked"}), 400),
    "NUL in a header value": (good(replace={"X-Note": "a\x00b"}), 400),
    "bare LF in a header value": (good(replace={"X-Note": "a\nb"}), 400),
    "header lines ended by LF alone": (good().replace(b"\r\n", b"\n"), 400),
    "Content-Length: 5 on the upgrade": (good(replace={"Content-Length": "5"}), 400),
    "duplicate Host": (good().replace(b"\r\n\r\n", b"\r\nHost: 127.0.0.1\r\n\r\n"), 400),
    "duplicate Sec-WebSocket-Key": (
        good().replace(b"\r\n\r\n", f"\r\nSec-WebSocket-Key: {KEY}\r\n\r\n".encode()),
        400,
    ),
    "duplicate Sec-WebSocket-Version": (
        good().replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Version: 13\r\n\r\n"),
        400,
    ),
    "obsolete line folding": (good(replace={"X-Note": "a\r\n b"}), 400),
}


@pytest.fixture(scope="module")
def hs_relay(tmp_path_factory):
    from conftest import start_relay

    relay = start_relay(tmp_path_factory.mktemp("hs"), {"relay": {"serve_demo": False}})
    yield relay
    relay.stop()


@pytest.mark.parametrize("case", list(TABLE))
def test_handshake_table(hs_relay, case):
    data, status = TABLE[case]
    client = RawClient(hs_relay.port, handshake=False)
    try:
        client.send(data)
        head = client.read_http_head()
        assert head.split(b" ", 2)[1] == str(status).encode(), head
        if status == 101:
            assert f"Sec-WebSocket-Accept: {ACCEPT}".encode() in head
        else:
            assert b"Connection: close" in head
            client.read_to_eof()  # the relay closes after an error response
        if status == 426:
            assert b"Sec-WebSocket-Version: 13" in head
        if status == 405:
            assert b"Allow: GET" in head
    finally:
        client.close()


def test_request_arriving_one_byte_at_a_time(hs_relay):
    client = RawClient(hs_relay.port, handshake=False)
    try:
        for byte in handshake_request("/trickle"):
            client.send(bytes([byte]))
        assert client.read_http_head().startswith(b"HTTP/1.1 101 ")
        client.send(frame(0x1, b"after trickle"))
        assert client.recv_frame() == (True, 0x1, b"after trickle")
    finally:
        client.close()


def test_ping_in_same_segment_as_request_is_answered_after_101(hs_relay):
    client = RawClient(hs_relay.port, handshake=False)
    try:
        client.send(handshake_request("/same-segment") + frame(0x9, b"early") + frame(0x1, b"msg"))
        head = client.read_http_head()
        assert head.startswith(b"HTTP/1.1 101 ")
        assert client.recv_frame() == (True, 0xA, b"early")
        assert client.recv_frame() == (True, 0x1, b"msg")
    finally:
        client.close()


def test_percent_encoded_path_and_query_string_choose_the_room(hs_relay):
    a = RawClient(hs_relay.port, "/caf%C3%A9%20room?token=1")
    b = RawClient(hs_relay.port, "/café room".replace(" ", "%20") + "?other=2")
    other = RawClient(hs_relay.port, "/caf%C3%A9%20room2")
    try:
        a.send(frame(0x1, b"same room"))
        assert b.recv_frame() == (True, 0x1, b"same room")
        other.send(frame(0x1, b"mine"))
        assert other.recv_frame() == (True, 0x1, b"mine")  # nothing from room a came first
    finally:
        for c in (a, b, other):
            c.close()


def test_demo_page_served_on_plain_get_when_enabled(relay_factory):
    relay = relay_factory({"relay": {"serve_demo": True}})
    client = RawClient(relay.port, handshake=False)
    try:
        client.send(request(["GET / HTTP/1.1", "Host: h"]))
        status, head, body = client.read_http_response()
        assert status == 200
        assert b"text/html" in head
        assert b"<html" in body.lower()
    finally:
        client.close()


# -- the pure parser -------------------------------------------------------------

LIMITS = handshake.Limits()


def test_accept_key_matches_rfc_example():
    assert handshake.accept_key(KEY) == ACCEPT
    digest = hashlib.sha1(KEY.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    assert base64.b64encode(digest).decode() == ACCEPT


def feed_in_pieces(data: bytes, cuts: list[int]):
    """Feed growing prefixes like the protocol does; return the decision."""
    scan_from = 0
    received = b""
    pieces = [data[i:j] for i, j in zip([0] + cuts, cuts + [len(data)], strict=True)]
    for piece in pieces:
        received += piece
        result = handshake.parse_request(memoryview(received), scan_from, LIMITS)
        if not isinstance(result, handshake.Incomplete):
            return result
        scan_from = result.scan_from
    return result


@pytest.mark.parametrize("cut_every", [1, 2, 3, 7, 100])
def test_parser_is_invariant_under_splits(cut_every):
    data = good("/room?q") + b"\x81\x80trailing-frame-bytes"
    whole = handshake.parse_request(data, 0, LIMITS)
    assert isinstance(whole, handshake.Accept)
    split = feed_in_pieces(data, list(range(cut_every, len(data), cut_every)))
    assert split == whole
    assert data[whole.consumed :] == b"\x81\x80trailing-frame-bytes"
    assert whole.room == "/room"


def test_parser_waits_for_the_blank_line():
    assert isinstance(handshake.parse_request(good()[:-2], 0, LIMITS), handshake.Incomplete)
