"""What a well-behaved client cannot send: each violation gets the close
code RFC 6455 asks for, and the room keeps serving everyone else."""

from __future__ import annotations

import pytest

from fastrelay._frames import CloseCode, Opcode
from wsraw import RawClient, close_payload, frame

TEXT, BINARY, CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONTINUATION
CLOSE, PING, PONG = Opcode.CLOSE, Opcode.PING, Opcode.PONG

CASES = {
    "unmasked frame": ([frame(TEXT, b"hi", mask=False)], CloseCode.PROTOCOL_ERROR),
    "rsv1": ([frame(TEXT, b"hi", rsv=4)], CloseCode.PROTOCOL_ERROR),
    "rsv2": ([frame(TEXT, b"hi", rsv=2)], CloseCode.PROTOCOL_ERROR),
    "rsv3": ([frame(TEXT, b"hi", rsv=1)], CloseCode.PROTOCOL_ERROR),
    **{
        f"reserved opcode {op:#x}": ([frame(op, b"x")], CloseCode.PROTOCOL_ERROR)
        for op in (0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF)
    },
    "fragmented ping": ([frame(PING, b"x", fin=False)], CloseCode.PROTOCOL_ERROR),
    "fragmented close": ([frame(CLOSE, close_payload(1000), fin=False)], CloseCode.PROTOCOL_ERROR),
    "ping over 125 bytes": ([frame(PING, b"x" * 126)], CloseCode.PROTOCOL_ERROR),
    "continuation without start": ([frame(CONT, b"x")], CloseCode.PROTOCOL_ERROR),
    "new message inside fragmented one": (
        [frame(TEXT, b"a", fin=False), frame(TEXT, b"b")],
        CloseCode.PROTOCOL_ERROR,
    ),
    "binary inside fragmented text": (
        [frame(TEXT, b"a", fin=False), frame(BINARY, b"b")],
        CloseCode.PROTOCOL_ERROR,
    ),
    "invalid utf-8 in one frame": ([frame(TEXT, b"ok \xff")], CloseCode.INVALID_PAYLOAD_DATA),
    "overlong utf-8": ([frame(TEXT, b"\xc0\xaf")], CloseCode.INVALID_PAYLOAD_DATA),
    "utf-16 surrogate": ([frame(TEXT, b"\xed\xa0\x80")], CloseCode.INVALID_PAYLOAD_DATA),
    "code point above U+10FFFF": (
        [frame(TEXT, b"\xf4\x90\x80\x80")],
        CloseCode.INVALID_PAYLOAD_DATA,
    ),
    "truncated utf-8 at end of message": (
        [frame(TEXT, b"ab\xe2\x82")],
        CloseCode.INVALID_PAYLOAD_DATA,
    ),
    "invalid utf-8 split across fragments": (
        [frame(TEXT, b"ok \xe2", fin=False), frame(CONT, b"\x28\xa1")],
        CloseCode.INVALID_PAYLOAD_DATA,
    ),
    "invalid utf-8 in a later fragment": (
        [
            frame(TEXT, b"fine", fin=False),
            frame(CONT, b"\xff", fin=False),
            frame(CONT, b"never needed"),
        ],
        CloseCode.INVALID_PAYLOAD_DATA,
    ),
    **{
        f"close code {code}": ([frame(CLOSE, close_payload(code))], CloseCode.PROTOCOL_ERROR)
        for code in (0, 999, 1004, 1005, 1006, 1015, 2999, 5000)
    },
    "1-byte close payload": ([frame(CLOSE, b"\x03")], CloseCode.PROTOCOL_ERROR),
    "close reason with invalid utf-8": (
        [frame(CLOSE, close_payload(1000, b"\xff\xfe"))],
        CloseCode.INVALID_PAYLOAD_DATA,
    ),
    "message over the size limit": ([frame(BINARY, b"x" * 4097)], CloseCode.MESSAGE_TOO_BIG),
    "fragments over the size limit": (
        [frame(BINARY, b"x" * 3000, fin=False), frame(CONT, b"x" * 3000)],
        CloseCode.MESSAGE_TOO_BIG,
    ),
    "frame length with the top bit set": (
        [b"\x82\xff\x80\x00\x00\x00\x00\x00\x00\x01" + b"mask"],
        CloseCode.PROTOCOL_ERROR,
    ),
}


@pytest.fixture(scope="module")
def small_relay(module_relay_factory):
    return module_relay_factory({"relay": {"max_message_size": 4096}})


@pytest.mark.parametrize("case", list(CASES))
def test_violation_gets_rfc_close_code(small_relay, case):
    frames, expected = CASES[case]
    room = f"/violation-{abs(hash(case))}"
    bystander = RawClient(small_relay.port, room)
    offender = RawClient(small_relay.port, room)
    try:
        offender.send(b"".join(frames))
        code, _reason = offender.expect_close()
        assert code == expected
        # The bystander saw none of the offender's bytes and is still served.
        bystander.send(frame(TEXT, b"still served"))
        assert bystander.recv_frame() == (True, TEXT, b"still served")
    finally:
        offender.close()
        bystander.close()


def test_valid_code_point_split_across_fragments_passes(small_relay):
    client = RawClient(small_relay.port, "/split-ok")
    try:
        euro = "€".encode()  # e2 82 ac
        client.send(
            frame(TEXT, b"price " + euro[:1], fin=False)
            + frame(CONT, euro[1:2], fin=False)
            + frame(CONT, euro[2:] + b"5")
        )
        assert client.recv_frame() == (True, TEXT, "price €5".encode())
    finally:
        client.close()


def test_control_frames_interleave_a_fragmented_message(small_relay):
    client = RawClient(small_relay.port, "/interleave")
    try:
        client.send(
            frame(TEXT, b"one ", fin=False)
            + frame(PING, b"p")
            + frame(PONG, b"unsolicited")
            + frame(CONT, b"two")
        )
        assert client.recv_frame() == (True, PONG, b"p")
        assert client.recv_frame() == (True, TEXT, b"one two")
    finally:
        client.close()


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        close_payload(1000),
        close_payload(3000, b"app reason"),
        close_payload(1014),
        close_payload(4999, "ünï".encode()),
    ],
)
def test_valid_close_is_echoed_then_tcp_closed(small_relay, payload):
    client = RawClient(small_relay.port, "/close-ok")
    try:
        client.send(frame(CLOSE, payload))
        fin, opcode, echoed = client.recv_frame()
        assert (fin, opcode, echoed) == (True, CLOSE, payload)
        assert client.read_to_eof() == b""
    finally:
        client.close()


def test_frames_after_close_are_ignored(small_relay):
    listener = RawClient(small_relay.port, "/after-close")
    client = RawClient(small_relay.port, "/after-close")
    try:
        client.send(frame(CLOSE, close_payload(1000)) + frame(TEXT, b"too late"))
        assert client.expect_close()[0] == 1000
        listener.send(frame(TEXT, b"first thing"))
        assert listener.recv_frame() == (True, TEXT, b"first thing")
    finally:
        client.close()
        listener.close()
