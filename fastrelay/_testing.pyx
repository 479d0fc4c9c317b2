# cython: language_level=3
"""The relay's own codec for tests: frame encoding, an incremental frame
reader and UTF-8 validation, built from the same include files as the relay
(_codec.pxi, _utf8.pxi), so tests exercise the code that runs in production
without these helpers living in the hot module."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memcpy

from fastrelay._frames cimport BINARY, PONG, PROTOCOL_ERROR

include "_codec.pxi"
include "_utf8.pxi"


class FrameError(Exception):
    """A protocol violation with the close code RFC 6455 asks for."""

    def __init__(self, code, reason):
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


def encode_frame(int opcode, payload, bint fin=True, mask=None):
    """Encode one frame: unmasked like the server's, or masked with the
    4-byte key ``mask`` like a client's."""
    cdef bytes data = bytes(payload)
    cdef size_t n = len(data)
    cdef uint8_t head[14]
    cdef size_t hlen = write_header(head, (0x80 if fin else 0) | (opcode & 0x0F), n)
    cdef uint32_t key
    if mask is None:
        return PyBytes_FromStringAndSize(<char *>head, hlen) + data
    key_bytes = bytes(mask)
    if len(key_bytes) != 4:
        raise ValueError("mask must be 4 bytes")
    head[1] |= 0x80
    memcpy(head + hlen, PyBytes_AS_STRING(key_bytes), 4)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, hlen + 4 + n)
    cdef char *o = PyBytes_AS_STRING(out)
    memcpy(o, head, hlen + 4)
    memcpy(o + hlen + 4, PyBytes_AS_STRING(data), n)
    memcpy(&key, head + hlen, 4)
    unmask(<uint8_t *>o + hlen + 4, n, key)
    return out


def validate_utf8(data):
    """True when ``data`` is complete, valid UTF-8."""
    cdef bytes b = bytes(data)
    return utf8_complete(<const uint8_t *>PyBytes_AS_STRING(b), len(b))


cdef class FrameReader:
    """Incremental frame parser: feed any split of a byte stream, get whole
    frames back as ``(fin, opcode, payload)``. Frame-level checks only
    (header rules and masking); message rules live in the relay's
    ``Connection``."""

    cdef bytearray buf
    cdef bint require_mask

    def __init__(self, bint require_mask=True):
        self.buf = bytearray()
        self.require_mask = require_mask

    def feed(self, data):
        cdef Header h
        cdef Py_ssize_t hlen
        cdef size_t pos = 0
        cdef size_t avail
        cdef uint8_t *p
        cdef bytearray payload
        frames = []
        self.buf += data
        p = <uint8_t *><char *>self.buf
        avail = len(self.buf)
        while True:
            hlen = read_header(p + pos, avail - pos, &h, self.require_mask, False)
            if hlen < 0:
                raise FrameError(-hlen, h.reason.decode())
            if hlen == 0 or avail - pos - hlen < h.length:
                break
            payload = bytearray(p[pos + hlen:pos + hlen + h.length])
            if h.masked:
                unmask(<uint8_t *><char *>payload, h.length, h.mask)
            frames.append((bool(h.fin), h.opcode, bytes(payload)))
            pos += hlen + h.length
        del self.buf[:pos]
        return frames
