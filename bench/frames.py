"""WebSocket frames as the load generator's clients write them: headers,
masking keys and masking (RFC 6455 section 5), whatever the payload.

Both clients build their frames here: loadgen's 64-byte text messages
(through wire), large's binary messages of up to a megabyte, and the pongs
and close frames every client sends.
"""

from __future__ import annotations

import os
import struct

try:  # numpy masks long payloads a 32-bit word at a time.
    import numpy as np
except ImportError:  # pragma: no cover - exercised only without numpy
    np = None  # type: ignore[assignment]

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA

# Below this payload length one Python int XOR is quicker than numpy's setup
# (64 bytes: 0.5 vs 1.5 us; 512 bytes: 1.4 vs 1.5 us); above it numpy is far
# quicker (16 KiB: 30 vs 2 us; 1 MiB: 2.7 vs 0.15 ms, which would make
# large's sender the limit).
NUMPY_MASK_FROM = 512


def new_mask() -> bytes:
    # A random non-zero key: a server must really unmask, no zero-key shortcut.
    while True:
        key = os.urandom(4)
        if key != b"\0\0\0\0":
            return key


def mask_bytes(data: bytes, key: bytes) -> bytes:
    """`data` XOR the 4-byte `key` repeated: masking and unmasking alike."""
    n = len(data)
    if np is not None and n >= NUMPY_MASK_FROM:
        # Native byte order on both sides, so each word meets the key bytes
        # in their own order; the padding to whole words is cut off again.
        words = np.frombuffer(data + b"\0" * (-n % 4), dtype=np.uint32)
        return (words ^ np.frombuffer(key, dtype=np.uint32)[0]).tobytes()[:n]
    full = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(full, "little")).to_bytes(n, "little")


def frame_header(opcode: int, size: int, masked: bool) -> bytes:
    """Header of a final (FIN) frame with a `size`-byte payload, the masking
    key not included."""
    first = 0x80 | opcode
    bit = 0x80 if masked else 0
    if size < 126:
        return bytes((first, bit | size))
    if size < 1 << 16:
        return struct.pack("!BBH", first, bit | 126, size)
    return struct.pack("!BBQ", first, bit | 127, size)


def masked_frame(opcode: int, payload: bytes, key: bytes) -> bytes:
    """A whole client frame: header, masking key, masked payload."""
    return frame_header(opcode, len(payload), masked=True) + key + mask_bytes(payload, key)


def close_frame(key: bytes, code: int = 1000) -> bytes:
    return masked_frame(CLOSE, code.to_bytes(2, "big"), key)
