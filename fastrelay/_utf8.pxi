# Incremental UTF-8 validation (RFC 3629 section 4), for text messages and
# close reasons (RFC 6455 sections 5.6 and 8.1).

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

# Validator state: bits 0-1 the continuation bytes still expected, bits 8-15
# and 16-23 the range allowed for the next byte; 0 between characters.
DEF UTF8_ACCEPT = 0


cdef int utf8_feed(uint32_t *state, const uint8_t *s, size_t n) noexcept nogil:
    """Feed n bytes. Returns -1 at the first byte that cannot start or
    continue a valid sequence (overlong forms, surrogates and code points
    above U+10FFFF included), else 0 with *state carrying an unfinished
    sequence into the next call."""
    cdef uint32_t st = state[0]
    cdef uint32_t pending = st & 3
    cdef uint32_t lo = (st >> 8) & 0xFF
    cdef uint32_t hi = (st >> 16) & 0xFF
    cdef size_t i = 0
    cdef uint64_t word
    cdef uint8_t b
    while i < n:
        if pending == 0:
            # ASCII fast path, eight bytes at a time.
            while i + 8 <= n:
                memcpy(&word, s + i, 8)
                if word & 0x8080808080808080ULL:
                    break
                i += 8
            if i >= n:
                break
            b = s[i]
            i += 1
            if b < 0x80:
                continue
            lo = 0x80
            hi = 0xBF
            if 0xC2 <= b <= 0xDF:
                pending = 1
            elif b == 0xE0:
                pending = 2
                lo = 0xA0          # no overlong 3-byte forms
            elif b == 0xED:
                pending = 2
                hi = 0x9F          # no UTF-16 surrogates
            elif 0xE1 <= b <= 0xEF:
                pending = 2
            elif b == 0xF0:
                pending = 3
                lo = 0x90          # no overlong 4-byte forms
            elif 0xF1 <= b <= 0xF3:
                pending = 3
            elif b == 0xF4:
                pending = 3
                hi = 0x8F          # nothing above U+10FFFF
            else:
                return -1
        else:
            b = s[i]
            i += 1
            if b < lo or b > hi:
                return -1
            pending -= 1
            lo = 0x80
            hi = 0xBF
    state[0] = pending | (lo << 8) | (hi << 16) if pending else UTF8_ACCEPT
    return 0


cdef inline bint utf8_complete(const uint8_t *s, size_t n) noexcept nogil:
    """True when s is whole, valid UTF-8."""
    cdef uint32_t state = UTF8_ACCEPT
    return utf8_feed(&state, s, n) == 0 and state == UTF8_ACCEPT
