# The stateless RFC 6455 frame codec: header parsing and writing, masking,
# close-code rules. Included by _frames.pyx (the relay) and _testing.pyx
# (the same code for tests), so both run exactly this.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy


cdef struct Header:
    uint8_t fin
    uint8_t rsv1
    uint8_t opcode
    uint8_t masked
    uint32_t mask
    uint64_t length
    const char *reason      # why the header was refused


cdef inline uint16_t load_be16(const uint8_t *p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline uint64_t load_be64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v = (v << 8) | p[i]
    return v


cdef Py_ssize_t read_header(const uint8_t *p, size_t avail, Header *h,
                            bint require_mask, bint allow_rsv1) noexcept nogil:
    """Parse one frame header (RFC 6455 section 5.2).

    Returns the header length, 0 if more bytes are needed, or minus the
    close code on a violation (h.reason says which).
    """
    cdef size_t need = 2
    cdef uint8_t b0, b1, n7
    if avail < 2:
        return 0
    b0 = p[0]
    b1 = p[1]
    h.fin = b0 >> 7
    h.opcode = b0 & 0x0F
    h.masked = b1 >> 7
    n7 = b1 & 0x7F
    # Section 5.2: RSV1-3 MUST be 0 unless an extension defines them; only
    # permessage-deflate (RFC 7692) defines RSV1, and only when negotiated.
    h.rsv1 = (b0 >> 6) & 1
    if b0 & 0x30 or (h.rsv1 and not allow_rsv1):
        h.reason = b"reserved bits set"
        return -PROTOCOL_ERROR
    if h.opcode >= 0x8:
        if h.opcode > PONG:
            h.reason = b"reserved opcode"
            return -PROTOCOL_ERROR
        # Section 5.5: control frames are not fragmented and carry at most
        # 125 bytes.
        if not h.fin:
            h.reason = b"fragmented control frame"
            return -PROTOCOL_ERROR
        if n7 > 125:
            h.reason = b"control frame too long"
            return -PROTOCOL_ERROR
    elif h.opcode > BINARY:
        h.reason = b"reserved opcode"
        return -PROTOCOL_ERROR
    # Section 5.1: a server MUST close on an unmasked client frame.
    if require_mask and not h.masked:
        h.reason = b"client frame not masked"
        return -PROTOCOL_ERROR
    if n7 == 126:
        need = 4
    elif n7 == 127:
        need = 10
    if h.masked:
        need += 4
    if avail < need:
        return 0
    if n7 == 126:
        h.length = load_be16(p + 2)
    elif n7 == 127:
        h.length = load_be64(p + 2)
        # Section 5.2: the most significant bit MUST be 0.
        if h.length >> 63:
            h.reason = b"frame length out of range"
            return -PROTOCOL_ERROR
    else:
        h.length = n7
    if h.masked:
        memcpy(&h.mask, p + need - 4, 4)
    else:
        h.mask = 0
    return need


cdef inline void unmask(uint8_t *data, size_t n, uint32_t mask) noexcept nogil:
    """XOR the payload with the 4-byte key (section 5.3), a word at a time."""
    cdef uint64_t wide = (<uint64_t>mask << 32) | mask
    cdef uint64_t word
    cdef size_t i = 0
    cdef const uint8_t *key = <const uint8_t *>&mask
    while i + 8 <= n:
        memcpy(&word, data + i, 8)
        word ^= wide
        memcpy(data + i, &word, 8)
        i += 8
    while i < n:
        data[i] ^= key[i & 3]
        i += 1


cdef inline void unmask_from(uint8_t *data, size_t n, uint32_t mask,
                             size_t offset) noexcept nogil:
    """Unmask bytes that start `offset` bytes into the payload: the key
    rotates with the position (section 5.3: byte i uses key[i % 4])."""
    cdef const uint8_t *key = <const uint8_t *>&mask
    cdef uint8_t rotated[4]
    cdef int i
    for i in range(4):
        rotated[i] = key[(offset + i) & 3]
    memcpy(&mask, rotated, 4)
    unmask(data, n, mask)


cdef inline size_t write_header(uint8_t *out, uint8_t first, uint64_t n) noexcept nogil:
    """Server frame header: unmasked (section 5.1), minimal length form."""
    out[0] = first
    if n < 126:
        out[1] = <uint8_t>n
        return 2
    if n < 65536:
        out[1] = 126
        out[2] = <uint8_t>(n >> 8)
        out[3] = <uint8_t>n
        return 4
    out[1] = 127
    cdef int i
    for i in range(8):
        out[2 + i] = <uint8_t>(n >> (56 - 8 * i))
    return 10


cdef inline bint close_code_valid(uint32_t code) noexcept nogil:
    # Section 7.4: 1004-1006 and 1015 are reserved and never sent on the
    # wire; 1016-2999 are for future RFCs; 3000-4999 belong to
    # registrations and applications. 1012-1014 are registered by IANA.
    if 1000 <= code <= 1014:
        return code != 1004 and code != 1005 and code != 1006
    return 3000 <= code <= 4999
