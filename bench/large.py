"""Large messages: fan-out of 16 KiB and 1 MiB binary messages, in bytes/s,
with the server's memory before, at the peak of and after the burst.

The 64-byte text machinery of loadgen/wire does not fit messages a thousand
to sixteen thousand times larger, so this workload has its own small client
for reading and checking (the connection beneath it, from the check of the
101 to the close, is connection.ClientConnection, loadgen's too):

- a message is a binary frame whose payload starts with a 16-byte header
  (magic, sender id, sequence number) followed by a fixed random pattern
  rotated by an offset derived from (sender, seq): every message's bytes
  differ, so a relay that sent stale or mixed-up bytes is caught;
- a member reads into one buffer as bytes arrive and checks every complete
  frame: frame header, payload header, sequence per sender (no gap,
  duplicate or reorder) and every payload byte against the pattern
  (bytearray.startswith on two slices: memcmp speed, no copy);
- each sender keeps at most `window` of its own messages un-echoed, and the
  room never lets its slowest member trail by more than `lag` messages, so
  a load generator that reads slower than the server writes cannot make a
  server buffer without bound (fastrelay's default backpressure would then
  slow the senders, the peers would buffer).

The websockets spot check is left out here: every byte of every delivery
is compared with what was sent, which is a stronger check than its
contiguous-sequence test, and its pure-Python reads of megabyte messages
would cost the load generator more than the servers.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
from collections.abc import Callable
from typing import Optional

from .connection import ClientConnection
from .frames import BINARY, PONG, frame_header, masked_frame
from .loadgen import Connector, close_members, source_addresses
from .meter import Meter, usage_between
from .records import Bulk, Measured, Verdict
from .servers import ServerProcess

HOST = "127.0.0.1"
MAGIC = b"FRLG"
HEAD = struct.Struct("!4sIQ")  # magic, sender id, sequence number: 16 bytes
WINDOW_BYTES = 4 << 20  # un-echoed bytes per sender
INF = 1 << 62


def workloads(quick: bool):
    """The large-message workloads (workloads.Workload, imported late: that
    module imports this one)."""
    from .workloads import Workload

    # --quick checks the machinery, not the relays' limits: 256 KiB instead
    # of 1 MiB there, since fastrelay's default max_backlog (1 MiB) closes
    # members in the 1 MiB row (see bench/README.md); full runs show that.
    sizes = (
        [(10, 1, 16 << 10), (4, 1, 256 << 10)] if quick else [(100, 1, 16 << 10), (20, 1, 1 << 20)]
    )
    return [
        Workload(
            "large-%dk-r%d-s%d" % (size >> 10, r, s),
            "large",
            "%s binary, R=%d S=%d" % (size_label(size), r, s),
            dict(members=r, senders=s, size=size),
        )
        for r, s, size in sizes
    ]


def size_label(size: int) -> str:
    return "%d MiB" % (size >> 20) if size >= 1 << 20 else "%d KiB" % (size >> 10)


class Stream:
    """What every member of a room expects: the pattern and the framing."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.body = size - HEAD.size
        self.pattern = os.urandom(self.body)
        self.pat = memoryview(self.pattern)
        self.head = frame_header(BINARY, size, masked=False)
        self.frame = len(self.head) + size  # every server frame has this size

    def offset(self, sid: int, seq: int) -> int:
        return (seq * 7919 + sid * 104729) % self.body

    def payload(self, sid: int, seq: int) -> bytes:
        k = self.offset(sid, seq)
        return HEAD.pack(MAGIC, sid, seq) + self.pat[k:] + self.pat[:k]


class LargeRoom:
    def __init__(self, stream: Stream, lag: int) -> None:
        self.stream = stream
        self.lag = lag
        self.members: list[LargeMember] = []
        self.senders: list[LargeSender] = []
        self.path = "/large"
        self.sent_total = 0
        self.floor = 0  # frames every member is known to have had
        self.waiting = 0  # members still below wait_target; senders paused while > 0
        self.wait_target = 0

    def slowest(self) -> int:
        return min(m.frames for m in self.members)

    def may_send(self) -> bool:
        if self.waiting:
            return False
        if self.sent_total - self.lag < self.floor:
            return True
        self.floor = self.slowest()
        if self.sent_total - self.lag < self.floor:
            return True
        # Too far ahead of the slowest member: pause the senders until every
        # member is within half the lag limit (event driven, see on_frame).
        self.wait_target = self.sent_total - self.lag // 2
        for m in self.members:
            if m.frames < self.wait_target:
                m.watch = self.wait_target
                self.waiting += 1
        return self.waiting == 0

    def reached(self) -> None:
        self.waiting -= 1
        if self.waiting == 0:
            for s in self.senders:
                s.refill()


class LargeMember(ClientConnection):
    """Receives and checks every frame (see the module docstring)."""

    def __init__(self, room: LargeRoom, sids: list[int]) -> None:
        super().__init__()
        self.room = room
        self.stream = room.stream
        cap = max(4 * self.stream.frame, 1 << 20)
        self.buf = bytearray(cap)
        self.view = memoryview(self.buf)
        self.r = self.w = 0
        self.frames = 0  # data frames received and verified
        self.nbytes = 0
        self.next_seq = {sid: 0 for sid in sids}
        self.watch = INF
        room.members.append(self)

    def _ingest(self, data: bytes) -> None:
        # Only ever the frames that came with the 101, into the empty buffer;
        # start_reading() checks them.
        self.buf[: len(data)] = data
        self.w = len(data)
        self.nbytes += len(data)

    def start_reading(self) -> None:
        asyncio.get_running_loop().add_reader(self.fd, self.on_readable)
        self.parse()

    def on_readable(self) -> None:
        while True:
            free = len(self.buf) - self.w
            if free < 65536:
                self.compact()
                free = len(self.buf) - self.w
            try:
                n = self.sock.recv_into(self.view[self.w :], free)
            except BlockingIOError:
                break
            except OSError as exc:
                self.lose("recv: %s" % exc)
                return
            if n == 0:
                self.lose(None)
                return
            self.w += n
            self.nbytes += n
            self.parse()
            if n < free:
                break

    def compact(self) -> None:
        left = self.w - self.r
        self.buf[:left] = self.view[self.r : self.w]
        self.r, self.w = 0, left

    def parse(self) -> None:
        st, buf = self.stream, self.buf
        while self.w - self.r >= 2:
            first = buf[self.r]
            if first != 0x82:
                if not self.control(first):
                    return
                continue
            if self.w - self.r < st.frame:
                return
            p = self.r + len(st.head)
            if not buf.startswith(st.head, self.r):
                return self.fail("bad frame header %r" % bytes(buf[self.r : p]))
            magic, sid, seq = HEAD.unpack_from(buf, p)
            exp = self.next_seq.get(sid)
            if magic != MAGIC or exp is None:
                return self.fail("bad payload header %r" % bytes(buf[p : p + HEAD.size]))
            if seq != exp:
                return self.fail("sender %d: expected seq %d, got %d" % (sid, exp, seq))
            b, k = p + HEAD.size, st.offset(sid, seq)
            if not (buf.startswith(st.pat[k:], b) and buf.startswith(st.pat[:k], b + st.body - k)):
                return self.fail("sender %d seq %d: payload differs" % (sid, seq))
            self.next_seq[sid] = seq + 1
            self.r += st.frame
            self.frames += 1
            self.on_frame(sid)
            if self.frames == self.watch:
                self.watch = INF
                self.room.reached()

    def control(self, first: int) -> bool:
        """A control frame between messages: answer a ping, fail on anything
        else. False when more bytes are needed or the member failed."""
        buf, r = self.buf, self.r
        n = buf[r + 1] & 0x7F
        if self.w - r < 2 + n:
            return False
        if first == 0x89 and n < 126:
            body = bytes(buf[r + 2 : r + 2 + n])
            self.write(masked_frame(PONG, body, self.key))
            self.r += 2 + n
            return True
        if first == 0x8A and n < 126:
            self.r += 2 + n
            return True
        if first == 0x88 and self.closing:  # the server's answer to our close
            self.r = self.w
            return False
        self.fail("unexpected frame 0x%02x (%r)" % (first, bytes(buf[r : r + 2 + min(n, 60)])))
        return False

    def on_frame(self, sid: int) -> None:
        pass

    def fail(self, msg: str) -> None:
        if self.error is None:
            self.error = msg
        self.r = self.w  # stop checking this member; the run fails
        self._stop_reading()

    def lose(self, why: Optional[str]) -> None:
        """The connection ended: normal after our close frame, an error
        (`why`) before it; missing messages count as loss either way."""
        if self.lost:
            return
        self.lost = True
        if why is not None and not self.closing and self.error is None:
            self.error = why
        self._stop_reading()
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)

    def _stop_reading(self) -> None:
        if self.sock is not None and self.fd >= 0:
            asyncio.get_running_loop().remove_reader(self.fd)

    def _send_failed(self, exc: OSError) -> None:
        self.lose("send: %s" % exc)


class LargeSender(LargeMember):
    def __init__(self, room: LargeRoom, sids: list[int], sid: int, window: int) -> None:
        super().__init__(room, sids)
        self.sid = sid
        self.window = window
        self.sent = 0
        self.echoed = 0
        self.limit = INF
        self.running = False
        room.senders.append(self)

    def on_frame(self, sid: int) -> None:
        if sid == self.sid:
            self.echoed += 1
            if self.running:
                self.refill()

    def _out_drained(self) -> None:
        if self.running:
            self.refill()

    def refill(self) -> None:
        # One message at a time while the socket takes it whole: a sender
        # with its output queued waits for _out_drained() instead.
        room = self.room
        while (
            self.running
            and not self.out
            and self.sent - self.echoed < self.window
            and self.sent < self.limit
            and room.may_send()
        ):
            payload = self.room.stream.payload(self.sid, self.sent)
            self.write(masked_frame(BINARY, payload, self.key))
            self.sent += 1
            room.sent_total += 1
        if self.sent >= self.limit:
            self.running = False


async def run_large(server: ServerProcess, w, s, log: Callable[[str], None]) -> Measured:
    n, k, size = w.params["members"], w.params["senders"], w.params["size"]
    stream = Stream(size)
    window = max(2, WINDOW_BYTES // size)
    room = LargeRoom(stream, lag=2 * k * window)
    sids = list(range(1, k + 1))
    senders = [LargeSender(room, sids, sid, window) for sid in sids]
    members: list[LargeMember] = [*senders, *(LargeMember(room, sids) for _ in range(n - k))]
    meter = Meter(server)
    peak = Peak(meter)
    conn = Connector(HOST, server.port, s.concurrency, source_addresses(n))
    try:
        await asyncio.wait_for(conn.run(members), s.connect_timeout)
        for m in members:
            m.start_reading()
        await asyncio.sleep(0.2)  # settle: a relay's per-connection setup is done
        rss0 = meter.rss()
        peak.start()
        for snd in senders:
            snd.running = True
            snd.refill()
        await asyncio.sleep(s.warmup)
        a = meter.snap(sum(m.frames for m in members))
        await asyncio.sleep(s.duration)
        b = meter.snap(sum(m.frames for m in members))
        for snd in senders:
            snd.limit = snd.sent
            snd.running = False
        drained = await drain(members, room, s.drain_timeout)
        peak.stop()
        # Memory given back: the server's RSS once every delivery arrived
        # and its buffers had a moment to be freed.
        await asyncio.sleep(1.0)
        rss1 = meter.rss()
        usage = usage_between(a, b)
        deliveries = b.received - a.received
        figures = Bulk(
            size=size,
            deliveries=deliveries,
            per_s=deliveries / usage.wall,
            bytes_per_s=deliveries * size / usage.wall,
            messages_sent=room.sent_total,
            rss_before=rss0,
            rss_peak=peak.value,
            rss_after=rss1,
        )
        return Measured(verdict(room, server, drained), usage, figures)
    finally:
        peak.stop()
        conn.close()
        await close_members(members)


async def drain(members: list[LargeMember], room: LargeRoom, timeout: float) -> bool:
    """Wait (bounded, polling every 10 ms) until every member has every
    message sent into the room or has failed."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(m.frames >= room.sent_total or m.error or m.lost for m in members):
            return True
        await asyncio.sleep(0.01)
    return False


def verdict(room: LargeRoom, server: ServerProcess, drained: bool) -> Verdict:
    expected = room.sent_total * len(room.members)
    got = sum(min(m.frames, room.sent_total) for m in room.members)
    errors = [m.error for m in room.members if m.error][:5]
    if not drained:
        errors.append("timed out waiting for all deliveries")
    if not server.alive():
        errors.append("server process exited")
    return Verdict(
        ok=got == expected and not errors,
        errors=errors,
        loss=expected - got,
        deliveries_expected=expected,
        deliveries_verified=got,
        clients_with_errors=sum(1 for m in room.members if m.error),
        clients_with_loss=sum(1 for m in room.members if m.frames < room.sent_total),
    )


class Peak:
    """The server's highest RSS, sampled every 50 ms while running."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.value: Optional[int] = None
        self.task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            rss = self.meter.rss()
            if rss is not None and (self.value is None or rss > self.value):
                self.value = rss
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None
