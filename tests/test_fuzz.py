"""Random and mutated bytes at the handshake parser and the frame parser:
no exception escapes, nothing hangs, and every outcome is a valid HTTP
response or a close frame with a valid code."""

from __future__ import annotations

import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastrelay import handshake
from fastrelay._frames import CloseCode
from fastrelay._testing import FrameError, FrameReader
from wsraw import check_server_output, frame, handshake_request

VALID_REQUEST = handshake_request("/fuzz")
LIMITS = handshake.Limits(max_head=1024, max_headers=16)


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, pos, value in edits:
        if not out:
            out.append(value)
            continue
        pos %= len(out)
        if kind == 0:
            out[pos] = value
        elif kind == 1:
            del out[pos]
        else:
            out.insert(pos, value)
    return bytes(out)


requests = st.one_of(
    st.binary(max_size=2048),
    st.builds(
        mutate,
        st.just(VALID_REQUEST),
        st.lists(
            st.tuples(st.integers(0, 2), st.integers(0, 4096), st.integers(0, 255)), max_size=8
        ),
    ),
)


@settings(max_examples=400, deadline=None)
@given(requests, st.lists(st.integers(1, 64), max_size=20))
def test_handshake_parser_always_decides_validly(data, steps):
    scan_from, fed, pos = 0, b"", 0
    result = handshake.Incomplete(0)
    for step in steps + [len(data)]:
        fed = data[: pos + step]
        pos += step
        result = handshake.parse_request(memoryview(fed), scan_from, LIMITS)
        if not isinstance(result, handshake.Incomplete):
            break
        scan_from = result.scan_from
    if isinstance(result, handshake.Refuse):
        status_line = result.response.split(b"\r\n", 1)[0]
        assert status_line.startswith(f"HTTP/1.1 {result.status} ".encode())
        assert result.status in (400, 403, 405, 426, 431, 503)
    elif isinstance(result, handshake.Accept):
        assert result.response.startswith(b"HTTP/1.1 101 ")
        assert 0 < result.consumed <= len(fed)
    elif isinstance(result, handshake.Incomplete):
        # Only a prefix of something that may still become a request, and
        # never more than the head limit.
        assert len(fed) <= LIMITS.max_head


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=4096), st.lists(st.integers(1, 512), max_size=16))
def test_frame_reader_returns_frames_or_a_close_code(data, steps):
    reader = FrameReader(require_mask=True)
    pos = 0
    try:
        for step in steps + [len(data)]:
            for fin, opcode, payload in reader.feed(data[pos : pos + step]):
                assert opcode in (0, 1, 2, 8, 9, 10)
                assert opcode < 8 or (fin and len(payload) <= 125)
            pos += step
    except FrameError as err:
        assert err.code == CloseCode.PROTOCOL_ERROR


@pytest.fixture(scope="module")
def fuzz_relay(module_relay_factory):
    relay = module_relay_factory(
        {"relay": {"max_message_size": 8192}, "logging": {"level": "debug"}}
    )
    yield relay
    assert relay.stop() == 0
    # Nothing raised inside the relay reached the event loop's handler.
    text = relay.stderr.text()
    assert "closing" in text  # the log is the right one, at debug level
    assert "Traceback" not in text and "[ERROR]" not in text, text[-2000:]


def read_server_output(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


frame_soup = st.lists(
    st.one_of(
        st.binary(max_size=64),
        st.builds(
            lambda op, p, fin, rsv, m: frame(op, p, fin=fin, rsv=rsv, mask=m),
            st.integers(0, 15),
            st.binary(max_size=300),
            st.booleans(),
            st.sampled_from([0, 0, 0, 1, 4]),
            st.sampled_from([True, True, True, False]),
        ),
    ),
    max_size=8,
)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(frame_soup, st.lists(st.integers(1, 200), max_size=6))
def test_relay_answers_random_frames_with_valid_output(fuzz_relay, chunks, cuts):
    data = b"".join(chunks)
    sock = socket.create_connection(("127.0.0.1", fuzz_relay.port), timeout=10)
    try:
        sock.sendall(handshake_request("/fuzz-room"))
        head = b""
        while b"\r\n\r\n" not in head:
            piece = sock.recv(4096)
            assert piece
            head += piece
        assert head.startswith(b"HTTP/1.1 101 ")
        rest = head.split(b"\r\n\r\n", 1)[1]
        pos = 0
        for cut in cuts + [len(data)]:
            try:
                sock.sendall(data[pos : pos + cut])
            except (BrokenPipeError, ConnectionResetError):
                break
            pos += cut
        # End of input: the relay must finish by itself (close or EOF).
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        check_server_output(rest + read_server_output(sock))
    finally:
        sock.close()


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(requests)
def test_relay_answers_random_requests_with_valid_http(fuzz_relay, data):
    sock = socket.create_connection(("127.0.0.1", fuzz_relay.port), timeout=10)
    try:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = read_server_output(sock)
        if out:
            assert out.startswith(b"HTTP/1.1 ")
            status = int(out[9:12])
            assert status in (101, 400, 403, 405, 426, 431, 503)
    finally:
        sock.close()
