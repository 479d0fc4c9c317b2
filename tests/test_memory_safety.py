"""Regression tests for what the sanitizer run (.ci/sanitizers.sh) found in
the compiled modules. Each passes on any correct build; under the
AddressSanitizer + UBSan build the bug it pins down aborts the process.

Empty fragments: a fragmented message whose first frames carry no payload
once made the reassembly copy zero bytes into a buffer that did not exist
yet (memcpy to NULL, undefined behaviour even for zero bytes; UBSan:
"null pointer passed as argument 1" in Connection.append_fragment)."""

from __future__ import annotations

import pytest
from test_connection_sansio import Relay, client_frame, feed, frames_of

from fastrelay._frames import Opcode

# (frames the client sends, the one message every member must get)
EMPTY_FRAGMENTS = {
    "empty first fragment": (
        [(Opcode.TEXT, b"", False), (Opcode.CONTINUATION, b"hello", True)],
        (Opcode.TEXT, b"hello"),
    ),
    "empty first and middle fragments": (
        [
            (Opcode.BINARY, b"", False),
            (Opcode.CONTINUATION, b"", False),
            (Opcode.CONTINUATION, b"\x00\x01", True),
        ],
        (Opcode.BINARY, b"\x00\x01"),
    ),
    "empty fragments only": (
        [(Opcode.TEXT, b"", False), (Opcode.CONTINUATION, b"", True)],
        (Opcode.TEXT, b""),
    ),
    "empty middle fragment": (
        [
            (Opcode.TEXT, b"ab", False),
            (Opcode.CONTINUATION, b"", False),
            (Opcode.CONTINUATION, b"cd", True),
        ],
        (Opcode.TEXT, b"abcd"),
    ),
}


@pytest.mark.parametrize("name", list(EMPTY_FRAGMENTS))
@pytest.mark.parametrize("step", [0, 1], ids=["one read", "byte by byte"])
def test_empty_fragments_reassemble(name: str, step: int) -> None:
    frames, (opcode, payload) = EMPTY_FRAGMENTS[name]
    relay = Relay()
    sender, sender_out = relay.join()
    member, member_out = relay.join()
    data = b"".join(client_frame(op, body, fin) for op, body, fin in frames)
    feed(sender, data, step)
    relay.loop.run_turn()
    assert frames_of(member_out.take()) == [(True, opcode, payload)]
    assert frames_of(sender_out.take()) == [(True, opcode, payload)]  # echo
    # The connection is still usable: the next message is relayed whole.
    feed(sender, client_frame(Opcode.TEXT, b"next"))
    relay.loop.run_turn()
    assert frames_of(member_out.take()) == [(True, Opcode.TEXT, b"next")]
