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
import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

# RFC 6455 §1.3: the GUID appended to the client's key.
_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_HEAD_END = b"\r\n\r\n"

# Characters allowed in a token: a method or a field name (RFC 9110 §5.6.2, §5.1).
_TOKEN_CHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)

# RFC 9112 §2.2: lines end with CRLF; a CR not followed by LF, or an LF not
# preceded by CR, is refused rather than read as a line end (a mismatch with a
# proxy reading it the other way is how requests get smuggled).
_BARE_CR_OR_LF = re.compile(rb"\r(?=[^\n])|(?<!\r)\n")

# RFC 9110 §5.5: a field value is visible characters, obs-text (0x80-0xFF),
# SP and HTAB; every other control character is refused.
_VALUE_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")

# Any control character (the request line allows none, not even HTAB). A
# regex, not a loop over characters: a long target (a token in the query)
# must not cost a Python step per byte.
_CONTROL = re.compile("[\x00-\x1f\x7f]")

# RFC 9112 §3.2.2: a server MUST accept the absolute-form. The schemes whose
# URIs name this relay: http(s) (RFC 9110 §4.2) and ws(s) (RFC 6455 §3).
# Scheme names are case-insensitive (RFC 3986 §3.1).
_ABSOLUTE_FORM = re.compile(r"(?i:https?|wss?)://([^/?]*)(.*)", re.DOTALL)

# host[:port] as a reg-name, IPv4 or [IPv6] (RFC 3986 §3.2.2): no userinfo
# ("@", which RFC 9110 §4.2.4 says to treat as an error), no path, never empty
# (RFC 9110 §4.2.1).
_AUTHORITY = re.compile(r"[A-Za-z0-9\-._~%!$&'()*+,;=:\[\]]+")

# A Content-Length of zero: the one length an upgrade request may carry
# (ASCII digits only; str.isdigit() would also take "²").
_ZERO_LENGTH = re.compile(r"[ \t]*0+[ \t]*")

# reason key (a metrics label) -> (status, phrase)
_STATUS = {
    "bad_request": (400, "Bad Request"),
    "unauthorized": (401, "Unauthorized"),
    "forbidden_origin": (403, "Forbidden"),
    "forbidden_room": (403, "Forbidden"),
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
    deflate_window: int = 15  # with it, our LZ77 window in bits (server_max_window_bits)
    # What the access checks read: the query string (without "?") and the
    # values of the Authorization header fields, as received.
    query: str = ""
    authorization: tuple[str, ...] = ()
    # Set by the gate's access checks, not by the parser:
    read_only: bool = False  # may join but not send (closed with 1008 if it does)
    expires_at: float = 0.0  # event-loop time (loop.time()) of a 1008 close; 0: never


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
    return Refuse(
        status,
        reason,
        detail,
        http_response(
            status, phrase, detail.encode() + b"\n", "text/plain; charset=utf-8", extra_headers
        ),
    )


def http_response(
    status: int,
    phrase: str,
    body: bytes,
    content_type: str,
    extra_headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
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
    return _CONTROL.search(text) is not None


def parse_request(
    data: bytes | memoryview, scan_from: int, limits: Limits
) -> Incomplete | Accept | Refuse | PlainGet:
    """Decide on the request head at the start of `data`.

    `scan_from` is where the previous call stopped looking for the blank line
    that ends the head, so a request trickling in byte by byte costs linear
    time in total.
    """
    if not _looks_like_http(bytes(data[:256])):
        return refuse("bad_request", "not an HTTP request")
    start = max(0, scan_from - 3)
    window_end = limits.max_head + len(_HEAD_END)
    found = bytes(data[start:window_end]).find(_HEAD_END)
    end = start + found if found >= 0 else -1
    # Look for bare CR or LF only in bytes not examined before (one back, for
    # a CR that ended the previous read) up to the CRLF ending the last
    # field line: a request ending its lines with LF alone is refused when it
    # arrives instead of waiting for a CRLF CRLF that never comes.
    head_seen = end + 2 if end >= 0 else min(len(data), window_end)
    if _BARE_CR_OR_LF.search(data, max(0, scan_from - 1), head_seen):
        return refuse("bad_request", "bare CR or LF in the request head")
    if end < 0:
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
    if (
        _has_controls(request_line)
        or len(parts) != 3
        or not parts[0]
        or not all(ord(c) in _TOKEN_CHARS for c in parts[0])
    ):
        return refuse("bad_request", "malformed request line")
    method, target, version = parts
    if not version.startswith("HTTP/") or version[5:] not in ("1.0", "1.1"):
        return refuse("bad_request", f"unsupported protocol version {version!r}")
    if len(header_lines) > limits.max_headers:
        return refuse("headers_too_large", f"more than {limits.max_headers} header fields")

    headers: dict[str, list[str]] = {}
    for line in header_lines:
        if line[:1] in (" ", "\t"):
            # RFC 9112 §5.2: obsolete line folding (and whitespace before the
            # first field, §2.2) is refused, not unfolded.
            return refuse("bad_request", "obsolete line folding")
        name, sep, value = line.partition(":")
        # RFC 9112 §5.1: the name is a token right up to the colon.
        if not sep or not _is_token(name):
            return refuse("bad_request", "malformed header field name")
        if _VALUE_CONTROL.search(value):
            return refuse("bad_request", f"control character in header field {name}")
        headers.setdefault(name.lower(), []).append(value.strip(" \t"))

    if method != "GET":
        # RFC 6455 §4.1: the handshake is a GET.
        return refuse("method_not_allowed", f"method {method} not allowed", (("Allow", "GET"),))
    if version != "HTTP/1.1":
        # RFC 6455 §4.1: HTTP/1.1 or later.
        return refuse("bad_request", "HTTP/1.1 required")
    split = _split_target(target)
    if split is None:
        return refuse("bad_request", "request target must be a path or an http(s)/ws(s) URI")
    path, query = split
    try:
        # Raw bytes above 0x7F (sent unencoded by some clients) and %XX
        # escapes both decode to the same UTF-8 room name.
        room = unquote_to_bytes(path.encode("latin-1")).decode("utf-8")
    except UnicodeDecodeError:
        return refuse("bad_request", "path is not valid UTF-8 after percent-decoding")

    def single(name: str) -> str | None:
        values = headers.get(name)
        return values[0] if values and len(values) == 1 else None

    hosts = headers.get("host", [])
    if len(hosts) != 1 or not _AUTHORITY.fullmatch(hosts[0]):
        # RFC 9112 §3.2: none, several, or an invalid one is a 400.
        return refuse("bad_request", "exactly one valid Host header required")
    if _announces_body(headers):
        return refuse("bad_request", "request announces a body")
    upgrade = ",".join(headers.get("upgrade", ()))
    if "websocket" not in _tokens(upgrade):
        if not upgrade:
            return PlainGet(room)
        return refuse("upgrade_required", "Upgrade: websocket required", UPGRADE_HEADERS)
    if "upgrade" not in _tokens(",".join(headers.get("connection", ()))):
        return refuse("bad_request", "Connection: Upgrade required")
    for name in ("sec-websocket-version", "sec-websocket-key"):
        if len(headers.get(name, ())) > 1:
            # RFC 6455 §4.1: each is sent once; two may disagree.
            return refuse("bad_request", f"duplicate {name} header")
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

    window = (
        _deflate_window(headers.get("sec-websocket-extensions", [])) if limits.compression else 0
    )
    extension = DEFLATE_RESPONSE + (f"; server_max_window_bits={window}" if window < 15 else "")
    response = (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(key)}\r\n"
        + (f"Sec-WebSocket-Extensions: {extension}\r\n" if window else "")
        + "\r\n"
    ).encode("ascii")
    return Accept(
        room,
        response,
        consumed,
        window > 0,
        window or 15,
        query=query,
        authorization=tuple(headers.get("authorization", ())),
    )


# RFC 7692 §7.1.1: without context takeover on either side every message is
# compressed on its own, so the relay compresses a message once for all
# members and inflates each client message with a fresh decompressor. A
# server may ask for client_no_context_takeover even when it was not offered.
DEFLATE_RESPONSE = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


def _deflate_window(values: list[str]) -> int:
    """The server window (bits) of the first permessage-deflate offer we can
    accept as is (RFC 7692 §7.1): known parameters, each at most once, and
    server_max_window_bits, when given, 9 to 15 (zlib has no raw 8-bit
    window). 0: no acceptable offer."""
    for offer in ",".join(values).split(","):
        name, *params = [part.strip() for part in offer.split(";")]
        if name.lower() != "permessage-deflate":
            continue
        seen: set[str] = set()
        acceptable = True
        window = 15
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
                acceptable = acceptable and (
                    not value or (value.isascii() and value.isdigit() and 8 <= int(value) <= 15)
                )
            elif key == "server_max_window_bits":
                # §7.1.2.1: we must compress with at most this window.
                if value.isascii() and value.isdigit() and 9 <= int(value) <= 15:
                    window = int(value)
                else:
                    acceptable = False
            else:
                acceptable = False
        if acceptable:
            return window
    return 0


def _is_token(text: str) -> bool:
    return bool(text) and all(ord(c) in _TOKEN_CHARS for c in text)


def _split_target(target: str) -> tuple[str, str] | None:
    """The path and the query of an origin-form or absolute-form target
    (RFC 9112 §3.2.1, §3.2.2); None for the asterisk- and authority-forms,
    which a GET may not use, and for URIs of other schemes or without a host."""
    if not target.startswith("/"):
        absolute = _ABSOLUTE_FORM.fullmatch(target)
        if absolute is None or not _AUTHORITY.fullmatch(absolute[1]):
            return None
        target = absolute[2]
    path, _, query = target.partition("?")
    # An empty path is the root (RFC 9110 §4.2.3).
    return path or "/", query


def _announces_body(headers: dict[str, list[str]]) -> bool:
    """Any Transfer-Encoding, or a Content-Length other than 0 (RFC 9112
    §6.1, §6.2). The upgrade request has no body (RFC 6455 §4.1) and what
    follows its head is read as frames, so a body would be misread."""
    if "transfer-encoding" in headers:
        return True
    lengths = ",".join(headers.get("content-length", ["0"])).split(",")
    return not all(_ZERO_LENGTH.fullmatch(length) for length in lengths)


def _key_is_valid(key: str) -> bool:
    # RFC 6455 §4.1: base64 of 16 random bytes.
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (binascii.Error, UnicodeEncodeError):
        return False
