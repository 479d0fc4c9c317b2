"""The upgrade request read as RFC 9112 / 9110 say: absolute-form targets
accepted; control characters, bare CR or LF, a body, duplicated Host /
Sec-WebSocket-Key / Sec-WebSocket-Version and obsolete line folding refused
with 400. Unit rows for the pure parser, properties over generated requests,
and a live relay for what the client sees."""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

from fastrelay import handshake
from scrape import scrape
from wsraw import RawClient, frame

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3's example key
OTHER_KEY = base64.b64encode(b"another 16 bytes").decode()
LIMITS = handshake.Limits()
STEP = 10.0  # bound of every blocking read on a live relay


def upgrade(target: str = "/", fields: list[str] | None = None) -> bytes:
    """An upgrade request; `fields` replace the five usual header lines."""
    if fields is None:
        fields = [
            "Host: example.test",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {KEY}",
            "Sec-WebSocket-Version: 13",
        ]
    return "\r\n".join([f"GET {target} HTTP/1.1", *fields, "", ""]).encode("latin-1")


def with_field(field: str) -> bytes:
    """A valid upgrade request with one more header line."""
    return upgrade().replace(b"\r\n\r\n", f"\r\n{field}\r\n\r\n".encode("latin-1"))


Decision = handshake.Incomplete | handshake.Accept | handshake.Refuse | handshake.PlainGet


def parse(data: bytes) -> Decision:
    return handshake.parse_request(data, 0, LIMITS)


def parse_byte_by_byte(data: bytes) -> Decision:
    """Feed growing prefixes one byte longer each time, as a trickling client would."""
    scan_from = 0
    for size in range(1, len(data) + 1):
        result = handshake.parse_request(memoryview(data[:size]), scan_from, LIMITS)
        if not isinstance(result, handshake.Incomplete):
            return result
        scan_from = result.scan_from
    return result


REFUSED = {
    # control characters in field names and values (RFC 9110 §5.1, §5.5)
    "NUL in a value": with_field("X-Note: a\x00b"),
    "DEL in a value": with_field("X-Note: a\x7fb"),
    "ESC in a value": with_field("X-Note: \x1b[31m"),
    "NUL at the end of the Host value": upgrade().replace(b"example.test", b"example.test\x00"),
    "NUL in a name": with_field("X-No\x00te: a"),
    "HTAB in a name": with_field("X-No\tte: a"),
    "space before the colon": with_field("X-Note : a"),
    "name not a token": with_field("X(Note): a"),
    "empty name": with_field(": a"),
    "line without a colon": with_field("X-Note"),
    # line ends (RFC 9112 §2.2)
    "bare LF inside a value": with_field("X-Note: a\nb"),
    "bare CR inside a value": with_field("X-Note: a\rb"),
    "CR before the CRLF of the last line": upgrade().replace(b"13\r\n\r\n", b"13\r\r\n\r\n"),
    "LF before the CRLF of the last line": upgrade().replace(b"13\r\n\r\n", b"13\n\r\n\r\n"),
    "lines ended by LF alone": upgrade().replace(b"\r\n", b"\n"),
    "bare LF in the request line": upgrade().replace(b"GET / ", b"GET /\n "),
    # a body (RFC 9112 §6.1, §6.2)
    "Transfer-Encoding: chunked": with_field("Transfer-Encoding: chunked"),
    "Transfer-Encoding: identity": with_field("Transfer-Encoding: identity"),
    "empty Transfer-Encoding": with_field("Transfer-Encoding:"),
    "transfer-encoding in lower case": with_field("transfer-encoding: gzip, chunked"),
    "Content-Length: 5": with_field("Content-Length: 5"),
    "Content-Length list with a non-zero": with_field("Content-Length: 0, 5"),
    "second Content-Length non-zero": with_field("Content-Length: 0\r\nContent-Length: 1"),
    "Content-Length not a number": with_field("Content-Length: zero"),
    "Content-Length of a non-ASCII digit": with_field("Content-Length: \xb2"),
    "empty Content-Length": with_field("Content-Length:"),
    # duplicates (RFC 9112 §3.2; RFC 6455 §4.1)
    "duplicate Host, same value": with_field("Host: example.test"),
    "duplicate Host, other value": with_field("Host: elsewhere.test"),
    "duplicate Sec-WebSocket-Key, same value": with_field(f"Sec-WebSocket-Key: {KEY}"),
    "duplicate Sec-WebSocket-Key, other value": with_field(f"Sec-WebSocket-Key: {OTHER_KEY}"),
    "duplicate Sec-WebSocket-Version 13": with_field("Sec-WebSocket-Version: 13"),
    "duplicate Sec-WebSocket-Version, lower case": with_field("sec-websocket-version: 13"),
    # obsolete line folding (RFC 9112 §5.2) and whitespace before the first field (§2.2)
    "folded value": with_field("X-Note: a\r\n b"),
    "folded value with HTAB": with_field("X-Note: a\r\n\tb"),
    "whitespace before the first field": upgrade().replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\n "),
    # invalid Host (RFC 9112 §3.2)
    "empty Host": upgrade().replace(b"Host: example.test", b"Host:"),
    "Host with userinfo": upgrade().replace(b"Host: example.test", b"Host: me@example.test"),
    "Host with a path": upgrade().replace(b"Host: example.test", b"Host: example.test/x"),
    # targets a GET may not use, or URIs that do not name this relay (RFC 9112 §3.2)
    "asterisk-form": upgrade("*"),
    "authority-form": upgrade("example.test:443"),
    "relative path": upgrade("room"),
    "scheme not served": upgrade("ftp://example.test/room"),
    "absolute URI without a host": upgrade("http:///room"),
    "absolute URI with userinfo": upgrade("http://me@example.test/room"),
    "absolute URI with a fragment in the authority": upgrade("http://example.test#x"),
    "scheme without //": upgrade("http:/room"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_with_400(case):
    result = parse(REFUSED[case])
    assert isinstance(result, handshake.Refuse), result
    assert (result.status, result.reason) == (400, "bad_request"), result.detail
    assert result.response.startswith(b"HTTP/1.1 400 Bad Request\r\n")


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusal_is_the_same_byte_by_byte(case):
    assert parse_byte_by_byte(REFUSED[case]) == parse(REFUSED[case])


def test_lines_ended_by_lf_are_refused_before_the_head_could_end():
    # Without the check this would wait for a CRLF CRLF that never comes.
    result = parse(b"GET / HTTP/1.1\r\nHost: example.test\nUpgrade: websocket\n")
    assert isinstance(result, handshake.Refuse) and result.status == 400


def test_binary_with_line_feeds_is_still_not_http():
    # A TLS ClientHello on the plain port is named for what it is in the log,
    # not for the 0x0A bytes it happens to contain.
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(40))
    assert parse(hello).detail == "not an HTTP request"
    assert parse_byte_by_byte(hello) == parse(hello)


def test_a_cr_ending_a_read_waits_for_its_lf():
    assert isinstance(parse(b"GET / HTTP/1.1\r"), handshake.Incomplete)
    assert isinstance(parse(b"GET / HTTP/1.1\r\nHost: h\r"), handshake.Incomplete)


ACCEPTED = {
    "absolute-form http with port and query": ("http://example.test:8443/room?x=1", "/room"),
    "absolute-form https": ("https://example.test/room", "/room"),
    "absolute-form ws": ("ws://example.test/room", "/room"),
    "absolute-form wss": ("wss://example.test/a/b", "/a/b"),
    "scheme in upper case": ("HTTP://Example.Test/room", "/room"),
    "empty path": ("http://example.test", "/"),
    "empty path with a query": ("http://example.test?x=/room", "/"),
    "IPv6 literal": ("http://[::1]:8443/room", "/room"),
    "percent-encoded path": ("http://example.test/caf%C3%A9", "/café"),
    "origin-form as before": ("/room?x=1", "/room"),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_absolute_form_target_names_the_room(case):
    target, room = ACCEPTED[case]
    result = parse(upgrade(target))
    assert isinstance(result, handshake.Accept), result
    assert result.room == room
    assert parse_byte_by_byte(upgrade(target)) == result


@pytest.mark.parametrize(
    "field",
    [
        "X-Note: caf\xe9 \xff",  # obs-text (RFC 9110 §5.5)
        "X-Note: a\tb",
        "X-Note:",
        "Content-Length: 0",
        "Content-Length: 0, 0",
        "Content-Length: 0\r\nContent-Length: 0",
        "X-Odd-But-Token!#$%&'*+-.^_`|~: v",
    ],
)
def test_lenient_where_the_rfc_allows(field):
    assert isinstance(parse(with_field(field)), handshake.Accept)


def test_duplicate_version_is_400_not_426():
    result = parse(with_field("Sec-WebSocket-Version: 8"))
    assert (result.status, result.reason) == (400, "bad_request")
    # a single unsupported version still names ours
    single = parse(upgrade().replace(b"Version: 13", b"Version: 8"))
    assert single.status == 426 and b"Sec-WebSocket-Version: 13" in single.response


def test_a_plain_get_with_a_body_is_refused_too():
    plain = b"GET / HTTP/1.1\r\nHost: example.test\r\n"
    assert isinstance(parse(plain + b"\r\n"), handshake.PlainGet)
    result = parse(plain + b"Transfer-Encoding: chunked\r\n\r\n")
    assert (result.status, result.reason) == (400, "bad_request")


def test_a_post_with_a_body_learns_the_method_first():
    result = parse(
        upgrade().replace(b"GET", b"POST").replace(b"\r\n\r\n", b"\r\nContent-Length: 4\r\n\r\n")
    )
    assert result.status == 405


# -- properties --------------------------------------------------------------------

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# field-vchar and obs-text, then SP / HTAB only between them (RFC 9110 §5.5)
VCHARS = [chr(c) for c in range(0x21, 0x7F)] + [chr(c) for c in range(0x80, 0x100)]
CONTROLS = [chr(c) for c in range(0x20) if c != 0x09] + ["\x7f"]
ROOM_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-_.~/"
HOSTS = ["example.test", "127.0.0.1", "[::1]", "relay.example.test:8443"]


@st.composite
def clean_requests(draw) -> tuple[list[str], str, str]:
    """(header lines, target, the room it names): a valid upgrade request with
    any-case names, optional benign extras, in any order."""
    room = "/" + draw(st.text(ROOM_CHARS, max_size=12))
    query = draw(st.sampled_from(["", "?x=1", "?token=a/b"]))
    scheme = draw(st.sampled_from([None, "http", "https", "ws", "wss", "HTTP", "Ws"]))
    host = draw(st.sampled_from(HOSTS))
    target = room + query if scheme is None else f"{scheme}://{host}{room}{query}"

    def case(name: str) -> str:
        return draw(st.sampled_from([name, name.lower(), name.upper()]))

    value = st.text(st.sampled_from(VCHARS), min_size=1, max_size=6)
    extra_value = st.builds(
        lambda a, gap, b: a + gap + b, value, st.sampled_from(["", " ", "\t", " \t "]), value
    )
    extras = draw(
        st.lists(
            st.tuples(st.text(TOKEN_CHARS, min_size=1, max_size=8), extra_value).map(
                lambda pair: f"X-{pair[0]}: {pair[1]}"
            ),
            max_size=4,
        )
    )
    fields = [
        f"{case('Host')}: {host}",
        f"{case('Upgrade')}: websocket",
        f"{case('Connection')}: Upgrade",
        f"{case('Sec-WebSocket-Key')}: {KEY}",
        f"{case('Sec-WebSocket-Version')}: 13",
        *extras,
    ]
    if draw(st.booleans()):
        fields.append(f"{case('Content-Length')}: 0")
    return draw(st.permutations(fields)), target, room


def insert_control(fields: list[str], line: int, pos: int, char: str) -> list[str]:
    line %= len(fields)
    text = fields[line]
    pos %= len(text) + 1
    return fields[:line] + [text[:pos] + char + text[pos:]] + fields[line + 1 :]


def add_line(fields: list[str], line: int, new: str) -> list[str]:
    line %= len(fields) + 1
    return fields[:line] + [new] + fields[line:]


def fold(fields: list[str], line: int, continuation: str) -> list[str]:
    # A continuation line after the line it would extend (never first: that
    # is whitespace before the first field, refused as well but not folding).
    return add_line(fields, 1 + line % len(fields), continuation)


MUTATIONS = st.one_of(
    st.builds(
        lambda line, pos, char: lambda fields: insert_control(fields, line, pos, char),
        st.integers(0, 20),
        st.integers(0, 80),
        st.sampled_from(CONTROLS),
    ),
    st.builds(
        lambda line, value: lambda fields: add_line(fields, line, f"Transfer-Encoding: {value}"),
        st.integers(0, 20),
        st.sampled_from(["chunked", "gzip, chunked", "identity", ""]),
    ),
    st.builds(
        lambda line, length: lambda fields: add_line(fields, line, f"Content-Length: {length}"),
        st.integers(0, 20),
        st.integers(1, 2**40),
    ),
    st.builds(
        lambda line, new: lambda fields: add_line(fields, line, new),
        st.integers(0, 20),
        st.sampled_from(
            [
                "Host: example.test",
                "host: other.test",
                f"Sec-WebSocket-Key: {KEY}",
                f"SEC-WEBSOCKET-KEY: {OTHER_KEY}",
                "Sec-WebSocket-Version: 13",
                "sec-websocket-version: 8",
            ]
        ),
    ),
    st.builds(
        lambda line, continuation: lambda fields: fold(fields, line, continuation),
        st.integers(0, 20),
        st.sampled_from([" more", "\tmore", "  ", " X-Folded: v"]),
    ),
)


# Frame bytes in the same read as the head; a fixed mask keeps examples reproducible.
TRAILING_FRAME = frame(0x1, b"trailing frame", key=b"mask")


def render(fields: list[str], target: str) -> bytes:
    return upgrade(target, fields)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clean_requests(), st.lists(MUTATIONS, max_size=2), st.lists(st.integers(1, 40), max_size=12))
def test_clean_requests_accepted_and_each_mutation_refused_with_400(generated, mutations, cuts):
    fields, target, room = generated
    for mutate in mutations:
        fields = mutate(fields)
    data = render(fields, target) + TRAILING_FRAME
    whole = parse(data)
    if mutations:
        assert isinstance(whole, handshake.Refuse), (data, whole)
        assert (whole.status, whole.reason) == (400, "bad_request"), (data, whole.detail)
    else:
        assert isinstance(whole, handshake.Accept), (data, whole)
        assert whole.room == room
        assert data[whole.consumed :] == TRAILING_FRAME
    # the same decision whatever the reads look like
    scan_from, end = 0, 0
    for cut in cuts + [len(data)]:
        end = min(len(data), end + cut)
        split = handshake.parse_request(memoryview(data[:end]), scan_from, LIMITS)
        if not isinstance(split, handshake.Incomplete):
            break
        scan_from = split.scan_from
    assert split == whole


def forbidden_properties(head: bytes) -> list[str]:
    """What an accepted head must not have, checked from the bytes without
    the parser's code: a second, independent reading of the rules."""
    found = []
    assert head.endswith(b"\r\n\r\n")
    if b"\r" in head.replace(b"\r\n", b"") or b"\n" in head.replace(b"\r\n", b""):
        found.append("bare CR or LF")
    lines = head[:-4].split(b"\r\n")[1:]
    counts: dict[bytes, int] = {}
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            found.append("obsolete line folding")
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name or any(chr(c) not in TOKEN_CHARS for c in name):
            found.append(f"name not a token: {name!r}")
        if any((c < 0x20 and c != 0x09) or c == 0x7F for c in value):
            found.append(f"control character in {name!r}")
        name = name.lower()
        counts[name] = counts.get(name, 0) + 1
        if name == b"transfer-encoding":
            found.append("Transfer-Encoding")
        if name == b"content-length" and any(
            set(part.strip(b" \t")) != {ord("0")} for part in value.split(b",")
        ):
            found.append(f"Content-Length {value!r}")
    for name in (b"host", b"sec-websocket-key", b"sec-websocket-version"):
        if counts.get(name, 0) != 1:
            found.append(f"{counts.get(name, 0)} times {name!r}")
    return found


SNIPPETS = [
    b"\x00",
    b"\r",
    b"\n",
    b"\t",
    b" ",
    b"\x7f",
    b"\x1b",
    b"\xe9",
    b":",
    b"\r\n ",
    b"\r\nTransfer-Encoding: chunked",
    b"\r\nContent-Length: 7",
    b"\r\nContent-Length: 0",
    b"\r\nHost: example.test",
    b"\r\nSec-WebSocket-Version: 13",
    b"\r\nSec-WebSocket-Key: " + KEY.encode(),
    b"\r\nX-Extra: v",
]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    clean_requests(),
    st.lists(
        st.tuples(st.sampled_from(SNIPPETS), st.booleans(), st.integers(0, 10_000)), max_size=4
    ),
)
def test_no_accepted_request_has_a_forbidden_property(generated, insertions):
    fields, target, _ = generated
    data = bytearray(render(fields, target))
    head_end = len(data) - 4
    line_ends = [m.start() for m in re.finditer(rb"\r\n", bytes(data[:head_end]))] + [head_end]
    for snippet, at_line_end, where in insertions:
        # anywhere in the head, or where a header line ends (so inserted
        # lines are often well formed and the parser has to judge them)
        pos = line_ends[where % len(line_ends)] if at_line_end else where % (head_end + 1)
        data[pos:pos] = snippet
        head_end += len(snippet)
        line_ends = [e + len(snippet) if e >= pos else e for e in line_ends]
    result = parse(bytes(data))
    event(type(result).__name__)  # --hypothesis-show-statistics: how often each verdict
    if isinstance(result, handshake.Accept):
        assert forbidden_properties(bytes(data[: result.consumed])) == []


# -- a live relay ------------------------------------------------------------------


def test_relay_answers_a_chunked_request_with_400_and_closes(relay_factory):
    relay = relay_factory({"metrics": {"enabled": True, "host": "127.0.0.1", "port": 0}})
    client = RawClient(relay.port, handshake=False)  # every read bounded by its timeout
    try:
        client.send(with_field("Transfer-Encoding: chunked") + b"5\r\nhello\r\n0\r\n\r\n")
        status, head, response_body = client.read_http_response()  # reads to EOF: closed
        assert status == 400
        assert b"Connection: close" in head
        assert response_body == b"request announces a body\n"  # nothing after: no 101, no frame
    finally:
        client.close()
    assert (
        scrape(relay.metrics_url)['websocket_handshake_failures_total{reason="bad_request"}'] == 1
    )


def test_relay_upgrades_an_absolute_form_request_into_its_room(relay_factory):
    relay = relay_factory()
    with (
        connect(relay.ws("/abs-room"), open_timeout=STEP) as member,
        connect(relay.ws("/other-room"), open_timeout=STEP) as outsider,
    ):
        target = f"http://127.0.0.1:{relay.port}/abs-room?via=absolute"
        client = RawClient(relay.port, handshake=False)
        try:
            client.send(
                upgrade(target).replace(b"example.test", f"127.0.0.1:{relay.port}".encode())
            )
            assert client.read_http_head().startswith(b"HTTP/1.1 101 ")
            client.send(frame(0x1, b"from an absolute-form target"))
            assert member.recv(timeout=STEP) == "from an absolute-form target"
            assert client.recv_frame() == (True, 0x1, b"from an absolute-form target")
            # the outsider's own message is the first it gets: nothing leaked
            outsider.send("mine")
            assert outsider.recv(timeout=STEP) == "mine"
        finally:
            client.close()
