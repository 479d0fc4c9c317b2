# cython: language_level=3
"""RFC 6455 frame codec and frame-once fan-out.

Everything per message and per member lives here, in C:

* client frames are parsed in place from the bytes the event loop reads,
  unmasked eight bytes at a time and validated (RFC 6455 section 5);
* each complete data message is encoded once into the hub's *arena* (one
  buffer shared by every connection for the current event-loop turn), and
  every member of the room gets an (offset, length) slice of it appended to
  its pending list (adjacent slices merge, so a member that receives every
  message of a turn has a single slice);
* once per loop turn the hub flushes: one ``sendmsg`` per member with an
  iovec pointing into the arena. No per-member copy of a frame, no Python
  object per member and per message, one system call per member per turn
  instead of one per delivery.

When a socket cannot take everything (slow reader) the rest goes to the
uvloop transport's own buffer, and from then on that member is written
through the transport until its buffer drains, which keeps the bytes in
order. TLS connections always go through the transport.

Errors are values: the parser returns a close code, and the connection
turns it into a close frame (RFC 6455 section 7.1.7). Nothing raised by the
parser reaches the event loop.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.ref cimport PyObject, Py_DECREF, Py_INCREF
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove

import zlib


cdef extern from "Python.h":
    object PyMemoryView_FromMemory(char *mem, Py_ssize_t size, int flags)
    int PyBUF_READ
    int PyBUF_WRITE


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len


cdef extern from "<sys/socket.h>" nogil:
    struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    int MSG_NOSIGNAL
    int MSG_DONTWAIT
    struct linger:
        int l_onoff
        int l_linger
    int setsockopt(int fd, int level, int name, const void *value, unsigned int size)
    int SOL_SOCKET
    int SO_LINGER


cdef extern from "<errno.h>" nogil:
    int errno
    int EAGAIN
    int EWOULDBLOCK
    int EINTR


# Opcodes, RFC 6455 section 5.2.
DEF OP_CONT = 0x0
DEF OP_TEXT = 0x1
DEF OP_BINARY = 0x2
DEF OP_CLOSE = 0x8
DEF OP_PING = 0x9
DEF OP_PONG = 0xA

# Close codes this module sends, RFC 6455 section 7.4.1.
DEF CLOSE_NORMAL = 1000
DEF CLOSE_PROTOCOL_ERROR = 1002
DEF CLOSE_INVALID_DATA = 1007
DEF CLOSE_POLICY = 1008
DEF CLOSE_TOO_BIG = 1009
DEF CLOSE_NO_STATUS = 1005
DEF CLOSE_ABNORMAL = 1006

# Connection states.
DEF ST_HANDSHAKE = 0
DEF ST_OPEN = 1
DEF ST_CLOSING = 2   # we sent a close frame and wait for the peer's
DEF ST_CLOSED = 3    # nothing more is read or written

# Socket reads go straight into one buffer shared by all connections; only a
# partial frame is copied into a connection's own buffer. Idle connections
# therefore hold no receive buffer at all.
DEF SHARED_READ_SIZE = 262144
# The arena starts at 64 KiB and is shrunk back to 4 MiB after a turn that
# needed more.
DEF ARENA_START = 65536
DEF ARENA_KEEP = 4194304
# permessage-deflate: messages shorter than this go uncompressed (RSV1 clear,
# which RFC 7692 section 6 allows); zlib level 6 is its default.
DEF COMPRESS_MIN = 128
DEF COMPRESS_LEVEL = 6
# At most this many slices per sendmsg (Linux IOV_MAX is 1024).
DEF MAX_IOV = 512

# UTF-8 validator state: bits 0-1 continuation bytes still expected,
# bits 8-15 / 16-23 the range allowed for the next byte.
DEF UTF8_ACCEPT = 0


# Connection.state values, for the Python side.
STATE_HANDSHAKE = ST_HANDSHAKE
STATE_OPEN = ST_OPEN
STATE_CLOSING = ST_CLOSING
STATE_CLOSED = ST_CLOSED


class FrameError(Exception):
    """A protocol violation with the close code RFC 6455 asks for."""

    def __init__(self, code, reason):
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


cdef struct Header:
    uint8_t fin
    uint8_t rsv1
    uint8_t opcode
    uint8_t masked
    uint32_t mask
    uint64_t length
    const char *reason


cdef struct Slice:
    size_t offset
    size_t length


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
        return -CLOSE_PROTOCOL_ERROR
    if h.opcode >= 0x8:
        if h.opcode > OP_PONG:
            h.reason = b"reserved opcode"
            return -CLOSE_PROTOCOL_ERROR
        # Section 5.5: control frames are not fragmented and carry at most
        # 125 bytes.
        if not h.fin:
            h.reason = b"fragmented control frame"
            return -CLOSE_PROTOCOL_ERROR
        if n7 > 125:
            h.reason = b"control frame too long"
            return -CLOSE_PROTOCOL_ERROR
    elif h.opcode > OP_BINARY:
        h.reason = b"reserved opcode"
        return -CLOSE_PROTOCOL_ERROR
    # Section 5.1: a server MUST close on an unmasked client frame.
    if require_mask and not h.masked:
        h.reason = b"client frame not masked"
        return -CLOSE_PROTOCOL_ERROR
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
            return -CLOSE_PROTOCOL_ERROR
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


cdef int utf8_feed(uint32_t *state, const uint8_t *s, size_t n) noexcept nogil:
    """Incremental UTF-8 validation (RFC 3629 section 4).

    Returns -1 at the first byte that cannot start or continue a valid
    sequence (overlong forms, surrogates and code points above U+10FFFF
    included), else 0 with *state carrying an unfinished sequence across
    calls.
    """
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


cdef inline bint close_code_valid(uint32_t code) noexcept nogil:
    # Section 7.4: 1004-1006 and 1015 are reserved and never sent on the
    # wire; 1016-2999 are for future RFCs; 3000-4999 belong to
    # registrations and applications. 1012-1014 are registered by IANA.
    if 1000 <= code <= 1014:
        return code != 1004 and code != 1005 and code != 1006
    return 3000 <= code <= 4999


# ---------------------------------------------------------------------------
# Standalone helpers: the same header, mask and UTF-8 code as the server, for
# tests and the benchmark's load generator.

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
    cdef uint32_t state = UTF8_ACCEPT
    if utf8_feed(&state, <const uint8_t *>PyBytes_AS_STRING(b), len(b)) < 0:
        return False
    return state == UTF8_ACCEPT


cdef class FrameReader:
    """Incremental frame parser: feed any split of a byte stream, get whole
    frames back as ``(fin, opcode, payload)``. Frame-level checks only
    (header rules and masking); message rules live in ``Connection``."""

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


# ---------------------------------------------------------------------------
# The relay.

cdef class Room:
    """Members of one room in a C array: the fan-out loop walks it without
    touching Python containers. Removal swaps the last member in (O(1))."""

    cdef readonly str name
    cdef PyObject **members
    cdef Py_ssize_t count
    cdef Py_ssize_t capacity
    cdef Py_ssize_t deflate_members  # how many negotiated permessage-deflate

    def __cinit__(self, str name):
        self.name = name
        self.members = NULL
        self.count = 0
        self.capacity = 0

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self.count):
            Py_DECREF(<object>self.members[i])
        free(self.members)

    def __len__(self):
        return self.count

    cdef int add(self, Connection c) except -1:
        cdef Py_ssize_t cap
        cdef PyObject **grown
        if self.count == self.capacity:
            cap = self.capacity * 2 if self.capacity else 4
            grown = <PyObject **>realloc(self.members, cap * sizeof(PyObject *))
            if grown == NULL:
                raise MemoryError()
            self.members = grown
            self.capacity = cap
        Py_INCREF(c)
        self.members[self.count] = <PyObject *>c
        c.room_index = self.count
        self.count += 1
        self.deflate_members += c.deflate
        return 0

    cdef void remove(self, Connection c) noexcept:
        cdef Py_ssize_t i = c.room_index
        cdef Connection last
        if i < 0 or i >= self.count or self.members[i] != <PyObject *>c:
            return
        self.count -= 1
        if i != self.count:
            last = <Connection>self.members[self.count]
            self.members[i] = <PyObject *>last
            last.room_index = i
        c.room_index = -1
        self.deflate_members -= c.deflate
        Py_DECREF(c)


cdef class Hub:
    """Rooms, the per-turn arena, the flush, and the plain counters that
    the metrics endpoint reads at scrape time."""

    cdef object loop
    cdef object flush_callback
    cdef readonly dict rooms
    cdef readonly bint echo
    cdef readonly Py_ssize_t max_message_size
    cdef readonly Py_ssize_t max_backlog
    cdef readonly bint drop_slow
    # Per-connection message-rate limit: messages per tick (0 = none); the
    # server calls tick() once a second, so the hot path reads no clock.
    cdef readonly Py_ssize_t max_rate
    cdef unsigned long long epoch

    # Encoded frames of this loop turn.
    cdef char *arena
    cdef size_t arena_len
    cdef size_t arena_cap

    # Connections with something to write (or to close) this turn; each
    # holds a reference until the flush.
    cdef PyObject **dirty
    cdef Py_ssize_t ndirty
    cdef Py_ssize_t dirty_cap

    cdef char *shared_read
    cdef object shared_view

    # Counters (read by counters()).
    cdef readonly unsigned long long messages
    cdef readonly unsigned long long deliveries
    cdef readonly unsigned long long bytes_received
    cdef readonly unsigned long long bytes_sent
    cdef readonly unsigned long long connections_total
    cdef readonly unsigned long long disconnections_total
    cdef readonly long long connected
    cdef readonly unsigned long long protocol_errors
    cdef readonly unsigned long long slow_disconnects
    cdef readonly unsigned long long slow_drops
    cdef readonly dict closes

    def __cinit__(self):
        self.arena = NULL
        self.dirty = NULL
        self.shared_read = NULL

    def __init__(self, loop, *, bint echo=True, Py_ssize_t max_message_size=1048576,
                 Py_ssize_t max_backlog=1048576, str slow_client_policy="disconnect",
                 Py_ssize_t max_messages_per_second=0):
        if slow_client_policy not in ("disconnect", "drop"):
            raise ValueError("slow_client_policy must be 'disconnect' or 'drop'")
        self.loop = loop
        self.flush_callback = self.flush
        self.rooms = {}
        self.echo = echo
        self.max_message_size = max_message_size
        self.max_backlog = max_backlog
        self.drop_slow = slow_client_policy == "drop"
        self.max_rate = max_messages_per_second
        self.closes = {}
        self.arena_cap = ARENA_START
        self.arena = <char *>malloc(self.arena_cap)
        self.dirty_cap = 64
        self.dirty = <PyObject **>malloc(self.dirty_cap * sizeof(PyObject *))
        self.shared_read = <char *>malloc(SHARED_READ_SIZE)
        if self.arena == NULL or self.dirty == NULL or self.shared_read == NULL:
            raise MemoryError()
        self.shared_view = PyMemoryView_FromMemory(self.shared_read, SHARED_READ_SIZE,
                                                   PyBUF_WRITE)

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.dirty != NULL:
            for i in range(self.ndirty):
                Py_DECREF(<object>self.dirty[i])
        free(self.dirty)
        free(self.arena)
        # shared_view may outlive us only if someone kept it; we never hand
        # it out beyond a single read.
        free(self.shared_read)

    def counters(self):
        return {
            "connected_clients": self.connected,
            "messages_total": self.messages,
            "deliveries_total": self.deliveries,
            "bytes_received_total": self.bytes_received,
            "bytes_sent_total": self.bytes_sent,
            "connections_total": self.connections_total,
            "disconnections_total": self.disconnections_total,
            "rooms": len(self.rooms),
            "protocol_errors_total": self.protocol_errors,
            "slow_client_disconnects_total": self.slow_disconnects,
            "slow_client_drops_total": self.slow_drops,
            "closes": dict(self.closes),
        }

    def tick(self):
        """Start a new one-second window for the message-rate limit."""
        self.epoch += 1

    cdef inline void count_close(self, int code):
        self.closes[code] = self.closes.get(code, 0) + 1

    cdef size_t arena_reserve(self, size_t n) except? 0:
        """Make room for n more bytes; returns the offset they start at.
        Slices are offsets, so growing (moving) the arena is safe."""
        cdef size_t cap = self.arena_cap
        cdef char *grown
        if self.arena_len + n > cap:
            while self.arena_len + n > cap:
                cap *= 2
            grown = <char *>realloc(self.arena, cap)
            if grown == NULL:
                raise MemoryError()
            self.arena = grown
            self.arena_cap = cap
        cdef size_t offset = self.arena_len
        self.arena_len += n
        return offset

    cdef size_t encode(self, uint8_t first, const char *payload, size_t n,
                       size_t *length) except? 0:
        """Encode one unfragmented frame (first byte: FIN, RSV1, opcode)
        into the arena, once; returns its offset and sets *length."""
        cdef uint8_t head[10]
        cdef size_t hlen = write_header(head, first, n)
        cdef size_t offset = self.arena_reserve(hlen + n)
        memcpy(self.arena + offset, head, hlen)
        memcpy(self.arena + offset + hlen, payload, n)
        length[0] = hlen + n
        return offset

    cdef int mark_dirty(self, Connection c) except -1:
        cdef PyObject **grown
        if c.dirty:
            return 0
        if self.ndirty == self.dirty_cap:
            grown = <PyObject **>realloc(self.dirty, 2 * self.dirty_cap * sizeof(PyObject *))
            if grown == NULL:
                raise MemoryError()
            self.dirty = grown
            self.dirty_cap *= 2
        c.dirty = True
        Py_INCREF(c)
        self.dirty[self.ndirty] = <PyObject *>c
        self.ndirty += 1
        if self.ndirty == 1:
            self.loop.call_soon(self.flush_callback)
        return 0

    cdef int broadcast(self, Connection sender, uint8_t opcode,
                       const char *payload, size_t n) except -1:
        """Encode the frame once (and once compressed, when members of the
        room negotiated permessage-deflate) and give every member a slice."""
        cdef Room room = sender.room
        cdef Connection m
        cdef Py_ssize_t i
        cdef size_t delivered = 0
        cdef size_t length, zlength = 0
        cdef size_t offset = self.encode(0x80 | opcode, payload, n, &length)
        cdef size_t zoffset = 0
        if room.deflate_members and n >= COMPRESS_MIN:
            zoffset = self.encode_compressed(opcode, payload, n, &zlength)
        self.messages += 1
        for i in range(room.count):
            m = <Connection>room.members[i]
            if m is sender and not self.echo:
                continue
            if self.drop_slow and m.backlog > self.max_backlog and m.refresh_backlog():
                self.slow_drops += 1
                continue
            if zlength and m.deflate:
                m.append_slice(zoffset, zlength)
            else:
                m.append_slice(offset, length)
            delivered += 1
        self.deliveries += delivered
        return 0

    cdef size_t encode_compressed(self, uint8_t opcode, const char *payload, size_t n,
                                  size_t *length) except? 0:
        """RFC 7692 section 7.2.1 without context takeover: deflate the
        message on its own, drop the 00 00 ff ff tail, set RSV1. Sets
        *length to 0 when compression does not make it smaller."""
        deflater = zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, -15)
        data = deflater.compress(PyBytes_FromStringAndSize(payload, n))
        data += deflater.flush(zlib.Z_SYNC_FLUSH)
        cdef size_t zn = len(data) - 4
        if zn >= n:
            length[0] = 0
            return 0
        return self.encode(0x80 | 0x40 | opcode, PyBytes_AS_STRING(data), zn, length)

    def flush(self):
        """Write every dirty connection's slices: one sendmsg each."""
        cdef Py_ssize_t i
        cdef Connection c
        try:
            i = 0
            # Entries added while flushing (none are expected) are
            # written by this same loop.
            while i < self.ndirty:
                c = <Connection>self.dirty[i]
                c.dirty = False
                try:
                    if c.state != ST_CLOSED or c.close_after_flush:
                        c.write_pending()
                    if c.close_after_flush:
                        c.close_after_flush = False
                        c.close_transport()
                except Exception as exc:
                    # One connection's failure must not cost the others
                    # their writes: drop it and report.
                    c.npending = 0
                    c.abort()
                    self.loop.call_exception_handler({
                        "message": "fastrelay: write failed; connection dropped",
                        "exception": exc,
                    })
                c.npending = 0
                i += 1
        finally:
            for i in range(self.ndirty):
                Py_DECREF(<object>self.dirty[i])
            self.ndirty = 0
            self.arena_len = 0
            if self.arena_cap > ARENA_KEEP:
                # A turn of big messages grew it: give the memory back.
                self.shrink_arena()

    cdef void shrink_arena(self) noexcept:
        cdef char *smaller = <char *>realloc(self.arena, ARENA_KEEP)
        if smaller != NULL:
            self.arena = smaller
            self.arena_cap = ARENA_KEEP


cdef class Connection:
    """One client: the asyncio BufferedProtocol hooks, the frame parser and
    message rules, and the pending slices to write this turn.

    A Python subclass (``fastrelay.server``) handles the HTTP upgrade in
    ``handle_request`` and the events worth logging in ``on_close``.
    """

    cdef readonly Hub hub
    cdef readonly Room room
    cdef Py_ssize_t room_index
    cdef readonly object transport
    cdef int fd                      # the socket, or -1 once closed
    cdef bint direct                 # False: write through the transport (TLS)
    cdef readonly int state
    cdef readonly bint deflate       # permessage-deflate negotiated

    # Bytes of an unfinished frame (or of the request head) kept between reads.
    cdef char *rbuf
    cdef size_t rlen
    cdef size_t rcap
    cdef size_t rneed                # size of the frame being waited for
    cdef Py_ssize_t shared_offset    # where the last read went in the shared buffer; -1: own buffer

    # Fragmented message being reassembled (section 5.4).
    cdef uint8_t frag_opcode
    cdef bint compressed             # the message being read has RSV1 (RFC 7692)
    cdef char *fbuf
    cdef size_t flen
    cdef size_t fcap
    cdef uint32_t utf8_state

    # Output of this turn.
    cdef Slice *pending
    cdef Py_ssize_t npending
    cdef Py_ssize_t pending_cap
    cdef bint dirty
    cdef bint close_after_flush
    cdef bint via_transport          # transport still holds bytes of ours
    cdef readonly Py_ssize_t backlog

    cdef unsigned long long rate_epoch
    cdef Py_ssize_t rate_count

    cdef readonly int close_code     # what was sent or received, for logs
    cdef readonly bint pong_received

    def __cinit__(self, *args, **kwargs):
        self.rbuf = NULL
        self.fbuf = NULL
        self.pending = NULL
        self.room_index = -1
        self.fd = -1
        self.state = ST_HANDSHAKE
        self.close_code = CLOSE_ABNORMAL
        self.pong_received = True    # no keepalive ping outstanding

    def __init__(self, Hub hub):
        self.hub = hub

    def __dealloc__(self):
        free(self.rbuf)
        free(self.fbuf)
        free(self.pending)

    # -- asyncio protocol hooks ---------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.fd = sock.fileno()
            self.direct = transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc):
        if self.state == ST_OPEN:
            # Gone without a close frame: RFC 6455 section 7.1.5 calls
            # this 1006, a code that is recorded but never sent.
            self.close_code = CLOSE_ABNORMAL
            self.hub.count_close(CLOSE_ABNORMAL)
        if self.room is not None:
            self.leave_room()
        self.state = ST_CLOSED
        self.fd = -1
        self.direct = False
        self.npending = 0
        self.close_after_flush = False
        self.transport = None

    def eof_received(self):
        # A peer that half-closes without a close frame is gone; let the
        # transport close (returns None -> close).
        return None

    def pause_writing(self):
        pass

    def resume_writing(self):
        pass

    def get_buffer(self, Py_ssize_t sizehint):
        cdef size_t want
        cdef Hub hub = self.hub
        if self.state != ST_HANDSHAKE:
            if self.rlen == 0:
                self.shared_offset = 0
                return hub.shared_view
            if self.rneed <= SHARED_READ_SIZE:
                # Put the unfinished frame in front of the shared buffer and
                # read after it: reads stay large whatever the frame split.
                memcpy(hub.shared_read, self.rbuf, self.rlen)
                self.shared_offset = self.rlen
                return PyMemoryView_FromMemory(hub.shared_read + self.rlen,
                                               SHARED_READ_SIZE - self.rlen, PyBUF_WRITE)
        # The request head, or a frame larger than the shared buffer: read
        # into this connection's own buffer.
        self.shared_offset = -1
        want = self.rneed if self.rneed > self.rlen + 4096 else self.rlen + 4096
        self.reserve_rbuf(want)
        return PyMemoryView_FromMemory(self.rbuf + self.rlen, self.rcap - self.rlen,
                                       PyBUF_WRITE)

    def buffer_updated(self, Py_ssize_t nbytes):
        cdef char *data
        cdef size_t total, used
        self.hub.bytes_received += nbytes
        if self.state == ST_CLOSED:
            self.rlen = 0
            return
        if self.shared_offset >= 0:
            data = self.hub.shared_read
            total = self.shared_offset + nbytes
            self.rlen = 0
        else:
            self.rlen += nbytes
            data = self.rbuf
            total = self.rlen
        if self.state == ST_HANDSHAKE:
            self.handshake_step()
            return
        used = self.parse(data, total)
        self.keep_rest(data, total, used)

    # -- handshake -------------------------------------------------------------

    cdef int handshake_step(self) except -1:
        # handle_request(head) is the subclass's: it parses the request
        # bytes so far and calls accept() or reject(), or returns to wait.
        # The view is released on return: the buffer may move afterwards.
        view = PyMemoryView_FromMemory(self.rbuf, self.rlen, PyBUF_READ)
        try:
            self.handle_request(view)
        finally:
            view.release()
        return 0

    def accept(self, str room_name, bytes response, Py_ssize_t consumed, bint deflate=False):
        """Send the 101 response, join the room and parse whatever frames
        followed the request in the same read (none are lost)."""
        cdef Hub hub = self.hub
        cdef Room room
        cdef size_t rest, used
        if self.state != ST_HANDSHAKE:
            raise RuntimeError("accept() outside the handshake")
        self.send_raw(PyBytes_AS_STRING(response), len(response))
        self.state = ST_OPEN
        self.deflate = deflate
        room = hub.rooms.get(room_name)
        if room is None:
            room = Room(room_name)
            hub.rooms[room_name] = room
        room.add(self)
        self.room = room
        hub.connected += 1
        hub.connections_total += 1
        rest = self.rlen - consumed
        memmove(self.rbuf, self.rbuf + consumed, rest)
        self.rlen = 0
        used = self.parse(self.rbuf, rest) if rest else 0
        # Keeps only an unfinished frame; an idle connection keeps no buffer.
        self.keep_rest(self.rbuf, rest, used)

    def reject(self, bytes response):
        """Send an HTTP error response, then close the connection."""
        if self.state != ST_HANDSHAKE:
            raise RuntimeError("reject() outside the handshake")
        self.send_raw(PyBytes_AS_STRING(response), len(response))
        self.state = ST_CLOSED
        self.rlen = 0
        self.close_after_flush = True
        self.hub.mark_dirty(self)

    # -- frames ------------------------------------------------------------------

    cdef size_t parse(self, char *data, size_t total) except? 0:
        """Handle every complete frame in data; return the bytes used."""
        cdef Header h
        cdef Py_ssize_t hlen
        cdef size_t pos = 0
        cdef uint8_t *p
        cdef uint8_t *payload
        cdef size_t n
        cdef Hub hub = self.hub
        self.rneed = 0
        while self.state == ST_OPEN or self.state == ST_CLOSING:
            p = <uint8_t *>data + pos
            hlen = read_header(p, total - pos, &h, True, self.deflate)
            if hlen < 0:
                self.fail(-hlen, h.reason)
                return total
            if hlen == 0:
                break
            if h.opcode < 0x8:
                if h.length > <uint64_t>hub.max_message_size or (
                        h.opcode == OP_CONT and
                        self.flen + h.length > <uint64_t>hub.max_message_size):
                    self.fail(CLOSE_TOO_BIG, b"message too big")
                    return total
            if total - pos - hlen < h.length:
                self.rneed = hlen + h.length
                break
            n = h.length
            payload = p + hlen
            unmask(payload, n, h.mask)
            pos += hlen + n
            if self.state == ST_CLOSING and h.opcode != OP_CLOSE:
                # Section 5.5.1: after our close, only the peer's close
                # matters; data still in flight is discarded.
                continue
            if h.opcode >= 0x8:
                if h.rsv1:
                    self.fail(CLOSE_PROTOCOL_ERROR, b"RSV1 set on a control frame")
                    return total
                if h.opcode == OP_PING:
                    # Section 5.5.3: a pong carries the ping's payload.
                    if self.state == ST_OPEN:
                        self.send_control(OP_PONG, <char *>payload, n)
                elif h.opcode == OP_PONG:
                    self.pong_received = True
                else:
                    self.on_close_frame(payload, n)
                    return total
                continue
            if h.opcode == OP_CONT:
                if not self.frag_opcode:
                    self.fail(CLOSE_PROTOCOL_ERROR, b"continuation without a message")
                    return total
                if h.rsv1:
                    # RFC 7692 section 6.1: only a message's first frame.
                    self.fail(CLOSE_PROTOCOL_ERROR, b"RSV1 set on a continuation frame")
                    return total
            else:
                if self.frag_opcode:
                    self.fail(CLOSE_PROTOCOL_ERROR, b"new message inside a fragmented one")
                    return total
                self.frag_opcode = h.opcode
                self.compressed = h.rsv1
                self.utf8_state = UTF8_ACCEPT
            if self.frag_opcode == OP_TEXT and not self.compressed:
                # Fail at the first invalid byte, not at the end (section 8.1).
                if utf8_feed(&self.utf8_state, payload, n) < 0 or (
                        h.fin and self.utf8_state != UTF8_ACCEPT):
                    self.fail(CLOSE_INVALID_DATA, b"invalid UTF-8")
                    return total
            if not h.fin:
                self.append_fragment(payload, n)
                continue
            if self.over_rate():
                self.fail(CLOSE_POLICY, b"message rate limit exceeded")
                return total
            if self.flen:
                self.append_fragment(payload, n)
                payload = <uint8_t *>self.fbuf
                n = self.flen
            if self.compressed:
                self.relay_compressed(<char *>payload, n)
            else:
                hub.broadcast(self, self.frag_opcode, <char *>payload, n)
            self.frag_opcode = 0
            self.release_fragments()
        return pos

    cdef int relay_compressed(self, const char *payload, size_t n) except -1:
        """Inflate a permessage-deflate message (RFC 7692 section 7.2.2),
        check its size and text, and relay the plain bytes."""
        cdef Hub hub = self.hub
        inflater = zlib.decompressobj(-15)
        try:
            data = inflater.decompress(PyBytes_FromStringAndSize(payload, n) + b"\x00\x00\xff\xff",
                                       hub.max_message_size + 1)
        except zlib.error:
            return self.fail(CLOSE_INVALID_DATA, b"invalid compressed data")
        if len(data) > hub.max_message_size or inflater.unconsumed_tail:
            return self.fail(CLOSE_TOO_BIG, b"message too big")
        cdef uint32_t state = UTF8_ACCEPT
        if self.frag_opcode == OP_TEXT and (
                utf8_feed(&state, <const uint8_t *>PyBytes_AS_STRING(data), len(data)) < 0
                or state != UTF8_ACCEPT):
            return self.fail(CLOSE_INVALID_DATA, b"invalid UTF-8")
        return hub.broadcast(self, self.frag_opcode, PyBytes_AS_STRING(data), len(data))

    cdef inline bint over_rate(self) noexcept:
        """Count one message against the limit of the current window."""
        cdef Hub hub = self.hub
        if hub.max_rate == 0:
            return False
        if self.rate_epoch != hub.epoch:
            self.rate_epoch = hub.epoch
            self.rate_count = 0
        self.rate_count += 1
        return self.rate_count > hub.max_rate

    cdef int keep_rest(self, char *data, size_t total, size_t used) except -1:
        """Keep the bytes of an unfinished frame for the next read."""
        cdef size_t rest = total - used
        if self.state == ST_CLOSED or rest == 0:
            # Nothing to keep: give the buffer back, so that idle
            # connections cost no receive buffer at all.
            self.rlen = 0
            free(self.rbuf)
            self.rbuf = NULL
            self.rcap = 0
            return 0
        if data == self.rbuf:
            memmove(self.rbuf, self.rbuf + used, rest)
        else:
            # A frame larger than the shared buffer is read into our own
            # buffer, so make room for all of it now.
            self.reserve_rbuf(self.rneed if self.rneed > SHARED_READ_SIZE else rest)
            memcpy(self.rbuf, data + used, rest)
        self.rlen = rest
        return 0

    cdef int reserve_rbuf(self, size_t n) except -1:
        cdef char *grown
        if n <= self.rcap:
            return 0
        grown = <char *>realloc(self.rbuf, n)
        if grown == NULL:
            raise MemoryError()
        self.rbuf = grown
        self.rcap = n
        return 0

    cdef int append_fragment(self, const uint8_t *payload, size_t n) except -1:
        cdef size_t cap
        cdef char *grown
        if self.flen + n > self.fcap:
            cap = self.fcap * 2 if self.fcap else 4096
            while cap < self.flen + n:
                cap *= 2
            grown = <char *>realloc(self.fbuf, cap)
            if grown == NULL:
                raise MemoryError()
            self.fbuf = grown
            self.fcap = cap
        memcpy(self.fbuf + self.flen, payload, n)
        self.flen += n
        return 0

    cdef void release_fragments(self) noexcept:
        self.flen = 0
        if self.fcap > 65536:
            free(self.fbuf)
            self.fbuf = NULL
            self.fcap = 0

    cdef int on_close_frame(self, const uint8_t *payload, size_t n) except -1:
        """Section 5.5.1 and 7.4: validate the peer's close, echo it."""
        cdef uint32_t code
        cdef uint32_t ustate = UTF8_ACCEPT
        if n == 1:
            self.fail(CLOSE_PROTOCOL_ERROR, b"close frame with a 1-byte payload")
            return 0
        if n >= 2:
            code = load_be16(payload)
            if not close_code_valid(code):
                self.fail(CLOSE_PROTOCOL_ERROR, b"invalid close code")
                return 0
            if utf8_feed(&ustate, payload + 2, n - 2) < 0 or ustate != UTF8_ACCEPT:
                self.fail(CLOSE_INVALID_DATA, b"invalid UTF-8 in close reason")
                return 0
        else:
            code = CLOSE_NO_STATUS
        if self.state == ST_OPEN:
            # Echo the peer's code and reason; an empty close is answered
            # with an empty close.
            self.send_control(OP_CLOSE, <const char *>payload, n)
            self.close_code = code
            self.hub.count_close(code)
            self.leave_room()
        self.state = ST_CLOSED
        # Section 7.1.1: the server closes the TCP connection first.
        self.close_after_flush = True
        self.hub.mark_dirty(self)
        self.on_close(code, PyBytes_FromStringAndSize(<char *>payload + 2, n - 2).decode()
                      if n >= 2 else "", True)
        return 0

    cdef int fail(self, int code, const char *reason) except -1:
        """Fail the connection (section 7.1.7): close frame, then TCP."""
        if code != CLOSE_POLICY:
            self.hub.protocol_errors += 1
        self.start_close(code, reason.decode())
        self.state = ST_CLOSED
        self.close_after_flush = True
        self.hub.mark_dirty(self)
        return 0

    def close(self, int code=CLOSE_NORMAL, str reason=""):
        """Server-initiated close: send the close frame and wait for the
        peer's (the caller arms the timeout and calls abort())."""
        if self.state == ST_OPEN:
            self.start_close(code, reason)
        elif self.state == ST_HANDSHAKE:
            self.state = ST_CLOSED
            self.close_transport()

    def abort(self):
        """Drop the connection now, without a close handshake: a reset, so
        that bytes still in the kernel's send buffer are discarded too."""
        cdef linger reset
        if self.room is not None:
            self.leave_room()
        self.state = ST_CLOSED
        if self.transport is not None:
            if self.fd >= 0:
                reset.l_onoff = 1
                reset.l_linger = 0
                setsockopt(self.fd, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset))
            self.transport.abort()

    cdef int start_close(self, int code, str reason) except -1:
        cdef bytes encoded = reason.encode()[:123]
        cdef bytes body = bytes([code >> 8, code & 0xFF]) + encoded
        self.send_control(OP_CLOSE, PyBytes_AS_STRING(body), len(body))
        self.close_code = code
        self.hub.count_close(code)
        self.leave_room()
        self.state = ST_CLOSING
        self.on_close(code, reason, False)
        return 0

    def on_close(self, int code, str reason, bint by_peer):
        """Overridden for logging."""

    # -- output --------------------------------------------------------------------

    cdef int leave_room(self) except -1:
        cdef Room room = self.room
        cdef Hub hub = self.hub
        if room is None:
            return 0
        room.remove(self)
        self.room = None
        hub.connected -= 1
        hub.disconnections_total += 1
        if room.count == 0 and hub.rooms.get(room.name) is room:
            del hub.rooms[room.name]
        return 0

    cdef int send_control(self, uint8_t opcode, const char *payload, size_t n) except -1:
        cdef size_t length
        cdef size_t offset = self.hub.encode(0x80 | opcode, payload, n, &length)
        self.append_slice(offset, length)
        return 0

    cdef int send_raw(self, const char *data, size_t n) except -1:
        cdef Hub hub = self.hub
        cdef size_t offset = hub.arena_reserve(n)
        memcpy(hub.arena + offset, data, n)
        self.append_slice(offset, n)
        return 0

    def send_ping(self, bytes payload=b""):
        """Keepalive: queue a ping; pong_received stays False until any
        pong arrives."""
        if self.state != ST_OPEN:
            return
        self.pong_received = False
        self.send_control(OP_PING, PyBytes_AS_STRING(payload), min(len(payload), 125))

    cdef inline int append_slice(self, size_t offset, size_t n) except -1:
        cdef Slice *last
        cdef Slice *grown
        cdef Py_ssize_t cap
        if self.npending:
            last = &self.pending[self.npending - 1]
            if last.offset + last.length == offset:
                last.length += n
                return 0
        if self.npending == self.pending_cap:
            cap = self.pending_cap * 2 if self.pending_cap else 4
            grown = <Slice *>realloc(self.pending, cap * sizeof(Slice))
            if grown == NULL:
                raise MemoryError()
            self.pending = grown
            self.pending_cap = cap
        self.pending[self.npending].offset = offset
        self.pending[self.npending].length = n
        self.npending += 1
        if not self.dirty:
            self.hub.mark_dirty(self)
        return 0

    cdef bint refresh_backlog(self) except -1:
        """True while this member's transport holds more than the limit."""
        if self.transport is None:
            return False
        self.backlog = self.transport.get_write_buffer_size()
        if self.backlog == 0:
            self.via_transport = False
        return self.backlog > self.hub.max_backlog

    cdef int write_pending(self) except -1:
        cdef Hub hub = self.hub
        cdef iovec iov[MAX_IOV]
        cdef msghdr msg
        cdef Py_ssize_t i, first = 0, count
        cdef ssize_t sent
        cdef size_t total
        if self.npending == 0 or self.transport is None:
            return 0
        if self.via_transport and self.direct:
            self.refresh_backlog()
        if self.direct and not self.via_transport:
            # Direct path: nothing of ours is queued in the transport, so a
            # write to the socket keeps the byte order.
            while first < self.npending:
                count = self.npending - first
                if count > MAX_IOV:
                    count = MAX_IOV
                total = 0
                for i in range(count):
                    iov[i].iov_base = hub.arena + self.pending[first + i].offset
                    iov[i].iov_len = self.pending[first + i].length
                    total += iov[i].iov_len
                msg.msg_name = NULL
                msg.msg_namelen = 0
                msg.msg_iov = iov
                msg.msg_iovlen = count
                msg.msg_control = NULL
                msg.msg_controllen = 0
                msg.msg_flags = 0
                while True:
                    sent = sendmsg(self.fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT)
                    if sent >= 0 or errno != EINTR:
                        break
                if sent < 0:
                    if errno != EAGAIN and errno != EWOULDBLOCK:
                        # The peer is gone: never write to it again; the
                        # transport reports connection_lost.
                        self.drop_broken()
                        return 0
                    sent = 0
                hub.bytes_sent += sent
                if <size_t>sent < total:
                    self.queue_rest(first, sent)
                    return 0
                first += count
            return 0
        self.queue_rest(0, 0)
        return 0

    cdef int queue_rest(self, Py_ssize_t first, size_t skip) except -1:
        """Hand the unsent bytes (slices from `first`, minus `skip` bytes
        already sent) to the transport's buffer, then apply the slow-client
        policy."""
        cdef Hub hub = self.hub
        cdef Py_ssize_t i
        cdef size_t n = 0
        cdef Slice *s
        for i in range(first, self.npending):
            n += self.pending[i].length
        n -= skip
        cdef bytes rest = PyBytes_FromStringAndSize(NULL, n)
        cdef char *out = PyBytes_AS_STRING(rest)
        for i in range(first, self.npending):
            s = &self.pending[i]
            if skip >= s.length:
                skip -= s.length
                continue
            memcpy(out, hub.arena + s.offset + skip, s.length - skip)
            out += s.length - skip
            skip = 0
        self.transport.write(rest)
        # Counted when handed over: the transport writes them later.
        hub.bytes_sent += n
        self.via_transport = True
        self.backlog = self.transport.get_write_buffer_size()
        if self.backlog > hub.max_backlog and not hub.drop_slow and self.state == ST_OPEN:
            self.on_slow_client()
        return 0

    cdef int drop_broken(self) except -1:
        if self.room is not None:
            self.leave_room()
        self.state = ST_CLOSED
        self.close_after_flush = False
        self.transport.abort()
        return 0

    def on_slow_client(self):
        """Backlog over the limit under the disconnect policy: close 1008
        behind what is queued; the server aborts if it never drains."""
        cdef Hub hub = self.hub
        hub.slow_disconnects += 1
        cdef bytes reason = b"backlog limit exceeded"
        cdef bytes body = bytes([CLOSE_POLICY >> 8, CLOSE_POLICY & 0xFF]) + reason
        cdef uint8_t head[10]
        cdef size_t hlen = write_header(head, 0x80 | OP_CLOSE, len(body))
        self.transport.write(PyBytes_FromStringAndSize(<char *>head, hlen) + body)
        self.close_code = CLOSE_POLICY
        hub.count_close(CLOSE_POLICY)
        self.leave_room()
        self.state = ST_CLOSED
        self.on_close(CLOSE_POLICY, reason.decode(), False)
        self.close_transport()

    cdef int close_transport(self) except -1:
        if self.transport is not None:
            self.transport.close()
        return 0
