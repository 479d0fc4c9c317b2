"""Differential properties: fastrelay's Cython codec against the pinned
`websockets.frames` as an oracle, for random frames and random splits."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from fastrelay._frames import CloseCode
from fastrelay._testing import FrameError, FrameReader, encode_frame, validate_utf8

DATA_OPCODES = [Opcode.CONT, Opcode.TEXT, Opcode.BINARY]
CONTROL_OPCODES = [Opcode.CLOSE, Opcode.PING, Opcode.PONG]


@st.composite
def frames(draw):
    if draw(st.booleans()):
        opcode = draw(st.sampled_from(DATA_OPCODES))
        size = draw(
            st.one_of(st.integers(0, 130), st.integers(65530, 65540), st.integers(0, 70000))
        )
        fin = draw(st.booleans())
    else:
        opcode = draw(st.sampled_from(CONTROL_OPCODES))
        size = draw(st.integers(0, 125))
        fin = True
    payload = draw(st.binary(min_size=min(size, 64), max_size=min(size, 64)))
    payload = (payload * (size // max(len(payload), 1) + 1))[:size] if payload else bytes(size)
    return Frame(opcode, payload, fin)


def parse_with_websockets(data: bytes, *, mask: bool) -> Frame:
    """Parse exactly one frame; the whole input must be that frame."""
    reader = StreamReader()
    reader.feed_data(data)
    parser = Frame.parse(reader.read_exact, mask=mask)
    with pytest.raises(StopIteration) as done:
        next(parser)
    assert reader.buffer == b""
    return done.value.value


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[i:j] for i, j in zip([0] + points, points + [len(data)], strict=True)]


SETTINGS = settings(max_examples=60, deadline=None)


@SETTINGS
@given(st.lists(frames(), min_size=1, max_size=6), st.lists(st.integers(0, 10**6), max_size=12))
def test_parser_agrees_with_websockets_on_client_frames(sent, cuts):
    # websockets masks client frames with random keys, like a browser.
    stream = b"".join(frame.serialize(mask=True) for frame in sent)
    reader = FrameReader(require_mask=True)
    got = []
    for piece in splits(stream, cuts):
        got += reader.feed(piece)
    assert got == [(f.fin, int(f.opcode), f.data) for f in sent]


@SETTINGS
@given(frames(), st.binary(min_size=4, max_size=4))
def test_encoder_agrees_with_websockets(frame, key):
    ours = encode_frame(int(frame.opcode), frame.data, frame.fin)
    assert ours == frame.serialize(mask=False)
    parsed = parse_with_websockets(ours, mask=False)
    assert (parsed.opcode, parsed.data, parsed.fin) == (frame.opcode, frame.data, frame.fin)
    masked = encode_frame(int(frame.opcode), frame.data, frame.fin, mask=key)
    parsed = parse_with_websockets(masked, mask=True)
    assert (parsed.opcode, parsed.data, parsed.fin) == (frame.opcode, frame.data, frame.fin)


@SETTINGS
@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4))
def test_unmask_word_at_a_time_matches_bytewise(payload, key):
    masked = encode_frame(2, payload, True, mask=key)
    header_len = len(masked) - len(payload)
    expected = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    assert masked[header_len:] == expected


def test_unmasked_client_frame_is_a_protocol_error():
    with pytest.raises(FrameError) as err:
        FrameReader(require_mask=True).feed(encode_frame(1, b"x"))
    assert err.value.code == CloseCode.PROTOCOL_ERROR


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text().map(str.encode), st.binary(max_size=40)))
def test_utf8_validator_agrees_with_python(data):
    try:
        data.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    assert validate_utf8(data) is valid


def test_utf8_validator_edges():
    for good in ["", "a" * 17, "é", "€", "𝄞", "\U0010ffff", "\ud7ff", "\ue000"]:
        assert validate_utf8(good.encode())
    for bad in [
        b"\x80",
        b"\xc0\x80",
        b"\xc1\xbf",
        b"\xe0\x80\x80",
        b"\xed\xa0\x80",
        b"\xf0\x80\x80\x80",
        b"\xf4\x90\x80\x80",
        b"\xf5",
        b"\xff",
        b"abc\xe2\x82",
        os.urandom(0) + b"12345678\x80",
    ]:
        assert not validate_utf8(bad)
