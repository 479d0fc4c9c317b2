# cython: language_level=3
"""The relay's hot path: connections, rooms and the frame-once fan-out.

Field layouts are in _frames.pxd; the stateless codec (headers, masking,
UTF-8) in _codec.pxi and _utf8.pxi. One message, from socket to sockets:

1. The event loop reads into the hub's shared buffer (``get_buffer`` /
   ``buffer_updated``): a connection keeps bytes of its own only for an
   unfinished frame.
2. Before the upgrade, ``handshake_step`` hands the request bytes to the
   hub's gate, which returns a decision as a value (need more, accept,
   respond and close); the connection acts on it.
3. ``parse`` reads frames in place, unmasks eight bytes at a time and
   checks them (RFC 6455 section 5); violations become a close code
   (``fail``), never an exception into the event loop.
4. A complete message goes to ``Hub.broadcast``: encoded once into the
   per-turn arena, and every member of the room gets an (offset, length)
   slice (adjacent slices merge).
5. Once per loop turn ``Hub.flush`` writes each member: one ``sendmsg``
   with an iovec into the arena (plain TCP), or one transport write (TLS,
   or a member whose socket could not take everything last time).

Time-driven work (handshake, close and keepalive deadlines, the rate-limit
window) is ``Hub.sweep``, which the server calls a few times a second.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.ref cimport PyObject, Py_DECREF, Py_INCREF
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove

import zlib

from fastrelay.handshake import Accept, Incomplete

include "_codec.pxi"
include "_utf8.pxi"
include "_grow.pxi"
include "_upgrade.pxi"
include "_tokens.pxi"


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
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    struct linger:
        int l_onoff
        int l_linger
    int setsockopt(int fd, int level, int name, const void *value, unsigned int size)
    int SOL_SOCKET
    int SO_LINGER


# The sendmsg flags, or 0 where the platform lacks one (see the header).
cdef extern from "_compat.h" nogil:
    int MSG_NOSIGNAL "FASTRELAY_MSG_NOSIGNAL"
    int MSG_DONTWAIT "FASTRELAY_MSG_DONTWAIT"


cdef extern from "<errno.h>" nogil:
    int errno
    int EAGAIN
    int EWOULDBLOCK
    int EINTR


# Reads go into one buffer shared by all connections.
DEF SHARED_READ_SIZE = 262144
# The arena starts at 64 KiB and shrinks back to 4 MiB after a turn that
# needed more.
DEF ARENA_START = 65536
DEF ARENA_KEEP = 4194304
# A room's backplane packet is sealed once it reaches this size, so one busy
# room never makes a huge Redis message; a bigger message travels alone.
DEF PACKET_TARGET = 262144
# A packet buffer bigger than this is given back when sealed.
DEF OUTBOUND_KEEP = 65536
# Opcode and 4-byte length before each message of a packet body.
DEF ENTRY_HEAD = 5

# After our close frame, at most LINGER_FACTOR x max(max_message_size,
# LINGER_MIN) bytes from the client are read and dropped before a reset.
DEF LINGER_FACTOR = 8
DEF LINGER_MIN = 1048576
# A reassembly buffer larger than this is freed after its message.
DEF MESSAGE_KEEP = 65536
# permessage-deflate: messages shorter than this go uncompressed (RSV1 clear,
# which RFC 7692 section 6 allows); zlib level 6 is its default.
DEF COMPRESS_MIN = 128
DEF COMPRESS_LEVEL = 6
# A slice at least this long that a socket could not take goes to the
# transports as one object shared by all members (see queue_rest).
DEF SHARE_MIN = 65536
# At most this many slices per sendmsg (Linux IOV_MAX is 1024).
DEF MAX_IOV = 512


cdef inline void put_entry_head(char *p, uint8_t opcode, size_t n) noexcept:
    """A message's head in a backplane packet body: opcode, then the
    payload's length in 4 bytes, big-endian."""
    p[0] = <char>opcode
    p[1] = <char>(n >> 24)
    p[2] = <char>(n >> 16)
    p[3] = <char>(n >> 8)
    p[4] = <char>n


cdef inline size_t entry_length(const unsigned char *p) noexcept:
    return (<size_t>p[0] << 24) | (<size_t>p[1] << 16) | (<size_t>p[2] << 8) | p[3]


cdef bytes entry_head(uint8_t opcode, size_t n):
    cdef char head[ENTRY_HEAD]
    put_entry_head(head, opcode, n)
    return PyBytes_FromStringAndSize(head, ENTRY_HEAD)


cdef class Room:
    """Members of one room in a C array: the fan-out loop walks it without
    touching Python containers."""

    def __cinit__(self, str name):
        self.name = name

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self.members.count):
            Py_DECREF(<object>self.members.items[i])
        free(self.members.items)
        free(self.outbound)

    def __len__(self):
        return self.members.count

    cdef int add(self, Connection c) except -1:
        c.room_index = registry_push(&self.members, c)
        self.deflate_members += c.deflate
        if c.deflate:
            self.deflate_windows[c.deflate_window] += 1
        return 0

    cdef int pause_reading(self) except -1:
        """Backpressure: a member fell behind, so no member is read (each may
        be a sender); TCP then pushes back on the senders."""
        cdef Py_ssize_t i
        for i in range(self.members.count):
            (<Connection>self.members.items[i]).set_reading(True)
        return 0

    cdef int resume_reading(self) except -1:
        cdef Py_ssize_t i
        for i in range(self.members.count):
            (<Connection>self.members.items[i]).set_reading(False)
        return 0

    cdef void remove(self, Connection c) noexcept:
        cdef Py_ssize_t i = c.room_index
        cdef PyObject *moved
        if i < 0 or i >= self.members.count or self.members.items[i] != <PyObject *>c:
            return
        moved = registry_take(&self.members, i)
        if moved != NULL:
            (<Connection>moved).room_index = i
        c.room_index = -1
        self.deflate_members -= c.deflate
        if c.deflate:
            self.deflate_windows[c.deflate_window] -= 1
        Py_DECREF(c)


cdef class Hub:
    """Rooms, connections, the per-turn arena and its flush, the timers'
    sweep, and the plain counters the metrics endpoint reads at scrape
    time."""

    def __init__(self, loop, gate=None, *, bint echo=True,
                 Py_ssize_t max_message_size=1048576, Py_ssize_t max_backlog=1048576,
                 str slow_client_policy="backpressure", Py_ssize_t max_messages_per_second=0,
                 double handshake_timeout=10.0, double close_timeout=5.0,
                 double ping_interval=20.0, double ping_timeout=20.0,
                 double slow_client_timeout=5.0):
        if slow_client_policy not in ("backpressure", "disconnect", "drop"):
            raise ValueError(
                "slow_client_policy must be 'backpressure', 'disconnect' or 'drop'")
        self.loop = loop
        self.gate = gate
        self.flush_callback = self.flush
        self.rooms = {}
        self.closes = {}
        self.outgoing = []
        self.shared = {}
        self.echo = echo
        self.max_message_size = max_message_size
        self.max_backlog = max_backlog
        self.drop_slow = slow_client_policy == "drop"
        self.backpressure = slow_client_policy == "backpressure"
        self.hard_backlog = max_backlog + (4 * max_message_size if self.backpressure else 0)
        self.slow_client_timeout = slow_client_timeout
        self.max_rate = max_messages_per_second
        self.max_request_head = 8192
        self.max_headers = 64
        self.handshake_timeout = handshake_timeout
        self.close_timeout = close_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.now = loop.time()
        self.next_epoch = self.now + 1.0
        self.next_ping = self.now + ping_interval
        grow(<void **>&self.arena, &self.arena_cap, ARENA_START, 1, ARENA_START)
        self.shared_read = <char *>malloc(SHARED_READ_SIZE)
        if self.shared_read == NULL:
            raise MemoryError()
        self.shared_view = PyMemoryView_FromMemory(self.shared_read, SHARED_READ_SIZE,
                                                   PyBUF_WRITE)

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self.dirty.count):
            Py_DECREF(<object>self.dirty.items[i])
        for i in range(self.clients.count):
            Py_DECREF(<object>self.clients.items[i])
        for i in range(self.paused_senders.count):
            Py_DECREF(<object>self.paused_senders.items[i])
        for i in range(self.outbound_rooms.count):
            Py_DECREF(<object>self.outbound_rooms.items[i])
        free(self.outbound_rooms.items)
        free(self.dirty.items)
        free(self.paused_senders.items)
        free(self.clients.items)
        free(self.arena)
        # shared_view is never handed out beyond a single read.
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

    @property
    def clients_count(self):
        """Connections of any state, the handshake included."""
        return self.clients.count

    # -- time ------------------------------------------------------------------

    def sweep(self, double now):
        """Everything time-driven, for the server to call a few times a
        second: start a new rate-limit window each second, drop connections
        past their handshake or close deadline, close those that did not
        answer a keepalive ping in time, ping the others. Returns how many
        handshakes timed out."""
        self.now = now
        if now >= self.next_epoch:
            self.epoch += 1
            self.next_epoch = now + 1.0
        timed_out = self.expire(now)
        self.keepalive(now)
        return timed_out

    cdef int expire(self, double now) except -1:
        """Act on passed deadlines; returns the number of handshakes that
        timed out. A connection's deadline means what its state says: the
        handshake, the pong (open), or the peer's close frame (closing)."""
        cdef Py_ssize_t i
        cdef Connection c
        cdef int handshakes = 0
        expired = []
        for i in range(self.clients.count):
            c = <Connection>self.clients.items[i]
            if c.out.congested and now >= c.out.stall_deadline:
                expired.append(c)
            elif (c.deadline != 0 and c.deadline <= now) or (
                    c.expires_at != 0 and c.expires_at <= now and c.state == OPEN):
                expired.append(c)
        for c in expired:
            if c.out.congested:
                c.congestion_check(now)
                continue
            if c.state == OPEN and c.expires_at != 0 and c.expires_at <= now:
                # The access the client was given has run out.
                c.start_close(POLICY_VIOLATION, "token expired")
                continue
            c.deadline = 0
            if c.state == OPEN:
                c.start_close(INTERNAL_ERROR, "keepalive ping timeout")
            else:
                if c.state == HANDSHAKE:
                    handshakes += 1
                c.abort()
        return handshakes

    cdef int keepalive(self, double now) except -1:
        """Ping every open connection that has no deadline running (RFC 6455
        section 5.5.2); its pong clears the deadline (section 5.5.3)."""
        cdef Py_ssize_t i
        cdef Connection c
        if self.ping_interval <= 0 or now < self.next_ping:
            return 0
        self.next_ping = now + self.ping_interval
        for i in range(self.clients.count):
            c = <Connection>self.clients.items[i]
            if c.state == OPEN and c.deadline == 0:
                c.deadline = now + self.ping_timeout
                c.send_control(PING, NULL, 0)
        return 0

    def close_all(self, int code, str reason):
        """Shutdown: a close frame to every open connection (each then has
        the close timeout to answer), and connections still in the
        handshake are closed."""
        cdef Py_ssize_t i
        cdef Connection c
        everyone = [<object>self.clients.items[i] for i in range(self.clients.count)]
        for c in everyone:
            if c.state == OPEN:
                c.start_close(code, reason)
            elif c.state == HANDSHAKE:
                c.state = CLOSED
                c.deadline = self.now + self.close_timeout
                c.finish()

    def abort_all(self):
        """Drop every connection now (the shutdown timeout passed)."""
        cdef Py_ssize_t i
        everyone = [<object>self.clients.items[i] for i in range(self.clients.count)]
        for c in everyone:
            c.abort()

    # -- output ----------------------------------------------------------------

    cdef int count_close(self, int code) except -1:
        self.closes[code] = self.closes.get(code, 0) + 1
        return 0

    cdef size_t arena_reserve(self, size_t n) except? 0:
        """Make room for n more bytes; returns the offset they start at.
        Slices are offsets, so growing (moving) the arena is safe."""
        grow(<void **>&self.arena, &self.arena_cap, self.arena_len + n, 1, ARENA_START)
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
        if n:
            memcpy(self.arena + offset + hlen, payload, n)
        length[0] = hlen + n
        return offset

    cdef size_t encode_compressed(self, uint8_t opcode, int window, const char *payload,
                                  size_t n, size_t *length) except? 0:
        """RFC 7692 section 7.2.1 without context takeover: deflate the
        message on its own with a `window`-bit LZ77 window, drop the 00 00
        ff ff tail, set RSV1. Sets *length to 0 when compression does not
        make it smaller."""
        deflater = zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, -window)
        data = deflater.compress(PyBytes_FromStringAndSize(payload, n))
        data += deflater.flush(zlib.Z_SYNC_FLUSH)
        cdef size_t zn = len(data) - 4
        if zn >= n:
            length[0] = 0
            return 0
        return self.encode(0x80 | 0x40 | opcode, PyBytes_AS_STRING(data), zn, length)

    cdef int mark_dirty(self, Connection c) except -1:
        if c.out.dirty:
            return 0
        c.out.dirty = True
        registry_push(&self.dirty, c)
        if self.dirty.count == 1:
            self.loop.call_soon(self.flush_callback)
        return 0

    cdef Py_ssize_t broadcast(self, Room room, Connection sender, uint8_t opcode,
                              const char *payload, size_t n) except -1:
        """Encode the frame once (and once compressed, when members of the
        room negotiated permessage-deflate) and give every member a slice;
        returns how many got it. `sender` may be None (a publish)."""
        cdef Connection m
        cdef Py_ssize_t i
        cdef size_t delivered = 0
        cdef size_t length
        cdef size_t offset = self.encode(0x80 | opcode, payload, n, &length)
        # Compressed once per server window present in the room (0: that
        # window's members get the plain frame).
        cdef size_t zoffset[16]
        cdef size_t zlength[16]
        cdef bint compressed = room.deflate_members and n >= COMPRESS_MIN
        cdef int window
        if compressed:
            for window in range(9, 16):
                zlength[window] = 0
                if room.deflate_windows[window]:
                    zoffset[window] = self.encode_compressed(opcode, window, payload, n,
                                                             &zlength[window])
        if self.backplane is not None and sender is not None:
            self.queue_outbound(room, opcode, payload, n)
        for i in range(room.members.count):
            m = <Connection>room.members.items[i]
            if m is sender and not self.echo:
                continue
            if self.drop_slow and m.out.backlog > self.max_backlog and m.refresh_backlog():
                self.slow_drops += 1
                continue
            if compressed and m.deflate and zlength[m.deflate_window]:
                m.append_slice(zoffset[m.deflate_window], zlength[m.deflate_window])
            else:
                m.append_slice(offset, length)
            delivered += 1
        self.deliveries += delivered
        return delivered

    def publish(self, str room_name, bint text, payload):
        """Deliver one message from outside the room (the HTTP publish API)
        to its local members, encoded once like any other, and through the
        backplane to other processes; returns how many local members got
        it (0 when the room has none here)."""
        cdef Room room = self.rooms.get(room_name)
        cdef bytes data = bytes(payload)
        cdef int opcode = TEXT if text else BINARY
        if len(data) > self.max_message_size:
            raise ValueError("message larger than relay.max_message_size")
        if self.backplane is not None:
            if room is not None:
                self.queue_outbound(room, opcode, PyBytes_AS_STRING(data), len(data))
            else:
                if not self.outgoing and self.outbound_rooms.count == 0 and self.dirty.count == 0:
                    self.loop.call_soon(self.flush_callback)
                self.outgoing.append((room_name, entry_head(opcode, len(data)) + data, 1))
        # Counted where it enters the relay (here, or at the process that
        # published it), so that a total over processes counts it once.
        self.messages += 1
        if room is None:
            return 0
        return self.broadcast(room, None, opcode, PyBytes_AS_STRING(data), len(data))

    def room_ready(self, str room_name):
        """The backplane's subscription for this room is confirmed (or the
        backplane gave up on it): write what its members were held."""
        cdef Room room = self.rooms.get(room_name)
        cdef Py_ssize_t i
        cdef Connection m
        if room is None or not room.pending:
            return
        room.pending = False
        for i in range(room.members.count):
            m = <Connection>room.members.items[i]
            if m.held is not None:
                m.release_output()

    def release_pending_rooms(self):
        """The backplane lost Redis: no room waits for a subscription."""
        for name in [name for name, room in self.rooms.items() if (<Room>room).pending]:
            self.room_ready(name)

    def deliver_packet(self, str room_name, packet, Py_ssize_t start):
        """A packet body another process published (from the backplane,
        body from `start`): each message to the local members of its room,
        encoded once into this turn's arena like a local one, and not
        published again. Returns how many messages it held; ValueError
        (and nothing delivered) when the body is truncated."""
        cdef Room room = self.rooms.get(room_name)
        cdef const unsigned char[::1] data = packet
        cdef Py_ssize_t end = data.shape[0]
        cdef Py_ssize_t at = start
        cdef Py_ssize_t count = 0
        cdef size_t n
        cdef uint8_t opcode
        cdef const char *base
        if start < 0 or start > end:
            raise ValueError("packet body outside the packet")
        while at < end:  # the whole body is checked before any of it is delivered
            if end - at < ENTRY_HEAD:
                raise ValueError("truncated message header")
            n = entry_length(&data[at + 1])
            at += ENTRY_HEAD
            if <size_t>(end - at) < n:
                raise ValueError("truncated message")
            at += n
            count += 1
        if room is None or count == 0:
            return count
        base = <const char *>&data[0]
        at = start
        while at < end:
            opcode = data[at]
            n = entry_length(&data[at + 1])
            at += ENTRY_HEAD
            if opcode == TEXT or opcode == BINARY:
                self.broadcast(room, None, opcode, base + at, n)
            at += n
        return count

    def flush(self):
        """Write every dirty connection's slices: one write each."""
        cdef Py_ssize_t i
        cdef Connection c
        cdef Room room
        try:
            i = 0
            # Entries added while flushing (none are expected) are written
            # by this same loop.
            while i < self.dirty.count:
                c = <Connection>self.dirty.items[i]
                c.out.dirty = False
                try:
                    if c.state != CLOSED or c.out.finish_after_flush:
                        c.write_pending()
                    if c.out.finish_after_flush:
                        c.out.finish_after_flush = False
                        c.finish()
                except Exception as exc:
                    # One connection's failure must not cost the others
                    # their writes: drop it and report.
                    c.out.count = 0
                    c.abort()
                    self.loop.call_exception_handler({
                        "message": "fastrelay: write failed; connection dropped",
                        "exception": exc,
                    })
                c.out.count = 0
                i += 1
        finally:
            for i in range(self.dirty.count):
                Py_DECREF(<object>self.dirty.items[i])
            self.dirty.count = 0
            if self.paused_senders.count:
                self.resume_senders()
            if self.shared:
                self.shared.clear()
            for i in range(self.outbound_rooms.count):
                room = <Room>self.outbound_rooms.items[i]
                room.outbound_listed = False
                self.seal_outbound(room)
                Py_DECREF(room)
            self.outbound_rooms.count = 0
            if self.outgoing:
                self.share_outgoing()
            self.arena_len = 0
            if self.arena_cap > ARENA_KEEP:
                # A turn of big messages grew it: give the memory back.
                self.shrink_arena()

    cdef object shared_run(self, size_t offset, size_t length):
        """The arena's bytes [offset, offset + length) as one bytes object,
        made once per turn however many members need them."""
        key = (offset, length)
        run = self.shared.get(key)
        if run is None:
            run = PyBytes_FromStringAndSize(self.arena + offset, length)
            self.shared[key] = run
        return run

    cdef void resume_senders(self) noexcept:
        """Read the senders held for this turn again, unless their room is
        waiting for a slow member (then the room resumes them)."""
        cdef Py_ssize_t i
        cdef Connection c
        for i in range(self.paused_senders.count):
            c = <Connection>self.paused_senders.items[i]
            if c.room is None or c.room.congested == 0:
                try:
                    c.set_reading(False)
                except Exception as exc:
                    self.loop.call_exception_handler({
                        "message": "fastrelay: could not resume reading a connection",
                        "exception": exc,
                    })
            Py_DECREF(c)
        self.paused_senders.count = 0

    cdef int queue_outbound(self, Room room, uint8_t opcode, const char *payload,
                            size_t n) except -1:
        """Add a local message to its room's packet for the backplane: a
        copy per message (not per member), published once per turn."""
        cdef char *p
        if not room.outbound_listed:
            if not self.outgoing and self.outbound_rooms.count == 0 and self.dirty.count == 0:
                self.loop.call_soon(self.flush_callback)
            registry_push(&self.outbound_rooms, room)
            room.outbound_listed = True
        if room.outbound_len and room.outbound_len + ENTRY_HEAD + n > PACKET_TARGET:
            self.seal_outbound(room)
        grow(<void **>&room.outbound, &room.outbound_cap, room.outbound_len + ENTRY_HEAD + n, 1,
             1024)
        p = room.outbound + room.outbound_len
        put_entry_head(p, opcode, n)
        if n:
            memcpy(p + ENTRY_HEAD, payload, n)
        room.outbound_len += ENTRY_HEAD + n
        room.outbound_count += 1
        return 0

    cdef int seal_outbound(self, Room room) except -1:
        """The room's packet so far goes to this turn's outgoing list."""
        if room.outbound_count:
            self.outgoing.append((room.name,
                                  PyBytes_FromStringAndSize(room.outbound, room.outbound_len),
                                  room.outbound_count))
        room.outbound_len = 0
        room.outbound_count = 0
        if room.outbound_cap > OUTBOUND_KEEP:
            free(room.outbound)
            room.outbound = NULL
            room.outbound_cap = 0
        return 0

    cdef void share_outgoing(self) noexcept:
        """Hand this turn's local messages to the backplane in one batch; a
        failure there never costs local delivery."""
        batch = self.outgoing
        self.outgoing = []
        try:
            self.backplane.send_batch(batch)
        except Exception as exc:
            self.loop.call_exception_handler({
                "message": "fastrelay: backplane publish failed",
                "exception": exc,
            })

    cdef void shrink_arena(self) noexcept:
        cdef char *smaller = <char *>realloc(self.arena, ARENA_KEEP)
        if smaller != NULL:
            self.arena = smaller
            self.arena_cap = ARENA_KEEP


# Not tracked by the cyclic GC (no_gc): one per client and long-lived, so
# every collection of the older generations would walk them all again (a
# few per cent of the server's CPU in a burst of handshakes), and 16 bytes
# of GC header each. Nothing is lost: the one cycle through a connection,
# connection <-> its transport (the transport holds its protocol), is
# broken in connection_lost, which drops self.transport; until then
# hub.clients holds the connection anyway (a reference the GC cannot see,
# so it would never have freed it). hub and room only lead back to
# connections through C registries, and held is a bytearray.
@cython.no_gc
cdef class Connection:
    """One client: the asyncio BufferedProtocol, the frame parser and the
    message rules, and its slices of the arena for this turn. Created by
    the server with ``Connection(hub)``; everything it needs from outside
    (the upgrade decision, logging of closes) goes through the hub."""

    def __cinit__(self, Hub hub):
        self.hub = hub
        self.room_index = -1
        self.client_index = -1
        self.fd = -1
        self.state = HANDSHAKE
        self.close_code = ABNORMAL_CLOSURE
        self.inbox.shared_offset = -1

    def __dealloc__(self):
        free(self.inbox.data)
        free(self.message.data)
        free(self.out.slices)

    @property
    def backlog(self):
        return self.out.backlog

    @property
    def peer(self):
        """host:port of the client, for logs."""
        if self.transport is None:
            return "?"
        name = self.transport.get_extra_info("peername")
        return f"{name[0]}:{name[1]}" if name else "?"

    # -- asyncio protocol ------------------------------------------------------

    def connection_made(self, transport):
        cdef Hub hub = self.hub
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.fd = sock.fileno()
            self.direct = transport.get_extra_info("sslcontext") is None
        self.client_index = registry_push(&hub.clients, self)
        self.deadline = hub.now + hub.handshake_timeout
        if hub.backpressure:
            # pause_writing() above a quarter of max_backlog, resume_writing()
            # once under a sixteenth: the hysteresis keeps a room from
            # flapping between paused and running.
            transport.set_write_buffer_limits(hub.max_backlog // 4, hub.max_backlog // 16)
        # Spent only once closed: see buffer_updated.
        self.linger_budget = LINGER_FACTOR * (hub.max_message_size if hub.max_message_size >
                                              LINGER_MIN else LINGER_MIN)

    def connection_lost(self, exc):
        cdef Hub hub = self.hub
        cdef PyObject *moved
        cdef Py_ssize_t i = self.client_index
        if self.state == OPEN:
            # Gone without a close frame: RFC 6455 section 7.1.5 calls this
            # 1006, a code that is recorded but never sent.
            self.close_code = ABNORMAL_CLOSURE
            hub.count_close(ABNORMAL_CLOSURE)
            self.closed(ABNORMAL_CLOSURE, "connection lost", True)
        if self.room is not None:
            self.leave_room()
        self.state = CLOSED
        self.fd = -1
        self.direct = False
        self.deadline = 0
        self.out.count = 0
        self.out.finish_after_flush = False
        self.held = None
        self.transport = None
        if 0 <= i < hub.clients.count and hub.clients.items[i] == <PyObject *>self:
            moved = registry_take(&hub.clients, i)
            if moved != NULL:
                (<Connection>moved).client_index = i
            self.client_index = -1
            if hub.clients.count == 0 and hub.all_gone is not None:
                hub.all_gone.set()
            Py_DECREF(self)

    def eof_received(self):
        # A peer that half-closes without a close frame is gone; let the
        # transport close (returning None closes it).
        return None

    def pause_writing(self):
        """The transport holds more than the high-water mark for this
        member: its room's senders wait (backpressure policy)."""
        cdef Hub hub = self.hub
        cdef Room room = self.room
        if not hub.backpressure or self.out.congested or room is None:
            return
        self.out.congested = True
        self.out.stall_mark = self.transport.get_write_buffer_size()
        self.out.stall_deadline = hub.now + hub.slow_client_timeout
        room.congested += 1
        if room.congested == 1:
            room.pause_reading()

    def resume_writing(self):
        """Drained below the low-water mark: when no member of the room is
        behind any more, its members are read again."""
        cdef Room room = self.room
        if not self.out.congested:
            return
        self.out.congested = False
        if room is not None:
            room.congested -= 1
            if room.congested == 0:
                room.resume_reading()

    def get_buffer(self, Py_ssize_t sizehint):
        cdef size_t want
        cdef Hub hub = self.hub
        cdef Inbox *inbox = &self.inbox
        if self.state != HANDSHAKE:
            if inbox.len == 0:
                inbox.shared_offset = 0
                return hub.shared_view
            if inbox.need <= SHARED_READ_SIZE:
                # Put the unfinished frame in front of the shared buffer and
                # read after it: reads stay large whatever the frame split.
                memcpy(hub.shared_read, inbox.data, inbox.len)
                inbox.shared_offset = inbox.len
                return PyMemoryView_FromMemory(hub.shared_read + inbox.len,
                                               SHARED_READ_SIZE - inbox.len, PyBUF_WRITE)
        # The request head, or a frame larger than the shared buffer: read
        # into this connection's own buffer.
        inbox.shared_offset = -1
        want = inbox.need if inbox.need > inbox.len + 4096 else inbox.len + 4096
        grow(<void **>&inbox.data, &inbox.cap, want, 1, 4096)
        return PyMemoryView_FromMemory(inbox.data + inbox.len, inbox.cap - inbox.len,
                                       PyBUF_WRITE)

    def buffer_updated(self, Py_ssize_t nbytes):
        cdef Hub hub = self.hub
        cdef char *data
        cdef size_t total, used
        hub.bytes_received += nbytes
        if self.state == CLOSED:
            # Lingering after our close (RFC 6455 section 7.1.1): what the
            # client still sends is read and dropped, so that closing the
            # socket never meets unread bytes (which the kernel would answer
            # with a reset that destroys our close frame in flight).
            self.inbox.len = 0
            self.linger_budget -= nbytes
            if self.linger_budget < 0:
                self.abort()
            return
        if self.inbox.shared_offset >= 0:
            data = self.hub.shared_read
            total = self.inbox.shared_offset + nbytes
            self.inbox.len = 0
        else:
            self.inbox.len += nbytes
            data = self.inbox.data
            total = self.inbox.len
        if self.state == HANDSHAKE:
            self.handshake_step()
            return
        used = self.parse(data, total)
        self.keep_rest(data, total, used)
        if (hub.backpressure and not self.inbox.paused
                and hub.arena_len > <size_t>hub.max_backlog // 4):
            # The event loop may read a socket many times before the flush:
            # past a quarter of max_backlog in this turn, this sender waits
            # for the flush, so no member gets more than that in one turn
            # before backpressure can act.
            self.set_reading(True)
            registry_push(&hub.paused_senders, self)

    # -- the upgrade -------------------------------------------------------------

    cdef int handshake_step(self) except -1:
        """The common case in C (scan_upgrade, when the gate allows it: no
        access checks or origin list, not logging at debug); otherwise, or
        when the scan defers, ask the gate about the request bytes so far
        and act on its decision. The view is released before acting: the
        buffer may move."""
        cdef Hub hub = self.hub
        cdef FastRequest req
        if (hub.fast_upgrade
                and scan_upgrade(<const uint8_t *>self.inbox.data, self.inbox.len,
                                 hub.max_request_head, hub.max_headers, hub.compression, &req)
                and (hub.max_connections == 0 or hub.connected < hub.max_connections)
                and hub.gate.accepting):
            if not hub.fast_needs_grant:
                return self.open_fast(&req, False, 0.0)
            return self.grant_fast(&req)
        view = PyMemoryView_FromMemory(self.inbox.data, self.inbox.len, PyBUF_READ)
        try:
            decision = self.hub.gate.decide(view, self.inbox.scan_from, self)
        finally:
            view.release()
        if type(decision) is Incomplete:
            self.inbox.scan_from = decision.scan_from
        elif type(decision) is Accept:
            self.open(decision)
        else:
            self.respond_and_close(decision.response)
        return 0

    cdef int open(self, object accept) except -1:
        """Act on an Accept: send its 101 response and join its room."""
        cdef bytes response = accept.response
        self.deflate = accept.deflate
        self.deflate_window = accept.deflate_window
        self.read_only = accept.read_only
        self.expires_at = accept.expires_at
        return self.join(accept.room, accept.consumed, PyBytes_AS_STRING(response),
                         len(response))

    cdef int grant_fast(self, FastRequest *req) except -1:
        """Access checks on: the gate decides on the token of a request the
        scan proved ordinary, and the connection acts on its answer (a
        refusal, or what the token grants)."""
        cdef const char *head = self.inbox.data
        room_name = PyUnicode_DecodeASCII(head + req.path_start, req.path_end - req.path_start,
                                          NULL)
        query = PyUnicode_DecodeASCII(head + req.query_start, req.query_end - req.query_start,
                                      NULL)
        authorization = (() if req.auth_end == 0 else (PyUnicode_DecodeASCII(
            head + req.auth_start, req.auth_end - req.auth_start, NULL),))
        answer = self.hub.gate.grant(room_name, query, authorization, self)
        if type(answer) is tuple:
            return self.open_fast(req, answer[0], answer[1])
        return self.respond_and_close(answer.response)

    cdef int open_fast(self, FastRequest *req, bint read_only, double expires_at) except -1:
        """An ordinary upgrade proved valid by scan_upgrade: the 101 built
        on the stack, no Python object but the room's name."""
        cdef const char *head = self.inbox.data
        cdef str room_name = PyUnicode_DecodeASCII(head + req.path_start,
                                                   req.path_end - req.path_start, NULL)
        cdef char response[SWITCHING_LEN + ACCEPT_LEN + 4]
        memcpy(response, SWITCHING, SWITCHING_LEN)
        accept_token(<const uint8_t *>head + req.key_start, response + SWITCHING_LEN)
        memcpy(response + SWITCHING_LEN + ACCEPT_LEN, b"\r\n\r\n", 4)
        self.deflate_window = 15
        self.read_only = read_only
        self.expires_at = expires_at
        return self.join(room_name, req.consumed, response, sizeof(response))

    cdef int join(self, str room_name, Py_ssize_t consumed, const char *response,
                  size_t n) except -1:
        """Open: send the 101 (response, n bytes), join the room, and parse
        whatever frames followed the request head in the same read (none
        are lost)."""
        cdef Hub hub = self.hub
        cdef Room room
        cdef size_t rest, used
        self.state = OPEN
        self.deadline = 0
        room = hub.rooms.get(room_name)
        if room is None:
            room = Room(room_name)
            hub.rooms[room_name] = room
            if hub.backplane is not None:
                # False: a subscription is on its way; hub.room_ready() ends the wait.
                room.pending = not hub.backplane.room_opened(room_name)
        room.add(self)
        self.room = room
        self.send_upgrade(response, n)
        if room.congested:
            self.set_reading(True)
        hub.connected += 1
        hub.connections_total += 1
        rest = self.inbox.len - consumed
        memmove(self.inbox.data, self.inbox.data + consumed, rest)
        self.inbox.len = 0
        used = self.parse(self.inbox.data, rest) if rest else 0
        # Keeps only an unfinished frame; an idle connection keeps no buffer.
        self.keep_rest(self.inbox.data, rest, used)
        return 0

    cdef int send_upgrade(self, const char *response, size_t n) except -1:
        """The 101 goes to the socket at once when nothing can be ahead of
        it (plain TCP, no output yet, a room that is not pending: a pending
        room holds it, see write_pending). An idle connection then never
        needs slices of the arena, nor a place in the flush; what the
        socket does not take, or an error, goes the usual way (the flush
        finds out about a broken peer)."""
        cdef ssize_t sent = 0
        if self.direct and self.out.count == 0 and not self.room.pending:
            while True:
                sent = send(self.fd, response, n, MSG_NOSIGNAL | MSG_DONTWAIT)
                if sent >= 0 or errno != EINTR:
                    break
            if sent < 0:
                sent = 0
            self.hub.bytes_sent += sent
        if <size_t>sent < n:
            self.send_raw(response + sent, n - <size_t>sent)
        return 0

    cdef int respond_and_close(self, bytes response) except -1:
        """An HTTP answer instead of the upgrade (an error, or the demo
        page); the connection closes once it is written."""
        self.send_raw(PyBytes_AS_STRING(response), len(response))
        self.state = CLOSED
        self.inbox.len = 0
        self.deadline = self.hub.now + self.hub.close_timeout
        self.out.finish_after_flush = True
        self.hub.mark_dirty(self)
        return 0

    # -- frames --------------------------------------------------------------------

    cdef size_t parse(self, char *data, size_t total) except? 0:
        """Handle every complete frame in data; return the bytes used."""
        cdef Header h
        cdef Py_ssize_t hlen
        cdef size_t pos = 0
        cdef uint8_t *p
        cdef uint8_t *payload
        cdef size_t n, checked
        cdef Hub hub = self.hub
        cdef Message *msg = &self.message
        self.inbox.need = 0
        while self.state == OPEN or self.state == CLOSING:
            p = <uint8_t *>data + pos
            hlen = read_header(p, total - pos, &h, True, self.deflate)
            if hlen < 0:
                self.fail(-hlen, h.reason)
                return total
            if hlen == 0:
                break
            if h.opcode < 0x8:
                if h.length > <uint64_t>hub.max_message_size or (
                        h.opcode == CONTINUATION and
                        msg.len + h.length > <uint64_t>hub.max_message_size):
                    self.fail(MESSAGE_TOO_BIG, b"message too big")
                    return total
            if total - pos - hlen < h.length:
                self.inbox.need = hlen + h.length
                if self.state == OPEN and not self.check_partial_text(
                        h.opcode, h.rsv1, h.mask, p + hlen, total - pos - hlen):
                    self.fail(INVALID_PAYLOAD_DATA, b"invalid UTF-8")
                    return total
                break
            n = h.length
            payload = p + hlen
            checked = msg.checked
            if checked:
                # The start of this text frame was unmasked and validated
                # while it arrived (check_partial_text): only the rest now.
                msg.checked = 0
                unmask_from(payload + checked, n - checked, h.mask, checked)
            else:
                unmask(payload, n, h.mask)
            pos += hlen + n
            if self.state == CLOSING and h.opcode != CLOSE:
                # Section 5.5.1: after our close, only the peer's close
                # matters; data still in flight is discarded.
                continue
            if h.opcode >= 0x8:
                if h.rsv1:
                    self.fail(PROTOCOL_ERROR, b"RSV1 set on a control frame")
                    return total
                if h.opcode == PING:
                    # Section 5.5.3: a pong carries the ping's payload.
                    if self.state == OPEN:
                        self.send_control(PONG, <char *>payload, n)
                elif h.opcode == PONG:
                    if self.state == OPEN:
                        self.deadline = 0   # the keepalive is answered
                else:
                    self.on_close_frame(payload, n)
                    return total
                continue
            if h.opcode == CONTINUATION:
                if not msg.opcode:
                    self.fail(PROTOCOL_ERROR, b"continuation without a message")
                    return total
                if h.rsv1:
                    # RFC 7692 section 6.1: only a message's first frame.
                    self.fail(PROTOCOL_ERROR, b"RSV1 set on a continuation frame")
                    return total
            else:
                if msg.opcode:
                    self.fail(PROTOCOL_ERROR, b"new message inside a fragmented one")
                    return total
                if self.read_only:
                    self.fail(POLICY_VIOLATION, b"read-only")
                    return total
                msg.opcode = h.opcode
                msg.compressed = h.rsv1
                msg.utf8_state = UTF8_ACCEPT
            if msg.opcode == TEXT and not msg.compressed:
                # Fail at the first invalid byte, not at the end (section 8.1).
                if checked:
                    msg.utf8_state = msg.checked_state
                if utf8_feed(&msg.utf8_state, payload + checked, n - checked) < 0 or (
                        h.fin and msg.utf8_state != UTF8_ACCEPT):
                    self.fail(INVALID_PAYLOAD_DATA, b"invalid UTF-8")
                    return total
            if not h.fin:
                self.append_fragment(payload, n)
                continue
            if self.over_rate():
                self.fail(POLICY_VIOLATION, b"message rate limit exceeded")
                return total
            if msg.len:
                self.append_fragment(payload, n)
                payload = <uint8_t *>msg.data
                n = msg.len
            if msg.compressed:
                self.relay_compressed(<char *>payload, n)
            else:
                hub.messages += 1
                hub.broadcast(self.room, self, msg.opcode, <char *>payload, n)
            msg.opcode = 0
            self.release_fragments()
        return pos

    cdef int relay_compressed(self, const char *payload, size_t n) except -1:
        """Inflate a permessage-deflate message (RFC 7692 section 7.2.2),
        check its size and text, and relay the plain bytes."""
        cdef Hub hub = self.hub
        inflater = zlib.decompressobj(-15)
        try:
            data = inflater.decompress(
                PyBytes_FromStringAndSize(payload, n) + b"\x00\x00\xff\xff",
                hub.max_message_size + 1)
        except zlib.error:
            return self.fail(INVALID_PAYLOAD_DATA, b"invalid compressed data")
        if len(data) > hub.max_message_size or inflater.unconsumed_tail:
            return self.fail(MESSAGE_TOO_BIG, b"message too big")
        if self.message.opcode == TEXT and not utf8_complete(
                <const uint8_t *>PyBytes_AS_STRING(data), len(data)):
            return self.fail(INVALID_PAYLOAD_DATA, b"invalid UTF-8")
        hub.messages += 1
        hub.broadcast(self.room, self, self.message.opcode, PyBytes_AS_STRING(data), len(data))
        return 0

    cdef inline bint over_rate(self) noexcept:
        """Count one message against the limit of the current window."""
        cdef Hub hub = self.hub
        if hub.max_rate == 0:
            return False
        if self.rate.epoch != hub.epoch:
            self.rate.epoch = hub.epoch
            self.rate.count = 0
        self.rate.count += 1
        return self.rate.count > hub.max_rate

    cdef int keep_rest(self, char *data, size_t total, size_t used) except -1:
        """Keep the bytes of an unfinished frame for the next read."""
        cdef Inbox *inbox = &self.inbox
        cdef size_t rest = total - used
        if self.state == CLOSED or rest == 0:
            # Nothing to keep: give the buffer back, so that idle
            # connections cost no receive buffer at all.
            inbox.len = 0
            free(inbox.data)
            inbox.data = NULL
            inbox.cap = 0
            return 0
        if data == inbox.data:
            memmove(inbox.data, inbox.data + used, rest)
        else:
            # A frame larger than the shared buffer is read into our own
            # buffer, so make room for all of it now.
            grow(<void **>&inbox.data, &inbox.cap,
                 inbox.need if inbox.need > SHARED_READ_SIZE else rest, 1, 4096)
            memcpy(inbox.data, data + used, rest)
        inbox.len = rest
        return 0

    cdef bint check_partial_text(self, uint8_t opcode, bint rsv1, uint32_t mask,
                                 uint8_t *payload, size_t avail) noexcept:
        """A text frame still arriving: unmask and validate the bytes that
        are here, so invalid UTF-8 closes the connection at once (RFC 6455
        section 8.1) instead of after the whole frame. Only for a frame in
        a valid place (starting a message, or continuing a text one), so
        that sequencing errors keep their own close code. False: invalid."""
        cdef Message *msg = &self.message
        if rsv1 or avail <= msg.checked:
            return True
        if opcode == TEXT and msg.opcode == 0:
            if msg.checked == 0:
                msg.checked_state = UTF8_ACCEPT
        elif not (opcode == CONTINUATION and msg.opcode == TEXT and not msg.compressed):
            return True
        elif msg.checked == 0:
            msg.checked_state = msg.utf8_state
        unmask_from(payload + msg.checked, avail - msg.checked, mask, msg.checked)
        if utf8_feed(&msg.checked_state, payload + msg.checked, avail - msg.checked) < 0:
            return False
        msg.checked = avail
        return True

    cdef int append_fragment(self, const uint8_t *payload, size_t n) except -1:
        cdef Message *msg = &self.message
        if n == 0:
            # Nothing to add, and msg.data may still be NULL: memcpy to NULL
            # is undefined even for 0 bytes (found by UBSan).
            return 0
        grow(<void **>&msg.data, &msg.cap, msg.len + n, 1, 4096)
        memcpy(msg.data + msg.len, payload, n)
        msg.len += n
        return 0

    cdef void release_fragments(self) noexcept:
        self.message.len = 0
        if self.message.cap > MESSAGE_KEEP:
            free(self.message.data)
            self.message.data = NULL
            self.message.cap = 0

    # -- closing -------------------------------------------------------------------

    cdef int on_close_frame(self, const uint8_t *payload, size_t n) except -1:
        """Sections 5.5.1 and 7.4: validate the peer's close, echo it."""
        cdef uint32_t code
        cdef Hub hub = self.hub
        if n == 1:
            return self.fail(PROTOCOL_ERROR, b"close frame with a 1-byte payload")
        if n >= 2:
            code = load_be16(payload)
            if not close_code_valid(code):
                return self.fail(PROTOCOL_ERROR, b"invalid close code")
            if not utf8_complete(payload + 2, n - 2):
                return self.fail(INVALID_PAYLOAD_DATA, b"invalid UTF-8 in close reason")
        else:
            code = NO_STATUS_RECEIVED
        if self.state == OPEN:
            # Echo the peer's code and reason; an empty close is answered
            # with an empty close.
            self.send_control(CLOSE, <const char *>payload, n)
            self.close_code = code
            hub.count_close(code)
            self.leave_room()
        self.state = CLOSED
        # Section 7.1.1: the server closes the TCP connection first; if the
        # peer never reads, the close deadline drops it.
        self.deadline = hub.now + hub.close_timeout
        self.out.finish_after_flush = True
        hub.mark_dirty(self)
        self.closed(code, PyBytes_FromStringAndSize(<char *>payload + 2, n - 2).decode()
                    if n >= 2 else "", True)
        return 0

    cdef int fail(self, int code, const char *reason) except -1:
        """Fail the connection (section 7.1.7): close frame, then TCP."""
        if code != POLICY_VIOLATION:
            self.hub.protocol_errors += 1
        self.start_close(code, reason.decode())
        self.state = CLOSED
        self.out.finish_after_flush = True
        self.hub.mark_dirty(self)
        return 0

    cdef int start_close(self, int code, str reason) except -1:
        """Send a close frame and wait, up to the close timeout, for the
        peer's (section 7.1.2)."""
        cdef Hub hub = self.hub
        cdef bytes encoded = reason.encode()[:123]
        cdef bytes body = bytes([code >> 8, code & 0xFF]) + encoded
        self.send_control(CLOSE, PyBytes_AS_STRING(body), len(body))
        self.close_code = code
        hub.count_close(code)
        self.leave_room()
        self.state = CLOSING
        self.deadline = hub.now + hub.close_timeout
        self.closed(code, reason, False)
        return 0

    cdef int closed(self, int code, str reason, bint by_peer) except -1:
        """Tell the server's close log, when it wants to know."""
        if self.hub.close_log is not None:
            self.hub.close_log(self, code, reason, by_peer)
        return 0

    def abort(self):
        """Drop the connection now, without a close handshake: a reset, so
        that bytes still in the kernel's send buffer are discarded too."""
        cdef linger reset
        if self.room is not None:
            self.leave_room()
        self.state = CLOSED
        if self.transport is not None:
            if self.fd >= 0:
                reset.l_onoff = 1
                reset.l_linger = 0
                setsockopt(self.fd, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset))
            self.transport.abort()

    cdef int leave_room(self) except -1:
        cdef Room room = self.room
        cdef Hub hub = self.hub
        if room is None:
            return 0
        room.remove(self)
        self.room = None
        if self.held is not None:
            # Leaving (closing) while held: the 101 and what followed go out
            # before the close frame.
            self.release_output()
        if self.out.congested:
            self.out.congested = False
            room.congested -= 1
            if room.congested == 0:
                room.resume_reading()
        self.set_reading(False)
        hub.connected -= 1
        hub.disconnections_total += 1
        if room.members.count == 0 and hub.rooms.get(room.name) is room:
            del hub.rooms[room.name]
            # What its members sent this turn goes before anything published
            # to the room's name from now on (the API may publish to it).
            hub.seal_outbound(room)
            if hub.backplane is not None:
                hub.backplane.room_closed(room.name)
        return 0

    # -- output --------------------------------------------------------------------

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

    cdef inline int append_slice(self, size_t offset, size_t n) except -1:
        cdef Outbox *out = &self.out
        cdef Slice *last
        if out.count:
            last = &out.slices[out.count - 1]
            if last.offset + last.length == offset:
                last.length += n
                return 0
        grow(<void **>&out.slices, &out.cap, out.count + 1, sizeof(Slice), 4)
        out.slices[out.count].offset = offset
        out.slices[out.count].length = n
        out.count += 1
        if not out.dirty:
            self.hub.mark_dirty(self)
        return 0

    cdef bint refresh_backlog(self) except -1:
        """True while this member's transport holds more than the limit."""
        if self.transport is None:
            return False
        self.out.backlog = self.transport.get_write_buffer_size()
        if self.out.backlog == 0:
            self.out.via_transport = False
        return self.out.backlog > self.hub.max_backlog

    cdef int write_pending(self) except -1:
        cdef Hub hub = self.hub
        cdef Outbox *out = &self.out
        cdef iovec iov[MAX_IOV]
        cdef msghdr msg
        cdef Py_ssize_t i, first = 0, count
        cdef ssize_t sent
        cdef size_t total
        if out.count == 0 or self.transport is None:
            return 0
        if self.room is not None and self.room.pending:
            return self.hold_output()
        if self.held is not None:
            self.release_output()
        if out.via_transport and self.direct:
            self.refresh_backlog()
        if not self.direct or out.via_transport:
            return self.queue_rest(0, 0)
        # Direct path: nothing of ours is queued in the transport, so a
        # write to the socket keeps the byte order.
        while first < out.count:
            count = out.count - first
            if count > MAX_IOV:
                count = MAX_IOV
            total = 0
            for i in range(count):
                iov[i].iov_base = hub.arena + out.slices[first + i].offset
                iov[i].iov_len = out.slices[first + i].length
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
                    return self.drop_broken()
                sent = 0
            hub.bytes_sent += sent
            if <size_t>sent < total:
                return self.queue_rest(first, sent)
            first += count
        return 0

    cdef int hold_output(self) except -1:
        """Keep this turn's slices (a copy: the arena is reused) until the
        room is ready."""
        cdef Outbox *out = &self.out
        cdef Py_ssize_t i
        if self.held is None:
            self.held = bytearray()
        for i in range(out.count):
            self.held += PyBytes_FromStringAndSize(self.hub.arena + out.slices[i].offset,
                                                   out.slices[i].length)
        return 0

    cdef int release_output(self) except -1:
        """Write what was held, in front of anything newer: from then on the
        transport keeps the order (via_transport)."""
        cdef bytes held = bytes(self.held)
        self.held = None
        if self.transport is None or self.transport.is_closing():
            return 0
        self.transport.write(held)
        self.hub.bytes_sent += len(held)
        self.out.via_transport = True
        return 0

    cdef int queue_rest(self, Py_ssize_t first, size_t skip) except -1:
        """Hand the unsent bytes (slices from `first`, minus `skip` bytes
        already sent) to the transport's buffer, then apply the slow-client
        policy. Short slices are copied together into one bytes object; a
        long one (a big message) is one object per turn shared by every
        member (Hub.shared_run; the transport keeps a reference, it does
        not copy), so a big message is not copied once per member."""
        cdef Hub hub = self.hub
        cdef Outbox *out = &self.out
        cdef Py_ssize_t i, copy_from = -1
        cdef size_t n = 0, copy_skip = 0
        cdef Slice *s
        for i in range(first, out.count):
            n += out.slices[i].length
        n -= skip
        for i in range(first, out.count):
            s = &out.slices[i]
            if skip >= s.length:
                skip -= s.length
                continue
            if s.length - skip < SHARE_MIN:
                if copy_from < 0:
                    copy_from, copy_skip = i, skip
                skip = 0
                continue
            if copy_from >= 0:
                self.transport.write(self.copy_slices(copy_from, i, copy_skip))
                copy_from = -1
            run = hub.shared_run(s.offset, s.length)
            self.transport.write(run if skip == 0 else memoryview(run)[skip:])
            skip = 0
        if copy_from >= 0:
            self.transport.write(self.copy_slices(copy_from, out.count, copy_skip))
        # Counted when handed over: the transport writes them later.
        hub.bytes_sent += n
        out.via_transport = True
        out.backlog = self.transport.get_write_buffer_size()
        if out.backlog > hub.hard_backlog and not hub.drop_slow and self.state == OPEN:
            self.slow_client(b"backlog limit exceeded")
        return 0

    cdef bytes copy_slices(self, Py_ssize_t start, Py_ssize_t end, size_t skip):
        """Slices [start, end), less `skip` bytes of the first, in one bytes."""
        cdef Outbox *out = &self.out
        cdef Py_ssize_t i
        cdef size_t n = 0
        for i in range(start, end):
            n += out.slices[i].length
        cdef bytes joined = PyBytes_FromStringAndSize(NULL, n - skip)
        cdef char *dst = PyBytes_AS_STRING(joined)
        for i in range(start, end):
            memcpy(dst, self.hub.arena + out.slices[i].offset + skip, out.slices[i].length - skip)
            dst += out.slices[i].length - skip
            skip = 0
        return joined

    cdef int drop_broken(self) except -1:
        if self.room is not None:
            self.leave_room()
        self.state = CLOSED
        self.out.finish_after_flush = False
        self.transport.abort()
        return 0

    cdef int slow_client(self, bytes reason) except -1:
        """A member too far behind (backlog over the limit, or no progress
        under backpressure): a 1008 close frame behind what is queued; the
        close deadline resets the connection if it never drains."""
        cdef Hub hub = self.hub
        cdef bytes body = bytes([POLICY_VIOLATION >> 8, POLICY_VIOLATION & 0xFF]) + reason
        cdef uint8_t head[10]
        cdef size_t hlen = write_header(head, 0x80 | CLOSE, len(body))
        hub.slow_disconnects += 1
        self.transport.write(PyBytes_FromStringAndSize(<char *>head, hlen) + body)
        self.close_code = POLICY_VIOLATION
        hub.count_close(POLICY_VIOLATION)
        self.leave_room()
        self.state = CLOSED
        self.deadline = hub.now + hub.close_timeout
        self.closed(POLICY_VIOLATION, reason.decode(), False)
        return self.finish()

    cdef int finish(self) except -1:
        """Our last bytes are queued: end our side. Plain TCP half-closes
        once they are written (the client reads everything, then EOF) and
        goes on reading until the client's EOF, bounded by linger_budget and
        the close deadline; TLS has no half-close in asyncio, so its
        transport closes (close_notify)."""
        if self.transport is None or self.transport.is_closing():
            return 0
        if self.transport.can_write_eof():
            self.transport.write_eof()
            return 0
        return self.close_transport()

    cdef int set_reading(self, bint paused) except -1:
        if paused == self.inbox.paused or self.transport is None or self.transport.is_closing():
            return 0
        self.inbox.paused = paused
        if paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()
        return 0

    cdef int congestion_check(self, double now) except -1:
        """A congested member must make progress every slow_client_timeout
        seconds, or it is closed (1008) and its room goes on."""
        cdef Py_ssize_t buffered
        if now < self.out.stall_deadline or self.transport is None:
            return 0
        buffered = self.transport.get_write_buffer_size()
        if buffered >= self.out.stall_mark:
            return self.slow_client(b"reader stalled")
        self.out.stall_mark = buffered
        self.out.stall_deadline = now + self.hub.slow_client_timeout
        return 0

    cdef int close_transport(self) except -1:
        if self.transport is not None:
            self.transport.close()
        return 0
