"""The HTTP/1.1 upgrade request, parsed by fastrelay itself (RFC 6455 §4.2).

Pure functions: bytes in, a decision out. The protocol layer feeds the
request bytes gathered so far; the answer is "need more", "accept with this
101 response", or "answer with this HTTP response and close". Every HTTP
error is built by one function, `refuse`, from one table.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

# RFC 6455 §1.3: the GUID appended to the client's key.
_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_HEAD_END = b"\r\n\r\n"

# Characters allowed in a method token (RFC 9110 §5.6.2).
_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789"
                         b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")

# reason key (a metrics label) -> (status, phrase)
_STATUS = {
    "bad_request": (400, "Bad Request"),
    "forbidden_origin": (403, "Forbidden"),
    "method_not_allowed": (405, "Method Not Allowed"),
    "upgrade_required": (426, "Upgrade Required"),
    "headers_too_large": (431, "Request Header Fields Too Large"),
    "too_many_connections": (503, "Service Unavailable"),
}


# Sent with 426: the upgrade we expect and the version we speak (RFC 6455 §4.4).
UPGRADE_HEADERS = (("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13"))


@dataclass(frozen=True, slots=True)
class Limits:
    max_head: int = 8192
    max_headers: int = 64
    allowed_origins: tuple[str, ...] = ()
    compression: bool = False  # negotiate permessage-deflate (RFC 7692)


@dataclass(frozen=True, slots=True)
class Incomplete:
    """Not a whole request head yet; search again from `scan_from`."""

    scan_from: int


@dataclass(frozen=True, slots=True)
class Accept:
    room: str
    response: bytes
    consumed: int  # bytes of the request head; what follows is frames
    deflate: bool = False  # permessage-deflate negotiated


@dataclass(frozen=True, slots=True)
class Refuse:
    status: int
    reason: str  # metrics label; "" for a page served on purpose
    detail: str
    response: bytes


@dataclass(frozen=True, slots=True)
class PlainGet:
    """A GET without an upgrade: the server may serve the demo page."""

    path: str


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a client key (RFC 6455 §4.2.2 step 5.4)."""
    digest = hashlib.sha1(key.encode("ascii") + _ACCEPT_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def refuse(reason: str, detail: str, extra_headers: tuple[tuple[str, str], ...] = ()) -> Refuse:
    status, phrase = _STATUS[reason]
    return Refuse(status, reason, detail, http_response(status, phrase, detail.encode() + b"\n",
                                                        "text/plain; charset=utf-8", extra_headers))


def http_response(status: int, phrase: str, body: bytes, content_type: str,
                  extra_headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    lines = [f"HTTP/1.1 {status} {phrase}",
             f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}",
             "Connection: close"]
    lines += [f"{name}: {value}" for name, value in extra_headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _tokens(value: str) -> set[str]:
    """Comma-separated, case-insensitive tokens (RFC 9110 §5.6.1)."""
    return {part.strip().lower() for part in value.split(",")}


def _looks_like_http(data: bytes) -> bool:
    """Reject early what cannot become a request line: a TLS ClientHello or
    other binary on the plain port should not wait for a terminator."""
    first_line = data.split(b"\r", 1)[0]
    method = first_line.split(b" ", 1)[0]
    if not all(c in _TOKEN_CHARS for c in method):
        return False
    return not _has_controls(first_line.decode("latin-1"))


def _has_controls(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def parse_request(data: bytes | memoryview, scan_from: int, limits: Limits) -> Incomplete | Accept | Refuse | PlainGet:
    """Decide on the request head at the start of `data`.

    `scan_from` is where the previous call stopped looking for the blank line
    that ends the head, so a request trickling in byte by byte costs linear
    time in total.
    """
    start = max(0, scan_from - 3)
    found = bytes(data[start:limits.max_head + len(_HEAD_END)]).find(_HEAD_END)
    end = start + found if found >= 0 else -1
    if end < 0:
        if not _looks_like_http(bytes(data[:256])):
            return refuse("bad_request", "not an HTTP request")
        if len(data) > limits.max_head:
            return refuse("headers_too_large", f"request head over {limits.max_head} bytes")
        return Incomplete(len(data))
    consumed = end + len(_HEAD_END)
    if consumed > limits.max_head:
        return refuse("headers_too_large", f"request head over {limits.max_head} bytes")
    try:
        head = bytes(data[:end]).decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
        return refuse("bad_request", "undecodable request head")
    return _decide(head, consumed, limits)


def _decide(head: str, consumed: int, limits: Limits) -> Accept | Refuse | PlainGet:
    request_line, *header_lines = head.split("\r\n")
    parts = request_line.split(" ")
    if (_has_controls(request_line) or len(parts) != 3 or not parts[0]
            or not all(ord(c) in _TOKEN_CHARS for c in parts[0])):
        return refuse("bad_request", "malformed request line")
    method, target, version = parts
    if not version.startswith("HTTP/") or version[5:] not in ("1.0", "1.1"):
        return refuse("bad_request", f"unsupported protocol version {version!r}")
    if len(header_lines) > limits.max_headers:
        return refuse("headers_too_large", f"more than {limits.max_headers} header fields")

    headers: dict[str, list[str]] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        # RFC 9112 §5: no whitespace before the colon, and obsolete line
        # folding is rejected.
        if not sep or not name or name != name.strip() or line[0] in " \t":
            return refuse("bad_request", "malformed header field")
        headers.setdefault(name.lower(), []).append(value.strip(" \t"))

    if method != "GET":
        # RFC 6455 §4.1: the handshake is a GET.
        return refuse("method_not_allowed", f"method {method} not allowed", (("Allow", "GET"),))
    if version != "HTTP/1.1":
        # RFC 6455 §4.1: HTTP/1.1 or later.
        return refuse("bad_request", "HTTP/1.1 required")
    if not target.startswith("/"):
        return refuse("bad_request", "request target must be a path")
    path = target.split("?", 1)[0]
    try:
        # Raw bytes above 0x7F (sent unencoded by some clients) and %XX
        # escapes both decode to the same UTF-8 room name.
        room = unquote_to_bytes(path.encode("latin-1")).decode("utf-8")
    except UnicodeDecodeError:
        return refuse("bad_request", "path is not valid UTF-8 after percent-decoding")

    def single(name: str) -> str | None:
        values = headers.get(name)
        return values[0] if values and len(values) == 1 else None

    if len(headers.get("host", ())) != 1:
        return refuse("bad_request", "exactly one Host header required")
    upgrade = ",".join(headers.get("upgrade", ()))
    if "websocket" not in _tokens(upgrade):
        if not upgrade:
            return PlainGet(room)
        return refuse("upgrade_required", "Upgrade: websocket required", UPGRADE_HEADERS)
    if "upgrade" not in _tokens(",".join(headers.get("connection", ()))):
        return refuse("bad_request", "Connection: Upgrade required")
    if single("sec-websocket-version") != "13":
        # RFC 6455 §4.4: name the version we speak.
        return refuse("upgrade_required", "unsupported Sec-WebSocket-Version", UPGRADE_HEADERS)
    key = single("sec-websocket-key")
    if key is None or not _key_is_valid(key):
        return refuse("bad_request", "missing or malformed Sec-WebSocket-Key")
    if limits.allowed_origins:
        origin = single("origin")
        # Scheme and host are case-insensitive (RFC 6454 §6.2); the
        # configured list is lower-cased when loaded.
        if origin is None or origin.lower() not in limits.allowed_origins:
            return refuse("forbidden_origin", f"origin {origin!r} not allowed")

    deflate = limits.compression and _offers_deflate(headers.get("sec-websocket-extensions", []))
    response = ("HTTP/1.1 101 Switching Protocols\r\n"
                "Upgrade: websocket\r\n"
                "Connection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {accept_key(key)}\r\n"
                + (f"Sec-WebSocket-Extensions: {DEFLATE_RESPONSE}\r\n" if deflate else "")
                + "\r\n").encode("ascii")
    return Accept(room, response, consumed, deflate)


# RFC 7692 §7.1.1: without context takeover on either side every message is
# compressed on its own, so the relay compresses a message once for all
# members and inflates each client message with a fresh decompressor. A
# server may ask for client_no_context_takeover even when it was not offered.
DEFLATE_RESPONSE = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


def _offers_deflate(values: list[str]) -> bool:
    """True if one permessage-deflate offer is one we can accept as is
    (RFC 7692 §7.1): known parameters, each at most once, and no limit on
    our window below the 15 bits the relay compresses with."""
    for offer in ",".join(values).split(","):
        name, *params = [part.strip() for part in offer.split(";")]
        if name.lower() != "permessage-deflate":
            continue
        seen: set[str] = set()
        acceptable = True
        for param in params:
            key, _, value = param.partition("=")
            key, value = key.strip().lower(), value.strip().strip('"')
            if key in seen:
                acceptable = False
            seen.add(key)
            if key in ("server_no_context_takeover", "client_no_context_takeover"):
                acceptable = acceptable and not value
            elif key == "client_max_window_bits":
                # We inflate with a 15-bit window, which reads any smaller one.
                acceptable = acceptable and (not value or (value.isdigit() and 8 <= int(value) <= 15))
            elif key == "server_max_window_bits":
                acceptable = acceptable and value == "15"
            else:
                acceptable = False
        if acceptable:
            return True
    return False


def _key_is_valid(key: str) -> bool:
    # RFC 6455 §4.1: base64 of 16 random bytes.
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (binascii.Error, UnicodeEncodeError):
        return False
