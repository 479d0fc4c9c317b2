"""Property: whatever the fragmentation, the interleaved control frames and
the way the byte stream is cut into TCP writes, every member of the room
receives exactly the sent messages, each as one frame, in order."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsraw import RawClient, frame

ROOMS = itertools.count()


@st.composite
def messages(draw):
    if draw(st.booleans()):
        opcode, payload = 0x1, draw(st.text(max_size=300)).encode()
    else:
        opcode, payload = 0x2, draw(st.binary(max_size=3000))
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=4)))
    pieces = [payload[i:j] for i, j in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    pings = draw(st.lists(st.booleans(), min_size=len(pieces), max_size=len(pieces)))
    return opcode, payload, pieces, pings


def encode(opcode: int, pieces: list[bytes], pings: list[bool]) -> tuple[bytes, list[bytes]]:
    """Client frames of one message, a ping after some fragments (control
    frames may interleave a fragmented message, RFC 6455 §5.4)."""
    out, ping_payloads = b"", []
    for index, (piece, ping) in enumerate(zip(pieces, pings, strict=True)):
        last = index == len(pieces) - 1
        out += frame(opcode if index == 0 else 0x0, piece, fin=last)
        if ping and not last:
            ping_payloads.append(f"p{len(ping_payloads)}".encode())
            out += frame(0x9, ping_payloads[-1])
    return out, ping_payloads


@pytest.fixture(scope="module")
def prop_relay(module_relay_factory):
    return module_relay_factory()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(messages(), min_size=1, max_size=6), st.lists(st.integers(1, 700), max_size=10))
def test_members_receive_exactly_the_messages(prop_relay, sent, cuts):
    room = f"/prop-{next(ROOMS)}"
    sender = RawClient(prop_relay.port, room)
    member = RawClient(prop_relay.port, room)
    try:
        stream, expected_pongs = b"", []
        for opcode, _payload, pieces, pings in sent:
            data, pongs = encode(opcode, pieces, pings)
            stream += data
            expected_pongs += pongs
        pos = 0
        for cut in [*cuts, len(stream)]:
            sender.send(stream[pos : pos + cut])
            pos += cut
        expected = [(True, opcode, payload) for opcode, payload, _, _ in sent]
        assert [member.recv_frame() for _ in sent] == expected
        # The sender gets its own messages, with the pongs in between.
        got = [sender.recv_frame() for _ in range(len(sent) + len(expected_pongs))]
        assert [f for f in got if f[1] != 0xA] == expected
        assert [f[2] for f in got if f[1] == 0xA] == expected_pongs
    finally:
        sender.close()
        member.close()
