# The table of contents of the compiled relay (fastrelay/_frames.pyx): the
# protocol constants shared with Python, and the layout of Room, Hub and
# Connection, their fields grouped by what they are for.

cimport cython
from cpython.ref cimport PyObject
from libc.stdint cimport uint8_t, uint32_t


# RFC 6455 section 5.2. Python sees IntEnums: fastrelay._frames.Opcode.TEXT.
cpdef enum Opcode:
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


# RFC 6455 section 7.4.1: the codes the relay sends or records.
cpdef enum CloseCode:
    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    NO_STATUS_RECEIVED = 1005      # recorded, never sent (section 7.4.1)
    ABNORMAL_CLOSURE = 1006        # recorded, never sent (section 7.1.5)
    INVALID_PAYLOAD_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011


cpdef enum State:
    HANDSHAKE = 0   # reading the HTTP upgrade request
    OPEN = 1        # relaying
    CLOSING = 2     # we sent a close frame and wait for the peer's
    CLOSED = 3      # nothing more is read or written


cdef struct Slice:
    # A run of bytes in the hub's arena; offsets survive the arena moving.
    size_t offset
    size_t length


cdef struct Inbox:
    # Bytes read but not parsed yet: the request head, or an unfinished
    # frame. Complete frames are parsed where they were read (the hub's
    # shared buffer) and never copied here.
    char *data
    size_t len
    size_t cap
    size_t need                    # size of the frame being waited for
    Py_ssize_t shared_offset       # where the last read went in the shared buffer; -1: data
    Py_ssize_t scan_from           # handshake: where the search for the head's end resumes
    bint paused                    # reading paused: its room waits for a slow member


cdef struct Message:
    # The message being reassembled from fragments (section 5.4).
    uint8_t opcode                 # 0: none in progress
    bint compressed                # its first frame had RSV1 (RFC 7692)
    uint32_t utf8_state            # validator state across fragments
    # A text frame still arriving: the validator state after the payload
    # bytes unmasked and validated so far, and how many those are (the
    # 4-byte fields together: 48 bytes, not 56, so that a Connection fits
    # pymalloc's 320-byte class).
    uint32_t checked_state
    size_t checked
    char *data
    size_t len
    size_t cap


cdef struct Outbox:
    # What this loop turn writes to the connection: slices of the arena.
    Slice *slices
    Py_ssize_t count
    size_t cap
    bint dirty                     # in the hub's dirty list
    bint finish_after_flush        # end our side (finish()) once written
    bint via_transport             # the transport still holds bytes of ours
    Py_ssize_t backlog             # bytes in the transport's buffer, last seen
    bint congested                 # over the high-water mark: its room's senders wait
    Py_ssize_t stall_mark          # backpressure: buffered bytes at the last progress check
    double stall_deadline          # backpressure: next progress check


cdef struct RateWindow:
    # Messages counted in the hub's current one-second window.
    unsigned long long epoch
    Py_ssize_t count


cdef struct FastRequest:
    # An upgrade request scan_upgrade (_upgrade.pxi) proved ordinary.
    size_t consumed                # bytes of the head, the blank line included
    size_t path_start              # the room: the target up to '?'
    size_t path_end
    size_t key_start               # Sec-WebSocket-Key's 24 characters
    size_t query_start             # the query string (after '?'); start == end: none
    size_t query_end
    size_t auth_start              # the Authorization value (trimmed); start == end: none
    size_t auth_end


cdef struct Registry:
    # Connections in a C array; each knows its index, so removal swaps the
    # last one in (O(1)). Every entry holds a reference.
    PyObject **items
    Py_ssize_t count
    size_t cap


# Final: methods are called directly (no vtable) and can be inlined by the
# C compiler; nothing subclasses it.
@cython.final
cdef class Room:
    cdef readonly str name
    cdef Registry members
    cdef Py_ssize_t deflate_members    # how many negotiated permessage-deflate
    cdef Py_ssize_t deflate_windows[16]  # of those, how many per server window (9..15 bits)
    cdef Py_ssize_t congested          # members over the high-water mark; > 0: reading paused
    # New room, backplane subscription not confirmed yet: its members' output
    # (their 101 first) is held, so that a client never hears "joined" before
    # messages from other processes can reach it.
    cdef readonly bint pending
    # This turn's messages from local senders for the other processes: the
    # body of one backplane packet (per message: opcode, 4-byte big-endian
    # length, payload; backplane.py adds the header), sealed at the flush.
    cdef char *outbound
    cdef size_t outbound_len
    cdef size_t outbound_cap
    cdef Py_ssize_t outbound_count
    cdef bint outbound_listed          # in the hub's outbound_rooms this turn

    cdef int pause_reading(self) except -1
    cdef int resume_reading(self) except -1

    cdef int add(self, Connection c) except -1
    cdef void remove(self, Connection c) noexcept


@cython.final
cdef class Hub:
    # Settings.
    cdef object loop
    cdef readonly object gate          # decides on upgrade requests (upgrade.Gate)
    # The common upgrade in C (scan_upgrade) when the gate allows it, with the
    # limits it checks; the rest goes to the gate.
    cdef public bint fast_upgrade
    cdef public bint fast_needs_grant  # access checks on: the gate grants each fast upgrade
    cdef public Py_ssize_t max_connections
    cdef public Py_ssize_t max_request_head
    cdef public Py_ssize_t max_headers
    cdef public bint compression
    cdef public object close_log       # None, or called with (conn, code, reason, by_peer)
    cdef public object backplane       # None, or shares rooms with other processes
    # This turn's sealed packet bodies for the backplane, (room, body,
    # messages), and the rooms still filling one.
    cdef list outgoing
    cdef Registry outbound_rooms
    cdef readonly bint echo
    cdef readonly Py_ssize_t max_message_size
    cdef readonly Py_ssize_t max_backlog
    cdef readonly bint drop_slow
    cdef readonly bint backpressure    # slow_client_policy "backpressure"
    # Queued bytes at which a member is closed: max_backlog, plus under
    # backpressure room for a few whole messages that one turn may bring
    # before the room's senders wait (a burst of big messages is not a slow
    # reader).
    cdef readonly Py_ssize_t hard_backlog
    cdef readonly double slow_client_timeout
    cdef readonly Py_ssize_t max_rate
    cdef readonly double handshake_timeout
    cdef readonly double close_timeout
    cdef readonly double ping_interval
    cdef readonly double ping_timeout

    # Every connection (for the sweep and the shutdown), and rooms by name.
    cdef Registry clients
    cdef public object all_gone        # None, or an Event set when no client is left
    cdef readonly dict rooms

    # Time as of the last sweep: nothing per message or per connection reads
    # a clock.
    cdef readonly double now
    cdef unsigned long long epoch      # rate-limit window number
    cdef double next_epoch
    cdef double next_ping
    cdef double reap_at

    # Output of this turn: the arena of encoded frames, and who has slices
    # of it (each dirty entry holds a reference until the flush).
    cdef char *arena
    cdef size_t arena_len
    cdef size_t arena_cap
    cdef Registry dirty
    cdef Registry paused_senders       # not read again until the flush
    # Long runs of the arena handed to transports this turn, one bytes object
    # per run shared by every member that needs it: (offset, length) -> bytes.
    cdef dict shared
    cdef object flush_callback

    # One read buffer shared by all connections.
    cdef char *shared_read
    cdef object shared_view

    # Counters, read at scrape time by counters().
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

    cdef int count_close(self, int code) except -1
    cdef size_t arena_reserve(self, size_t n) except? 0
    cdef size_t encode(self, uint8_t first, const char *payload, size_t n,
                       size_t *length) except? 0
    cdef size_t encode_compressed(self, uint8_t opcode, int window, const char *payload,
                                  size_t n, size_t *length) except? 0
    cdef int mark_dirty(self, Connection c) except -1
    cdef Py_ssize_t broadcast(self, Room room, Connection sender, uint8_t opcode,
                              const char *payload, size_t n) except -1
    cdef int expire(self, double now) except -1
    cdef int keepalive(self, double now) except -1
    cdef void resume_senders(self) noexcept
    cdef object shared_run(self, size_t offset, size_t length)
    cdef int queue_outbound(self, Room room, uint8_t opcode, const char *payload,
                            size_t n) except -1
    cdef int seal_outbound(self, Room room) except -1
    cdef void share_outgoing(self) noexcept
    cdef void shrink_arena(self) noexcept


@cython.final
cdef class Connection:
    # Place.
    cdef readonly Hub hub
    cdef readonly Room room
    cdef Py_ssize_t room_index
    cdef Py_ssize_t client_index
    cdef readonly object transport
    cdef int fd                        # the socket, or -1 once closed
    cdef bint direct                   # plain TCP: sendmsg on fd; else the transport (TLS)

    # Lifecycle.
    cdef readonly State state
    cdef readonly bint deflate         # permessage-deflate negotiated
    cdef readonly uint8_t deflate_window  # our LZ77 window for it, 9..15 bits (RFC 7692 7.1.2.1)
    cdef readonly bint read_only       # may join but not send (the gate said so)
    cdef readonly double expires_at    # closed with 1008 at this time; 0: never
    cdef readonly int close_code       # what was sent or received, for logs
    cdef readonly double deadline      # handshake or close deadline; 0: none
    cdef Py_ssize_t linger_budget      # bytes still discarded after our close; then a reset

    # Input, the message being reassembled, output, and the rate window.
    cdef Inbox inbox
    cdef Message message
    cdef Outbox out
    cdef RateWindow rate
    cdef object held                   # output held while its room is pending (a bytearray)

    cdef int handshake_step(self) except -1
    cdef int open(self, object accept) except -1
    cdef int open_fast(self, FastRequest *req, bint read_only, double expires_at) except -1
    cdef int grant_fast(self, FastRequest *req) except -1
    cdef int join(self, str room_name, Py_ssize_t consumed, const char *response,
                  size_t n) except -1
    cdef int send_upgrade(self, const char *response, size_t n) except -1
    cdef int respond_and_close(self, bytes response) except -1
    cdef size_t parse(self, char *data, size_t total) except? 0
    cdef int relay_compressed(self, const char *payload, size_t n) except -1
    cdef inline bint over_rate(self) noexcept
    cdef int keep_rest(self, char *data, size_t total, size_t used) except -1
    cdef int append_fragment(self, const uint8_t *payload, size_t n) except -1
    cdef bint check_partial_text(self, uint8_t opcode, bint rsv1, uint32_t mask,
                                 uint8_t *payload, size_t avail) noexcept
    cdef void release_fragments(self) noexcept
    cdef int on_close_frame(self, const uint8_t *payload, size_t n) except -1
    cdef int fail(self, int code, const char *reason) except -1
    cdef int start_close(self, int code, str reason) except -1
    cdef int closed(self, int code, str reason, bint by_peer) except -1
    cdef int leave_room(self) except -1
    cdef int send_control(self, uint8_t opcode, const char *payload, size_t n) except -1
    cdef int send_raw(self, const char *data, size_t n) except -1
    cdef inline int append_slice(self, size_t offset, size_t n) except -1
    cdef bint refresh_backlog(self) except -1
    cdef int write_pending(self) except -1
    cdef int hold_output(self) except -1
    cdef int release_output(self) except -1
    cdef int queue_rest(self, Py_ssize_t first, size_t skip) except -1
    cdef bytes copy_slices(self, Py_ssize_t start, Py_ssize_t end, size_t skip)
    cdef int drop_broken(self) except -1
    cdef int slow_client(self, bytes reason) except -1
    cdef int congestion_check(self, double now) except -1
    cdef int set_reading(self, bint paused) except -1
    cdef int finish(self) except -1
    cdef int close_transport(self) except -1
