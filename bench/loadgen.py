"""Raw-socket WebSocket load generator on uvloop Protocols.

Clients send one fixed-format HTTP upgrade request, then pre-built masked
frames; receivers only append bytes to a buffer and count them, and check
what they got in bulk (wire.StreamVerifier) every VERIFY_AT bytes. That
keeps the Python work per delivery small enough that one core can absorb
millions of deliveries per second, so the server under test is the limit.

Flow control is two-level:
- a sender keeps at most `window` of its own messages un-echoed (it is a
  member of its room and sees its messages come back);
- a room never lets its slowest member fall more than `lag_limit` messages
  behind what was sent into the room. Without this, a load generator that
  cannot keep up would make servers buffer without bound (and trip their
  slow-client policies), measuring the client instead of the server.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from typing import Callable, Optional

from . import wire
from .wire import CFRAME, FRAME, FrameFactory, StreamVerifier

VERIFY_AT = 128 * 1024   # bytes buffered by a receiver before a bulk check
INF = 1 << 62
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class HandshakeError(Exception):
    pass


def upgrade_request(host: str, port: int, path: str) -> tuple[bytes, bytes]:
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    req = (b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
           b"Sec-WebSocket-Version: 13\r\n\r\n"
           % (path.encode(), host.encode(), port, key))
    return req, accept


class Room:
    """Members of one room on the client side, and their flow control."""

    def __init__(self, path: str, lag_limit: int) -> None:
        self.path = path
        self.lag_limit = lag_limit
        self.members: list[Member] = []
        self.senders: list[Sender] = []
        self.sent_total = 0     # messages sent into the room by all senders
        self.floor = 0          # frames every member is known to have had
        self.waiting = False    # senders paused for laggards
        self.wait_target = 0
        self.pending = 0
        self.draining = False
        self.drained: Optional[asyncio.Future] = None
        self.lag_waits = 0

    def add(self, member: "Member") -> None:
        self.members.append(member)
        if isinstance(member, Sender):
            self.senders.append(member)

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
            if m.nbytes < target_bytes:
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


class Member(asyncio.Protocol):
    """A client in a room that receives and verifies every message."""

    def __init__(self, room: Room, host: str, port: int, senders: list[int],
                 latency: bool = False) -> None:
        self.room = room
        self.request, self.accept = upgrade_request(host, port, room.path)
        self.transport: Optional[asyncio.Transport] = None
        self.open = False
        self.closing = False
        self.lost = False
        self.error: Optional[str] = None
        self.hs = bytearray()
        self.buf = bytearray()
        self.nbytes = 0         # bytes received after the handshake
        self.base = 0           # stream offset of buf[0]
        self.watch = INF        # nbytes threshold that calls room.reached()
        self.verifier = StreamVerifier(senders, latency)
        self.marks: Optional[list] = [] if latency else None
        self.mask = wire.new_mask()
        self.pings = 0
        loop = asyncio.get_running_loop()
        self.ready = loop.create_future()
        self.closed = loop.create_future()
        room.add(self)

    # -- connection ------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc) -> None:
        self.lost = True
        if not self.ready.done():
            self.ready.set_exception(HandshakeError(
                "connection closed during handshake%s" % (": %s" % exc if exc else "")))
        if not self.closing and self.error is None:
            self.error = "server closed the connection%s" % (": %s" % exc if exc else "")
        if not self.closed.done():
            self.closed.set_result(None)
        # A lost member must not hold its room's senders or drain forever.
        if self.watch != INF:
            self.room.reached(self)

    def _handshake(self, data: bytes) -> None:
        hs = self.hs
        hs += data
        end = hs.find(b"\r\n\r\n")
        if end < 0:
            if len(hs) > 65536:
                self._handshake_failed("response head too long")
            return
        head = bytes(hs[:end]).decode("latin-1")
        rest = bytes(hs[end + 4:])
        self.hs = bytearray()
        lines = head.split("\r\n")
        if not lines[0].startswith("HTTP/1.1 101"):
            self._handshake_failed("server answered %r" % lines[0])
            return
        accept = None
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "sec-websocket-accept":
                accept = value.strip().encode()
        if accept != self.accept:
            self._handshake_failed("bad Sec-WebSocket-Accept %r" % accept)
            return
        self.open = True
        self.ready.set_result(None)
        if rest:  # frames may follow the 101 response in the same read
            self.data_received(rest)

    def _handshake_failed(self, why: str) -> None:
        self.error = why
        if not self.ready.done():
            self.ready.set_exception(HandshakeError(why))
        self.transport.abort()

    # -- receiving -------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if not self.open:
            self._handshake(data)
            return
        buf = self.buf
        buf += data
        n = self.nbytes + len(data)
        self.nbytes = n
        if self.marks is not None:
            self.marks.append((n, time.monotonic_ns()))
        if n >= self.watch:
            self.room.reached(self)
        if len(buf) >= VERIFY_AT:
            self.flush()

    def flush(self) -> None:
        """Verify the complete frames in the buffer and drop them."""
        buf = self.buf
        v = self.verifier
        while buf and v.error is None:
            slots = len(buf) // FRAME
            ok = v.check(buf, slots, self.base, self.marks) if slots else 0
            if ok:
                self._consume(ok * FRAME)
            if v.error is not None or (ok == slots and (not buf or buf[0] == 0x81)):
                break
            if not self._control_frame():
                break
        if v.error is not None and self.error is None:
            self.error = v.error

    def _consume(self, nbytes: int) -> None:
        del self.buf[:nbytes]
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
        buf = self.buf
        if len(buf) < 2:
            return False
        op, ln = buf[0], buf[1]
        if ln & 0x80 or ln > 125 or op not in (0x88, 0x89, 0x8A):
            self.verifier._fail("unexpected frame header %r" % bytes(buf[:8]))
            return False
        if len(buf) < 2 + ln:
            return False
        body = bytes(buf[2:2 + ln])
        self._consume(2 + ln)
        if op == 0x89:  # ping -> masked pong with the same payload
            self.pings += 1
            self.transport.write(b"\x8a" + bytes([0x80 | ln]) + self.mask
                                 + wire.mask_bytes(body, self.mask))
            return True
        if op == 0x8A:
            return True
        code = int.from_bytes(body[:2], "big") if len(body) >= 2 else None
        self.verifier._fail("server sent close frame (code %s, %r)" % (code, body[2:]))
        return False

    def finish(self) -> None:
        """Final check once no more data is expected."""
        self.flush()
        if self.error is None and self.buf and self.verifier.error is None:
            self.error = "%d trailing bytes that are not a complete frame" % len(self.buf)

    def received(self) -> int:
        return self.verifier.received()

    def close(self) -> None:
        if self.transport is None or self.lost:
            if not self.closed.done():
                self.closed.set_result(None)
            return
        self.closing = True
        self.transport.write(wire.close_frame(self.mask))


class Sender(Member):
    """A member that also sends; window-bounded by its own echoes."""

    def __init__(self, room: Room, host: str, port: int, senders: list[int], sid: int,
                 window: int, latency: bool = False) -> None:
        super().__init__(room, host, port, senders, latency)
        self.sid = sid
        self.marker = wire.sender_marker(sid)
        self.scan = 0
        self.echoed = 0
        self.sent = 0
        self.window = window
        self.refill_min = max(1, window // 4)
        self.running = False
        self.factory = FrameFactory(sid, self.mask)
        self.block_n = min(max(8 * window, 256), 8192)
        self.block = memoryview(b"")
        self.block_seq0 = 0

    def data_received(self, data: bytes) -> None:
        if not self.open:
            self._handshake(data)
            return
        buf = self.buf
        buf += data
        n = self.nbytes + len(data)
        self.nbytes = n
        if self.marks is not None:
            self.marks.append((n, time.monotonic_ns()))
        # Count own echoes among complete markers; a marker can only start
        # a frame (0x81 is not ASCII), so frame alignment does not matter.
        self.echoed += buf.count(self.marker, self.scan)
        self.scan = max(self.scan, len(buf) - (len(self.marker) - 1))
        if n >= self.watch:
            self.room.reached(self)
        if self.running:
            self.refill()
        if len(buf) >= VERIFY_AT:
            self.flush()

    def _consume(self, nbytes: int) -> None:
        super()._consume(nbytes)
        self.scan = max(0, self.scan - nbytes)

    def refill(self) -> None:
        k = self.window - (self.sent - self.echoed)
        if k < self.refill_min:
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
        off = (self.sent - self.block_seq0) * CFRAME
        end = off + k * CFRAME
        if end <= len(self.block):
            data = self.block[off:end]
        else:
            head = bytes(self.block[off:])
            seq0 = self.sent + len(head) // CFRAME
            self.block = memoryview(self.factory.block(seq0, self.block_n))
            self.block_seq0 = seq0
            rest = k - len(head) // CFRAME
            data = head + bytes(self.block[:rest * CFRAME])
        self.transport.write(data)
        self.sent += k
        self.room.sent_total += k

    def send_stamped(self, k: int) -> None:
        """Send k messages carrying the current time (latency workload)."""
        ts = time.monotonic_ns()
        sid, key, seq = self.sid, self.mask, self.sent
        data = b"".join(wire.client_frame(sid, seq + i, key, ts) for i in range(k))
        self.transport.write(data)
        self.sent += k
        self.room.sent_total += k


class SpotCheck:
    """One `websockets` client in a room: an independent, RFC-checking
    implementation confirming what the raw clients see (messages are text,
    intact, complete and in order per sender)."""

    def __init__(self, url: str, senders: list[int]) -> None:
        self.url = url
        self.next_seq = {s: 0 for s in senders}
        self.count = 0
        self.target = INF
        self.error: Optional[str] = None
        self.ws = None
        self.task: Optional[asyncio.Task] = None
        self.done: Optional[asyncio.Future] = None

    async def connect(self) -> None:
        from websockets.asyncio.client import connect
        # max_queue=None: the client buffers instead of pausing reads, so a
        # slow spot check never pushes back on the server under test.
        self.ws = await connect(self.url, compression=None, max_queue=None,
                                ping_interval=None, open_timeout=30)
        self.done = asyncio.get_running_loop().create_future()
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if not isinstance(msg, str) or len(msg) != wire.PAYLOAD:
                    self._fail("unexpected message %r" % (msg[:24],))
                    return
                sid = int(msg[:wire.SID_W])
                seq = int(msg[wire.SEQ_OFF:wire.SEQ_OFF + wire.SEQ_W])
                exp = self.next_seq.get(sid)
                if exp != seq:
                    self._fail("sender %s: expected seq %s, got %d" % (sid, exp, seq))
                    return
                self.next_seq[sid] = seq + 1
                self.count += 1
                if self.count >= self.target and not self.done.done():
                    self.done.set_result(None)
        except Exception as exc:  # noqa: BLE001 - report any failure as a finding
            if self.target != INF or self.error is None:
                self._fail("websockets client: %r" % exc)

    def _fail(self, msg: str) -> None:
        if self.error is None:
            self.error = msg
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def expect(self, total: int) -> asyncio.Future:
        self.target = total
        if self.count >= total and not self.done.done():
            self.done.set_result(None)
        return self.done

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


async def connect_members(host: str, port: int, members: list[Member], concurrency: int,
                          timeout: float,
                          progress: Optional[Callable[[int], None]] = None) -> tuple[float, float]:
    """Open every member's connection, at most `concurrency` handshakes in
    flight (a burst of thousands of SYNs would overflow the accept backlog
    and measure TCP retransmission timers). Returns (start, end) times."""
    loop = asyncio.get_running_loop()
    it = iter(members)
    done = 0

    async def worker() -> None:
        nonlocal done
        for m in it:
            await loop.create_connection(lambda m=m: m, host, port)
            await m.ready
            done += 1
            if progress is not None and done % 1000 == 0:
                progress(done)

    t0 = time.perf_counter()
    workers = [asyncio.ensure_future(worker()) for _ in range(min(concurrency, len(members)))]
    try:
        await asyncio.wait_for(asyncio.gather(*workers), timeout)
    finally:
        for w in workers:
            w.cancel()
    return t0, time.perf_counter()


async def close_members(members: list[Member], timeout: float = 5.0) -> None:
    """Close handshake from the client side, then abort whatever is left."""
    for m in members:
        m.close()
    pending = [m.closed for m in members if not m.closed.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)
    for m in members:
        if m.transport is not None and not m.lost:
            m.transport.abort()
