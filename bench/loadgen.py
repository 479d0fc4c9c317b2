"""Raw-socket WebSocket load generator on uvloop.

Clients are plain non-blocking sockets: the upgrade request is one fixed
write, data frames are pre-built masked bytes, and received bytes go with
recv_into() straight into a per-client preallocated buffer that is checked
in bulk (wire.StreamVerifier) every VERIFY_AT bytes. Python work per
delivery is a few nanoseconds; the cost that remains is per read syscall.

Two ways of reading, for two purposes:
- "immediate": the socket is watched by the event loop (add_reader) and read
  as soon as bytes arrive. Senders use it (their echoes open their window),
  and so do the members whose latency is measured.
- "paced": pure receivers are watched by a private epoll set that a Pacer
  polls every few milliseconds, reading each ready socket once. A receiver
  that is read the moment each 66-byte frame arrives costs one syscall per
  delivery, as much CPU as the server spends writing it; read in rounds, it
  gets tens to thousands of frames per syscall, which keeps this single
  process well ahead of the server. The Pacer adapts the period (1-16 ms) to
  keep reads large but the pipeline short.

Flow control is two-level:
- a sender keeps at most `window` of its own messages un-echoed (it is a
  member of its room and sees its messages come back);
- a room never lets its slowest member fall more than `lag_limit` messages
  behind what was sent into the room. Without this, a load generator that
  fell behind would make servers buffer without bound (and trip their
  slow-client policies), measuring the client instead of the server.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import select
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Optional

from . import wire
from .connection import ClientConnection
from .frames import PONG, masked_frame
from .tls import TLSStream
from .upgrade import HandshakeError, upgrade_request
from .wire import BLOCK, CFRAME, FRAME, FrameFactory, RefStream, StreamVerifier

VERIFY_AT = 96 * 1024  # bytes buffered by a client before a bulk check
BUF_SIZE = 128 * 1024  # per-client receive buffer (fixed, never resized)
SMALL_BUF = 8 * 1024  # for idle clients that receive almost nothing
INF = 1 << 62
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # linux/in.h
PORTS_PER_SOURCE = 4000  # see source_addresses()


def source_addresses(clients: int) -> list[str]:
    """Loopback source addresses for `clients` connections to one server
    port: 127.0.0.1 alone up to PORTS_PER_SOURCE, then .2, .3, ...

    One address could hold the whole ephemeral range (~28,000), but connect()
    searches that range for a free port, and the search grows as it fills:
    with 19,000 clients on one address the load generator spent its core in
    the kernel and measured 3.1 k handshakes/s; spread over 5 addresses,
    20 k/s (python bench/run.py --servers fastrelay --workloads connections
    --connections 5000,19000 --reps 2, before and after)."""
    n = max(1, -(-clients // PORTS_PER_SOURCE))
    if n > 254:
        raise ValueError("%d clients need more than 254 loopback source addresses" % clients)
    return ["127.0.0.%d" % (i + 1) for i in range(n)]


class Room:
    """Members of one room on the client side, and their flow control."""

    def __init__(self, path: str, lag_limit: int) -> None:
        self.path = path
        self.lag_limit = lag_limit
        self.members: list[Member] = []
        self.senders: list[Sender] = []
        self.sent_total = 0  # messages sent into the room by all senders
        self.floor = 0  # frames every member is known to have had
        self.waiting = False  # senders paused for laggards
        self.wait_target = 0
        self.pending = 0
        self.draining = False
        self.drained: Optional[asyncio.Future] = None
        self.lag_waits = 0
        self.ref: Optional[RefStream] = None

    def shared_stream(self, senders: list[int], stamped: bool) -> RefStream:
        if self.ref is None:
            self.ref = RefStream(senders, stamped)
        return self.ref

    def add(self, member: "Member") -> None:
        if isinstance(member, Sender):
            if any(s.sid % 10 == member.sid % 10 for s in self.senders):
                raise ValueError("senders of a room need distinct last digits (echo counting)")
            self.senders.append(member)
        self.members.append(member)

    def budget(self) -> int:
        return self.lag_limit - (self.sent_total - self.floor)

    def refresh_floor(self) -> None:
        self.floor = min(m.nbytes for m in self.members) // FRAME

    def wait_for_laggards(self) -> None:
        # Event driven: mark the members below half the lag limit; the last
        # of them to catch up resumes the senders (see reached()).
        target = self.sent_total - self.lag_limit // 2
        target_bytes = target * FRAME
        pending = 0
        for m in self.members:
            if m.nbytes < target_bytes and not m.lost:
                m.watch = target_bytes
                pending += 1
        if pending == 0:
            self.floor = target
            return
        self.lag_waits += 1
        self.waiting = True
        self.wait_target = target
        self.pending = pending

    def reached(self, member: "Member") -> None:
        member.watch = INF
        self.pending -= 1
        if self.pending > 0:
            return
        if self.draining:
            if self.drained is not None and not self.drained.done():
                self.drained.set_result(None)
            return
        self.waiting = False
        self.floor = self.wait_target
        for s in self.senders:
            if s.running:
                s.refill()

    def start_drain(self) -> asyncio.Future:
        """Resolve when every member has the bytes of every message sent."""
        self.draining = True
        self.waiting = False
        self.drained = asyncio.get_running_loop().create_future()
        target = self.sent_total * FRAME
        pending = 0
        for m in self.members:
            if m.nbytes < target and not m.lost:
                m.watch = target
                pending += 1
            else:
                m.watch = INF
        self.pending = pending
        if pending == 0:
            self.drained.set_result(None)
        return self.drained


class Pacer:
    """Reads a set of sockets in rounds from a private epoll set."""

    def __init__(self, tmax: float = 0.016) -> None:
        self.loop = asyncio.get_running_loop()
        self.ep = select.epoll()
        self.by_fd: dict[int, Member] = {}
        self.tmax = tmax
        self.period = 0.001
        self.handle = None
        self.reads = 0
        self.read_bytes = 0

    def register(self, m: "Member") -> None:
        self.ep.register(m.fd, select.EPOLLIN)
        self.by_fd[m.fd] = m
        if self.handle is None:
            self._schedule()

    def unregister(self, m: "Member") -> None:
        if self.by_fd.pop(m.fd, None) is not None:
            try:
                self.ep.unregister(m.fd)
            except (OSError, ValueError):
                pass

    def _schedule(self) -> None:
        if self.period:
            self.handle = self.loop.call_later(self.period, self.tick)
        else:
            self.handle = self.loop.call_soon(self.tick)

    def tick(self) -> None:
        by_fd = self.by_fd
        reads = got = 0
        for fd, _ in self.ep.poll(0, len(by_fd) or 1):
            m = by_fd.get(fd)
            if m is not None:
                got += m.on_readable()
                reads += 1
        self.reads += reads
        self.read_bytes += got
        # Aim for reads of a few KiB or more: wait longer between rounds
        # when reads are small, and not at all when they are large (then
        # the sockets' buffers, not this loop, must never be what stalls).
        avg = got / reads if reads else 0
        if avg < 4096:
            self.period = min(max(self.period * 1.5, 0.0005), self.tmax)
        elif avg > 32768:
            self.period = self.period / 2 if self.period > 0.0005 else 0.0
        if by_fd:
            self._schedule()
        else:
            self.handle = None

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.ep.close()


class Member(ClientConnection):
    """A client in a room that receives and verifies every message."""

    def __init__(
        self,
        room: Room,
        senders: list[int],
        latency: bool = False,
        buf_size: int = BUF_SIZE,
        stamped: Optional[bool] = None,
    ) -> None:
        super().__init__()
        self.room = room
        self.pacer: Optional[Pacer] = None
        self.reading = False
        self.buf_size = buf_size
        self.buf: Optional[bytearray] = None  # allocated on first data
        self.view: Optional[memoryview] = None
        self.w = 0  # bytes in buf
        self.nbytes = 0  # bytes received after the handshake
        self.base = 0  # stream offset of buf[0]
        self.watch = INF  # nbytes threshold that calls room.reached()
        stamped = latency if stamped is None else stamped
        self.verifier = StreamVerifier(
            senders,
            latency,
            ref=None if latency else room.shared_stream(senders, stamped),
            stamped=stamped,
        )
        self.marks: Optional[list] = [] if latency else None
        self.pings = 0
        room.add(self)

    # -- connection ------------------------------------------------------
    def start_reading(self, pacer: Optional[Pacer]) -> None:
        if self.lost or self.reading:
            return
        self.reading = True
        self.pacer = pacer
        if pacer is not None:
            pacer.register(self)
        else:
            asyncio.get_running_loop().add_reader(self.fd, self.on_readable)

    def _stop_reading(self) -> None:
        if not self.reading:
            return
        self.reading = False
        if self.pacer is not None:
            self.pacer.unregister(self)
        else:
            asyncio.get_running_loop().remove_reader(self.fd)

    def _ensure_buf(self) -> None:
        self.buf = bytearray(self.buf_size)
        self.view = memoryview(self.buf)

    def _ingest(self, data: bytes) -> None:
        """Bytes that arrived without recv_into (the handshake's tail)."""
        if self.buf is None:
            self._ensure_buf()
        if self.w + len(data) > self.buf_size:
            self.flush()
        self.buf[self.w : self.w + len(data)] = data
        self.w += len(data)
        self._received(len(data))

    # -- receiving -------------------------------------------------------
    def on_readable(self) -> int:
        """Read once (or until the buffer is drained); return bytes read."""
        if self.buf is None:
            self._ensure_buf()
        total = 0
        while True:
            free = self.buf_size - self.w
            if free < 8192:
                self.flush()
                free = self.buf_size - self.w
                if free < 8192:  # verification stopped consuming (error)
                    self.w = 0
                    free = self.buf_size
            try:
                n = self.sock.recv_into(self.view[self.w :], free)
            except BlockingIOError:
                return total
            except OSError as exc:
                self._lost(exc)
                return total
            if n == 0:
                self._lost(None)
                return total
            self.w += n
            total += n
            self._received(n)
            if n < free:
                break
        if self.w >= VERIFY_AT:
            self.flush()
        return total

    def _received(self, n: int) -> None:
        self.nbytes += n
        if self.marks is not None:
            self.marks.append((self.nbytes, time.monotonic_ns()))
        if self.nbytes >= self.watch:
            self.room.reached(self)

    def _lost(self, exc: Optional[BaseException]) -> None:
        self._stop_reading()
        self.lost = True
        if not self.closing and self.error is None:
            self.error = "server closed the connection%s" % (": %s" % exc if exc else "")
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)
        # A lost member must not hold its room's senders or drain forever.
        if self.watch != INF:
            self.room.reached(self)

    def flush(self) -> None:
        """Verify the complete frames in the buffer and drop them."""
        v = self.verifier
        if self.closing or self.buf is None:
            return
        while self.w and v.error is None:
            slots = self.w // FRAME
            ok = v.check(self.buf, slots, self.base, self.marks) if slots else 0
            if ok:
                self._consume(ok * FRAME)
            if v.error is not None or (ok == slots and (not self.w or self.buf[0] == 0x81)):
                break
            if not self._control_frame():
                break
        if v.error is not None and self.error is None:
            self.error = v.error

    def _consume(self, nbytes: int) -> None:
        rest = self.w - nbytes
        if rest:
            self.buf[:rest] = self.buf[nbytes : self.w]
        self.w = rest
        self.base += nbytes
        marks = self.marks
        if marks:
            # Keep the read marks that still cover bytes in the buffer.
            i = 0
            base = self.base
            while i < len(marks) - 1 and marks[i][0] <= base:
                i += 1
            if i:
                del marks[:i]

    def _control_frame(self) -> bool:
        """Handle a non-data frame at the front of the buffer (slow path).

        Servers may send keepalive pings; a close frame or anything else is
        an error. Returns False if more bytes are needed or on error."""
        buf, w = self.buf, self.w
        if w < 2:
            return False
        op, ln = buf[0], buf[1]
        if ln & 0x80 or ln > 125 or op not in (0x88, 0x89, 0x8A):
            self.verifier._fail("unexpected frame header %r" % bytes(buf[: min(w, 8)]))
            return False
        if w < 2 + ln:
            return False
        body = bytes(buf[2 : 2 + ln])
        self._consume(2 + ln)
        if op == 0x89:  # ping -> masked pong with the same payload
            self.pings += 1
            self.write(masked_frame(PONG, body, self.key))
            return True
        if op == 0x8A:
            return True
        code = int.from_bytes(body[:2], "big") if len(body) >= 2 else None
        self.verifier._fail("server sent close frame (code %s, %r)" % (code, body[2:]))
        return False

    def finish(self) -> None:
        """Final check once no more data is expected."""
        self.flush()
        if self.error is None and self.w and self.verifier.error is None:
            self.error = "%d trailing bytes that are not a complete frame" % self.w

    def received(self) -> int:
        return self.verifier.received()

    # -- sending and closing ----------------------------------------------
    def _send_failed(self, exc: OSError) -> None:
        self._lost(exc)

    def close(self) -> None:
        if self.sock is not None and not self.lost:
            # Verify what is buffered while it still counts (flush() stops
            # once closing), and read the server's answer even when paced
            # reads had stopped.
            self.flush()
            if not self.reading:
                self.start_reading(None)
        super().close()

    def dispose(self) -> None:
        super().dispose()
        self.view = None


class Sender(Member):
    """A member that also sends; window-bounded by its own echoes."""

    def __init__(
        self,
        room: Room,
        senders: list[int],
        sid: int,
        window: int,
        latency: bool = False,
        buf_size: int = BUF_SIZE,
    ) -> None:
        self.sid = sid  # before Member.__init__, which joins the room
        super().__init__(room, senders, latency, buf_size)
        self.marker = wire.sender_marker(sid)
        self.scan = 0
        self.echoed = 0
        self.sent = 0
        self.window = window
        self.refill_min = max(1, window // 4)
        self.running = False
        self.limit = INF  # stop sending at this many messages
        self.at_limit: Optional[asyncio.Future] = None
        self.factory: Optional[FrameFactory] = None
        self.block = memoryview(b"")
        self.block_seq0 = -BLOCK
        # Echo counting reads one byte per frame: the last digit of the
        # sender id, unique within a room (Room.add() checks).
        self.last_digit = ord(str(sid % 10))
        self.aligned = True

    def _received(self, n: int) -> None:
        buf, scan, w = self.buf, self.scan, self.w
        if self.aligned:
            # Frames are 66 bytes back to back: look at every 66th byte
            # (header, then id digit) instead of searching all bytes.
            end = scan + (w - scan) // FRAME * FRAME
            if end > scan:
                cnt = (end - scan) // FRAME
                if (
                    buf[scan:end:FRAME].count(0x81) == cnt
                    and buf[scan + 1 : end : FRAME].count(0x40) == cnt
                ):
                    self.echoed += buf[scan + 7 : end : FRAME].count(self.last_digit)
                    self.scan = end
                else:
                    # A control frame broke the 66-byte grid: search for
                    # the marker (which only ever starts a frame) until the
                    # next flush() puts the buffer back on the grid.
                    self.aligned = False
        if not self.aligned:
            self.echoed += buf.count(self.marker, self.scan, w)
            self.scan = max(self.scan, w - (len(self.marker) - 1))
        super()._received(n)
        if self.running:
            self.refill()

    def _consume(self, nbytes: int) -> None:
        super()._consume(nbytes)
        self.scan = max(0, self.scan - nbytes)

    def flush(self) -> None:
        super().flush()
        if (
            not self.aligned
            and self.w < FRAME
            and (not self.w or self.buf[0] == 0x81)
            and self.verifier.error is None
        ):
            # Back on the grid with no complete frame left unverified: the
            # verified stream says exactly how many of our messages came back.
            # (Exact unless the server lost some of them, and then the
            # run fails verification anyway.)
            v = self.verifier
            if v.on_ref:
                self.echoed = v.ref.next_seq_at(v.frames * FRAME)[self.sid]
            else:
                self.echoed = v.next_seq[self.sid]
            self.scan = 0
            self.aligned = True

    def refill(self) -> None:
        k = min(self.window - (self.sent - self.echoed), self.limit - self.sent)
        if k < self.refill_min and self.sent + k < self.limit:
            return
        if k <= 0:
            return
        room = self.room
        budget = room.lag_limit - (room.sent_total - room.floor)
        if budget < k:
            if room.waiting:
                return
            room.refresh_floor()
            budget = room.budget()
            if budget < self.refill_min:
                room.wait_for_laggards()
                return
            k = min(k, budget)
        self.send(k)

    def send(self, k: int) -> None:
        parts = []
        seq, left = self.sent, k
        while left:
            if not self.block_seq0 <= seq < self.block_seq0 + BLOCK:
                if self.factory is None:
                    self.factory = FrameFactory(self.sid, self.key)
                self.block = memoryview(self.factory.block(seq // BLOCK))
                self.block_seq0 = seq - seq % BLOCK
            off = seq - self.block_seq0
            take = min(left, BLOCK - off)
            parts.append(self.block[off * CFRAME : (off + take) * CFRAME])
            seq += take
            left -= take
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.write(data)
        self.sent += k
        self.room.sent_total += k
        if self.sent >= self.limit:
            self.running = False
            if self.at_limit is not None and not self.at_limit.done():
                self.at_limit.set_result(None)

    def stop_after(self, more: int) -> asyncio.Future:
        """Send `more` messages (window permitting), then stop."""
        self.limit = self.sent + more
        self.at_limit = asyncio.get_running_loop().create_future()
        if more <= 0:
            self.running = False
            self.at_limit.set_result(None)
        return self.at_limit

    def send_stamped(self, k: int) -> None:
        """Send k messages carrying the current time (latency workload)."""
        ts = time.monotonic_ns()
        sid, key, seq = self.sid, self.key, self.sent
        self.write(b"".join(wire.client_frame(sid, seq + i, key, ts) for i in range(k)))
        self.sent += k
        self.room.sent_total += k


class SpotCheck:
    """One `websockets` client in a room: an independent, RFC-checking
    implementation confirming what the raw clients see (messages are text,
    intact, in order per sender, none missing up to each sender's last).

    It may join while messages flow: per sender it then checks a contiguous
    run of sequence numbers from the first it sees; finish() checks that the
    run reaches the sender's last message and started no later than what
    the sender had sent when the spot check's handshake completed. Its
    parser is pure Python, so in the throughput workloads it joins only for
    a tail of messages after the measured window, where it costs nothing.
    """

    def __init__(self, url: str, senders: list[int], tls: Optional[ssl.SSLContext] = None) -> None:
        self.url = url
        self.tls = tls
        self.senders = list(senders)
        self.first: dict[int, int] = {}
        self.next_seq: dict[int, int] = {}
        self.count = 0
        self.final: dict[int, int] = {}  # sender -> messages it sent in all
        self.joined: dict[int, int] = {}
        self.complete = 0  # senders whose last message arrived
        self.error: Optional[str] = None
        self.ws = None
        self.task: Optional[asyncio.Task] = None
        self.done: Optional[asyncio.Future] = None

    async def connect(self) -> None:
        from websockets.asyncio.client import connect

        # max_queue=None: the client buffers instead of pausing reads, so a
        # slow spot check never pushes back on the server under test.
        self.ws = await connect(
            self.url,
            ssl=self.tls,
            compression=None,
            max_queue=None,
            ping_interval=None,
            open_timeout=30,
            max_size=1 << 20,
        )
        self.done = asyncio.get_running_loop().create_future()
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if not isinstance(msg, str) or len(msg) != wire.PAYLOAD:
                    self._fail("unexpected message %r" % (msg[:24],))
                    return
                sid = int(msg[: wire.SID_W])
                seq = int(msg[wire.SEQ_OFF : wire.SEQ_OFF + wire.SEQ_W])
                if sid not in self.senders:
                    self._fail("message from sender %d, not in this room" % sid)
                    return
                exp = self.next_seq.get(sid)
                if exp is None:
                    self.first[sid] = seq
                elif exp != seq:
                    self._fail("sender %s: expected seq %s, got %d" % (sid, exp, seq))
                    return
                self.next_seq[sid] = seq + 1
                self.count += 1
                if seq + 1 == self.final.get(sid):
                    self.complete += 1
                    if self.complete == len(self.final) and not self.done.done():
                        self.done.set_result(None)
        except Exception as exc:  # noqa: BLE001 - report any failure as a finding
            self._fail("websockets client: %r" % exc)

    def _fail(self, msg: str) -> None:
        if self.error is None:
            self.error = msg
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def expect(self, joined: dict[int, int], final: dict[int, int]) -> asyncio.Future:
        """Resolve once each sender's last message has arrived: `joined`
        and `final` are each sender's sent count at join and at the end."""
        self.joined = dict(joined)
        # Senders that sent nothing after the join are complete already.
        self.final = {s: n for s, n in final.items() if n > self.joined[s]}
        self.complete = sum(1 for s, n in self.final.items() if self.next_seq.get(s) == n)
        if self.complete == len(self.final) and not self.done.done():
            self.done.set_result(None)
        return self.done

    def finish(self) -> None:
        if self.error is not None:
            return
        for s, last in self.final.items():
            if s not in self.first:
                self._fail("sender %d: none of its messages after the join arrived" % s)
            elif self.first[s] > self.joined[s]:
                self._fail(
                    "sender %d: messages %d..%d missing after the join"
                    % (s, self.joined[s], self.first[s] - 1)
                )
            elif self.next_seq[s] != last:
                self._fail("sender %d: got up to %d of %d" % (s, self.next_seq[s], last))

    async def close(self) -> None:
        if self.ws is not None:
            try:
                await asyncio.wait_for(self.ws.close(), 5)
            except Exception:  # noqa: BLE001 - best effort teardown
                pass
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except BaseException:  # noqa: BLE001
                pass


class Connector:
    """Opens many connections with at most `concurrency` handshakes in
    flight (a burst of thousands of SYNs would overflow the accept backlog
    and measure TCP retransmission timers instead of the server).

    Sockets in progress sit in a private epoll set whose own fd the event
    loop watches, so each step (connected, response readable) is one poll
    result and a few syscalls: no task, future or reader registration per
    connection, which would cost the load generator more than the server.

    `sources`: local addresses the clients connect from, in turn (bound
    with IP_BIND_ADDRESS_NO_PORT, so the port is picked at connect time per
    4-tuple). One source address to one server port gives at most the
    ephemeral range (about 28,000 on Linux) of connections; 127.0.0.0/8 is
    all loopback, so 127.0.0.2, .3, ... each add as many again.
    """

    def __init__(
        self,
        host: str,
        port: int,
        concurrency: int,
        sources: Sequence[str] = (),
        tls: Optional[ssl.SSLContext] = None,
    ) -> None:
        self.tls = tls  # wss: each client does a TLS handshake before the upgrade
        self.addr = (host, port)
        self.host, self.port = host, port
        self.concurrency = concurrency
        self.sources = list(sources)
        self.loop = asyncio.get_running_loop()
        self.ep = select.epoll()
        self.inflight: dict[int, list] = {}  # fd -> [member, sock, request, accept, head]
        self.members: Sequence[Member] = []
        self.next = 0
        self.done = 0
        self.result: Optional[asyncio.Future] = None
        self.progress: Optional[Callable[[int], None]] = None

    async def run(
        self, members: Sequence[Member], progress: Optional[Callable[[int], None]] = None
    ) -> tuple[float, float]:
        self.members, self.next, self.done = members, 0, 0
        self.progress = progress
        self.result = self.loop.create_future()
        t0 = time.perf_counter()
        if not members:
            return t0, t0
        self.loop.add_reader(self.ep.fileno(), self._on_events)
        # Each client leaves a socket and a few containers behind, all kept
        # to the end: the cyclic collector would rescan them again and again
        # (a tenth of this loop's CPU) and find nothing to free.
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            for _ in range(min(self.concurrency, len(members))):
                self._start_one()
            await self.result
        finally:
            if gc_was_on:
                gc.enable()
            self.loop.remove_reader(self.ep.fileno())
            for fd, st in list(self.inflight.items()):
                self.ep.unregister(fd)
                st[1].close()
            self.inflight.clear()
        return t0, time.perf_counter()

    def close(self) -> None:
        self.ep.close()

    def _fail(self, exc: BaseException) -> None:
        if not self.result.done():
            self.result.set_exception(exc)

    def _start_one(self) -> None:
        if self.next >= len(self.members):
            return
        m = self.members[self.next]
        self.next += 1
        request, accept = upgrade_request(self.host, self.port, m.room.path)
        try:
            # EMFILE here (the open-files limit) must end the run at once, not
            # leave it waiting for handshakes that were never started.
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:
            self._fail(OSError(exc.errno, "client %d: socket(): %s" % (self.next, exc.strerror)))
            return
        sock.setblocking(False)
        # Senders write a few frames at a time; Nagle would hold them back.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.sources:
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.sources[self.next % len(self.sources)], 0))
        err = sock.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._fail(OSError(err, "connect: %s" % os.strerror(err)))
            return
        fd = sock.fileno()
        if self.tls is None:
            # Over loopback the TCP handshake is done by the time connect()
            # returns: send the upgrade request now and wait only for the
            # answer (one poll round and three syscalls fewer per client).
            try:
                sent = sock.send(request)
            except (BlockingIOError, InterruptedError):
                pass  # not connected yet: wait for writable as below
            except OSError as exc:
                sock.close()
                self._fail(OSError(exc.errno, "connect: %s" % exc.strerror))
                return
            else:
                if sent != len(request):
                    sock.close()
                    self._fail(HandshakeError("upgrade request not sent at once"))
                    return
                self.inflight[fd] = [m, sock, None, accept, b""]
                self.ep.register(fd, select.EPOLLIN)
                return
        self.inflight[fd] = [m, sock, request, accept, b""]
        self.ep.register(fd, select.EPOLLOUT)

    def _on_events(self) -> None:
        for fd, _events in self.ep.poll(0):
            st = self.inflight.get(fd)
            if st is None:
                continue
            m, sock, request, accept, head = st
            try:
                if request is not None:  # connecting: TCP, then TLS if asked
                    if not isinstance(sock, TLSStream):
                        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            raise OSError(err, "connect: %s" % os.strerror(err))
                        if self.tls is not None:
                            sock = st[1] = TLSStream.wrap(self.tls, sock, self.host)
                    if isinstance(sock, TLSStream):
                        want = sock.handshake_step()
                        if want:
                            self.ep.modify(fd, want)
                            continue
                    if sock.send(request) != len(request):
                        raise HandshakeError("upgrade request not sent at once")
                    st[2] = None
                    self.ep.modify(fd, select.EPOLLIN)
                    continue
                data = sock.recv(65536)
                if not data:
                    raise HandshakeError("connection closed during handshake")
                head += data
                if head.find(b"\r\n\r\n") < 0:
                    if len(head) > 65536:
                        raise HandshakeError("response head too long")
                    st[4] = head
                    continue
                self.ep.unregister(fd)
                del self.inflight[fd]
                m.handshake_done(sock, head, accept)
            except BlockingIOError:
                continue
            except (OSError, HandshakeError) as exc:
                self._fail(exc)
                return
            self.done += 1
            if self.progress is not None and self.done % 1000 == 0:
                self.progress(self.done)
            if self.done == len(self.members):
                if not self.result.done():
                    self.result.set_result(None)
                return
            self._start_one()


async def connect_members(
    host: str,
    port: int,
    members: Sequence[Member],
    concurrency: int,
    timeout: float,
    progress: Optional[Callable[[int], None]] = None,
    sources: Sequence[str] = (),
    tls: Optional[ssl.SSLContext] = None,
) -> tuple[float, float]:
    """Open every member's connection; returns (start, end) times."""
    conn = Connector(host, port, concurrency, sources, tls)
    try:
        return await asyncio.wait_for(conn.run(members, progress), timeout)
    finally:
        conn.close()


async def close_members(members: Sequence[ClientConnection], timeout: float = 5.0) -> None:
    """Closing handshake from the client side (the server answers and closes
    the TCP connection), then close whatever is left."""
    try:
        for m in members:
            m.close()
        pending = [m.closed for m in members if m.closed is not None and not m.closed.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
    finally:
        for m in members:
            m.dispose()
