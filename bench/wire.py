"""Wire format of the load: fixed-size frames that can be checked in bulk.

Every benchmark message is a 64-byte text payload of ASCII digits:

    SSSSSS:QQQQQQQQQQ:TTTTTTTTTTTTTTTTTTT:xxxxxxxxxxxxxxxxxxxxxxxxxx
    sender  sequence   send time (ns)       padding

so a server frame is always 66 bytes (0x81, 0x40, payload) and a client
frame 70 bytes (0x81, 0xC0, 4-byte mask, masked payload). Fixed widths make a
receiver's byte stream a (n, 66) array: header, separators, digits and per
sender ordering are checked with a few vectorised numpy operations per
chunk of thousands of frames instead of Python work per frame. 0x81 never
occurs inside a payload (ASCII only), so b"\\x81\\x40" + sender digits marks
the start of that sender's frames and bytes.count() finds a sender's echoes.
"""

from __future__ import annotations

from typing import Optional

from .frames import TEXT, masked_frame

try:  # numpy makes verification and frame generation vectorised.
    import numpy as np
except ImportError:  # pragma: no cover - exercised only without numpy
    np = None  # type: ignore[assignment]

PAYLOAD = 64
FRAME = 66  # server -> client: 2-byte header + payload
CFRAME = 70  # client -> server: 2-byte header + 4-byte mask + payload
SERVER_HEADER = b"\x81\x40"

SID_W, SEQ_W, TS_W = 6, 10, 19
SID_OFF = 0
SEQ_OFF = SID_W + 1  # 7
TS_OFF = SEQ_OFF + SEQ_W + 1  # 18
PAD_OFF = TS_OFF + TS_W + 1  # 38
PAD = b"x" * (PAYLOAD - PAD_OFF)
MAX_SID = 10**SID_W - 1

HAVE_NUMPY = np is not None


def payload(sid: int, seq: int, ts: int = 0) -> bytes:
    return b"%06d:%010d:%019d:" % (sid, seq, ts) + PAD


def sender_marker(sid: int) -> bytes:
    """Bytes that start every server frame carrying a message of `sid`."""
    return SERVER_HEADER + b"%06d" % sid


def client_frame(sid: int, seq: int, key: bytes, ts: int = 0) -> bytes:
    return masked_frame(TEXT, payload(sid, seq, ts), key)


BLOCK = 1000  # frames per pre-built block; blocks start at multiples of it

if HAVE_NUMPY:
    # The last three sequence digits of 1000 consecutive frames, as ASCII.
    _LOW3 = np.array([list(b"%03d" % i) for i in range(BLOCK)], dtype=np.uint8)


class FrameFactory:
    """Pre-builds a sender's masked frames, 1000 at a time (timestamp 0).

    Throughput workloads send as fast as the window allows; building frames
    one by one in Python would make the client, not the server, the limit.
    Block k holds sequence numbers 1000k..1000k+999: the last three digits
    repeat in every block (a pre-masked table) and the other seven are one
    constant per block, so a block is three array copies.
    """

    def __init__(self, sid: int, key: bytes) -> None:
        self.sid = sid
        self.key = key
        if HAVE_NUMPY:
            self._row = np.frombuffer(client_frame(sid, 0, key), dtype=np.uint8)
            keyarr = np.frombuffer(key, dtype=np.uint8)
            lo = np.arange(SEQ_OFF + SEQ_W - 3, SEQ_OFF + SEQ_W)
            self._lo_cols = slice(6 + lo[0], 6 + lo[-1] + 1)
            self._lo = _LOW3 ^ keyarr[lo % 4]
            hi = np.arange(SEQ_OFF, SEQ_OFF + SEQ_W - 3)
            self._hi_cols = slice(6 + hi[0], 6 + hi[-1] + 1)
            self._hi_mask = keyarr[hi % 4]

    def block(self, k: int) -> bytes:
        """Frames for sequence numbers BLOCK*k .. BLOCK*k + BLOCK - 1."""
        seq0 = k * BLOCK
        if not HAVE_NUMPY:
            return b"".join(client_frame(self.sid, s, self.key) for s in range(seq0, seq0 + BLOCK))
        arr = np.empty((BLOCK, CFRAME), dtype=np.uint8)
        arr[:] = self._row
        arr[:, self._lo_cols] = self._lo
        arr[:, self._hi_cols] = np.frombuffer(b"%07d" % k, dtype=np.uint8) ^ self._hi_mask
        return arr.tobytes()


# Per-column constants for the vectorised check: a frame XOR TEMPLATE is 0
# at every fixed byte (header, separators, padding, and the timestamp when
# the workload sends none) and 0..9 at every digit (b ^ 0x30 <= 9 exactly
# when b is an ASCII digit), so an XOR, a compare against a limit and an
# any() validate a whole chunk.
_TEMPLATE = SERVER_HEADER + payload(0, 0, 0)


def _limit(stamped: bool) -> bytes:
    end = 2 + (TS_OFF + TS_W if stamped else SEQ_OFF + SEQ_W)
    return bytes(9 if end > i >= 2 and _TEMPLATE[i] == 0x30 else 0 for i in range(FRAME))


class _Shape:
    """What a valid frame looks like, as arrays for the vectorised check."""

    def __init__(self, stamped: bool) -> None:
        limit = _limit(stamped)
        self.limit = np.frombuffer(limit, dtype=np.uint8)
        # The same check eight bytes at a time (SWAR): 4 frames are 264
        # bytes, 33 little-endian uint64 lanes. After the XOR a byte is bad
        # if it is a fixed byte and not 0, or a digit byte and not 0..9:
        # any high-nibble bit set, or low nibble + 6 carrying into bit 4.
        self.t64 = self._lanes(_TEMPLATE)
        self.a64 = self._lanes(0xF0 if lim else 0xFF for lim in limit)
        self.b64 = self._lanes(0x0F if lim else 0 for lim in limit)
        self.c64 = self._lanes(0x06 if lim else 0 for lim in limit)
        self.d64 = self._lanes(0x10 if lim else 0 for lim in limit)

    @staticmethod
    def _lanes(per_byte) -> "np.ndarray":
        return np.frombuffer(bytes(per_byte) * 4, dtype="<u8")


if HAVE_NUMPY:
    _TEMPLATE_NP = np.frombuffer(_TEMPLATE, dtype=np.uint8)
    _TS_POW = 10 ** np.arange(TS_W - 1, -1, -1, dtype=np.int64)
    _PLAIN = _Shape(stamped=False)
    _STAMPED = _Shape(stamped=True)
    _U = np.uint64


def _parse8(v: "np.ndarray") -> "np.ndarray":
    """Eight ASCII digits loaded little-endian (first digit in the low
    byte) to their value: pairs, then quads, then all eight, each step one
    multiply that adds a shifted copy (wrap-around is intended)."""
    v = ((v & _U(0x0F0F0F0F0F0F0F0F)) * _U(2561)) >> _U(8)
    v = ((v & _U(0x00FF00FF00FF00FF)) * _U(6553601)) >> _U(16)
    return ((v & _U(0x0000FFFF0000FFFF)) * _U(42949672960001)) >> _U(32)


class RefStream:
    """The data-frame stream of one room as first verified by its leading
    member, shared by all members of the room.

    A relay that fans each message out to all members in one go gives every
    member the same byte stream. The member furthest ahead verifies new
    bytes in full (vectorised) and appends them here; the others only
    compare their bytes with these (one memcmp), which keeps verification
    cost per delivery tiny. A member whose bytes differ (a legal different
    interleaving of senders, or a fault) leaves the shared path and is
    verified in full from then on; nothing is assumed, only compared.
    """

    TRIM_AT = 256 << 10  # try to drop consumed bytes above this size

    def __init__(self, senders: list[int], stamped: bool = False) -> None:
        self.senders = list(senders)
        self.markers = {s: sender_marker(s) for s in self.senders}
        self.verifier = StreamVerifier(senders, stamped=stamped)
        self.buf = bytearray()
        self.base = 0  # data offset of buf[0]
        self.checkpoints = [(0, dict(self.verifier.next_seq))]
        self.followers: list[StreamVerifier] = []
        self.trim_at = self.TRIM_AT

    @property
    def end(self) -> int:
        return self.base + len(self.buf)

    def extend(self, chunk, n: int) -> int:
        """Verify n frame slots that start at self.end; keep the good ones.
        Returns -1 if they do not verify: the shared stream stays as it was
        and the member that offered them is checked on its own."""
        v = self.verifier
        saved = dict(v.next_seq), v.frames
        ok = v.check(chunk, n)
        if v.error is not None:
            v.error = None
            v.next_seq, v.frames = saved
            return -1
        if ok:
            self.buf += chunk[: ok * FRAME]
            self.checkpoints.append((self.end, dict(self.verifier.next_seq)))
            if len(self.buf) > self.trim_at:
                self._trim()
                # Members far behind keep bytes alive; do not rescan them
                # all on every extend while that lasts.
                self.trim_at = max(self.TRIM_AT, 2 * len(self.buf))
        return ok

    def next_seq_at(self, pos: int) -> dict:
        """Per sender, the sequence number expected after the first `pos`
        data bytes: from the last checkpoint before, then the sender's last
        frame (if any) between that checkpoint and pos."""
        cp_pos, nxt = self.checkpoints[0]
        for p, c in self.checkpoints:
            if p > pos:
                break
            cp_pos, nxt = p, c
        nxt = dict(nxt)
        a, b = cp_pos - self.base, pos - self.base
        for s, marker in self.markers.items():
            i = self.buf.rfind(marker, a, b)
            if i >= 0:
                q = 2 + SEQ_OFF + i
                nxt[s] = int(self.buf[q : q + SEQ_W]) + 1
        return nxt

    def _trim(self) -> None:
        # Drop what every member still on the shared path is past; cut at a
        # checkpoint so next_seq_at() keeps a starting point.
        low = min((v.frames * FRAME for v in self.followers if v.on_ref), default=self.end)
        keep = [cp for cp in self.checkpoints if cp[0] <= low]
        if not keep:
            return
        new_base = keep[-1][0]
        if new_base > self.base:
            del self.buf[: new_base - self.base]
            self.base = new_base
            self.checkpoints = [cp for cp in self.checkpoints if cp[0] >= new_base]


class StreamVerifier:
    """Checks one receiver's stream of server frames, chunk by chunk.

    Expects every frame to be a 66-byte text frame from one of `senders`,
    and each sender's sequence numbers to arrive as 0, 1, 2, ... with no gap,
    duplicate or reordering. Optionally extracts per-frame latency given the
    receive time of each read. With a RefStream, compares against the room's
    shared stream instead of parsing (see RefStream).
    """

    def __init__(
        self,
        senders: list[int],
        latency: bool = False,
        ref: Optional[RefStream] = None,
        stamped: Optional[bool] = None,
    ) -> None:
        self.senders = list(senders)
        self.next_seq = {s: 0 for s in self.senders}
        self.frames = 0  # data frames verified
        self.error: Optional[str] = None
        self.loss_note: Optional[str] = None  # first gap seen, if any
        self.latency = latency  # collect per-frame latency
        # Frames carry send times (latency workload) or a zero timestamp.
        self.stamped = latency if stamped is None else stamped
        self.lat_ts: list = []  # send timestamps (ns)
        self.lat_ns: list = []  # delivery latency (ns)
        # Each sender id with its ':' as the big-endian integer _check_np reads.
        self._keys = [int.from_bytes(b"%06d:" % s_, "big") for s_ in self.senders]
        self.ref = ref if (HAVE_NUMPY and not latency) else None
        # Throughput frames carry no timestamp: its digits must all be 0.
        self._shape = (_STAMPED if self.stamped else _PLAIN) if HAVE_NUMPY else None
        self.on_ref = self.ref is not None
        if self.ref is not None:
            self.ref.followers.append(self)

    def received(self) -> int:
        # Every verified frame is a distinct, in-order message of a sender of
        # this room, so the count of verified frames is the count received.
        return self.frames

    def _fail(self, msg: str) -> None:
        if self.error is None:
            self.error = msg

    def _lost_note(self, sender: int, first: int, upto: int) -> None:
        if self.loss_note is None:
            self.loss_note = "sender %d: seq %d..%d missing" % (sender, first, upto - 1)

    def check(self, buf, n: int, base: int = 0, marks: Optional[list] = None) -> int:
        """Verify the leading data frames among the first n frame slots of
        buf and return how many were verified. It stops early (returns < n)
        at a slot that does not start with a 66-byte text frame header, so
        the caller can look at what is there (a ping, a close frame, junk).
        `base` is the stream offset of buf[0] and `marks` a list of
        (stream end offset of a read, receive time ns) for latency."""
        if self.error is not None or n <= 0:
            return 0
        if self.on_ref:
            ok = self._check_ref(buf, n)
        elif HAVE_NUMPY:
            ok = self._check_np(buf, n, base, marks)
        else:
            ok = self._check_py(buf, n, base, marks)
        self.frames += ok
        return ok

    def _check_ref(self, buf, n: int) -> int:
        ref = self.ref
        pos = self.frames * FRAME
        size = n * FRAME
        mv = memoryview(buf)
        cov = min(size, ref.end - pos)
        if cov < 0 or pos < ref.base:
            self._fail("internal: member left behind by the shared stream")
            return 0
        if cov > 0 and not ref.buf.startswith(mv[:cov], pos - ref.base):
            # Different bytes than the room's stream: from here on this
            # member is checked on its own, from the state the shared stream
            # had at this point (which its bytes so far matched).
            self._leave_ref(pos)
            return self._check_np(buf, n, pos, None)
        if cov >= size:
            return n
        # Ahead of everyone: verify the new bytes and share them.
        done = cov // FRAME
        ok = ref.extend(mv[cov:size], n - done)
        if ok < 0:
            self._leave_ref(pos + cov)
            ok = self._check_np(mv[cov:size], n - done, pos + cov, None)
        return done + ok

    def _leave_ref(self, pos: int) -> None:
        self.on_ref = False
        self.next_seq = self.ref.next_seq_at(pos)

    def _valid(self, buf, n: int) -> bool:
        """True if the n frames all have the fixed bytes of a data frame
        and ASCII digits where digits belong (see _Shape)."""
        sh = self._shape
        g = n // 4
        if g:
            v = np.frombuffer(buf, dtype="<u8", count=g * 33).reshape(g, 33) ^ sh.t64
            if ((v & sh.a64) | (((v & sh.b64) + sh.c64) & sh.d64)).any():
                return False
        if n > 4 * g:
            a = np.frombuffer(buf, dtype=np.uint8, count=n * FRAME)[4 * g * FRAME :]
            if ((a.reshape(-1, FRAME) ^ _TEMPLATE_NP) > sh.limit).any():
                return False
        return True

    def _check_np(self, buf, n: int, base: int, marks) -> int:
        if not self._valid(buf, n):
            # Slow path, only when something is off: find the first bad row.
            a = np.frombuffer(buf, dtype=np.uint8, count=n * FRAME).reshape(n, FRAME)
            row = int(np.argmax(((a ^ _TEMPLATE_NP) > self._shape.limit).any(axis=1)))
            if a[row, 0] != 0x81 or a[row, 1] != 0x40:
                n = row  # not a data frame: the caller looks at it
                if n == 0:
                    return 0
            else:
                self._fail(
                    "malformed payload in frame #%d: %r" % (self.frames + row, bytes(a[row][:24]))
                )
                return 0

        def column(offset: int, dtype: str) -> "np.ndarray":
            # One value per frame, read in place from a fixed offset.
            return np.ndarray((n,), dtype=dtype, buffer=buf, offset=offset, strides=(FRAME,))

        # Sender: the 6 id digits and ':' as one big-endian integer.
        sid_key = column(2 + SID_OFF, ">u8") >> _U(8)
        seq = _parse8(column(2 + SEQ_OFF, "<u8")) * _U(100) + _parse8(
            (column(2 + SEQ_OFF + 8, "<u2").astype(np.uint64) << _U(48)) | _U(0x303030303030)
        )
        seq = seq.astype(np.int64)
        single = len(self.senders) == 1
        seen = 0
        for s, key in zip(self.senders, self._keys, strict=True):
            if single:
                if (sid_key != key).any():
                    self._fail("frame from a sender that is not in this room")
                    return 0
                q = seq
            else:
                q = seq[sid_key == key]
            if len(q) == 0:
                continue
            seen += len(q)
            exp = self.next_seq[s]
            if not np.array_equal(q, np.arange(exp, exp + len(q), dtype=np.int64)):
                step = np.diff(q, prepend=exp - 1)
                if (step < 1).any():
                    j = int(np.argmax(step < 1))
                    self._fail(
                        "sender %d: seq %d after %d (duplicate or reorder)"
                        % (s, int(q[j]), int(q[j]) - int(step[j]))
                    )
                    return 0
                # Only gaps: messages lost. Keep verifying; the count of
                # frames received shows how many are missing.
                j = int(np.argmax(step > 1))
                self._lost_note(s, int(q[j]) - int(step[j]) + 1, int(q[j]))
            self.next_seq[s] = int(q[-1]) + 1
        if not single and seen != n:
            self._fail("frame from a sender that is not in this room")
            return 0
        if self.latency and marks:
            a = np.frombuffer(buf, dtype=np.uint8, count=n * FRAME).reshape(n, FRAME)
            ts = (a[:, 2 + TS_OFF : 2 + TS_OFF + TS_W] - np.uint8(48)).astype(np.int64) @ _TS_POW
            ends = np.fromiter((m[0] for m in marks), dtype=np.int64, count=len(marks))
            times = np.fromiter((m[1] for m in marks), dtype=np.int64, count=len(marks))
            frame_ends = base + FRAME * np.arange(1, n + 1, dtype=np.int64)
            idx = np.minimum(np.searchsorted(ends, frame_ends, side="left"), len(ends) - 1)
            self.lat_ts.append(ts)
            self.lat_ns.append(times[idx] - ts)
        return n

    def _check_py(self, buf, n: int, base: int, marks) -> int:
        mv = bytes(buf[: n * FRAME])
        mark_i = 0
        for i in range(n):
            f = mv[i * FRAME : (i + 1) * FRAME]
            if f[:2] != SERVER_HEADER:
                return i
            pl = f[2:]
            try:
                ok = (
                    f[:2] == SERVER_HEADER
                    and pl[SID_W] == 58
                    and pl[SEQ_OFF + SEQ_W] == 58
                    and pl[TS_OFF + TS_W] == 58
                    and pl[PAD_OFF:] == PAD
                )
                s = int(pl[:SID_W])
                q = int(pl[SEQ_OFF : SEQ_OFF + SEQ_W])
                ts = int(pl[TS_OFF : TS_OFF + TS_W])
                ok = ok and (self.stamped or ts == 0)
            except ValueError:
                ok = False
            if not ok:
                self._fail("malformed payload in frame #%d: %r" % (self.frames + i, f[:24]))
                return 0
            exp = self.next_seq.get(s)
            if exp is None:
                self._fail("frame from a sender that is not in this room")
                return 0
            if q < exp:
                self._fail("sender %d: seq %d after %d (duplicate or reorder)" % (s, q, exp - 1))
                return 0
            if q > exp:
                self._lost_note(s, exp, q)
            self.next_seq[s] = q + 1
            if self.latency and marks:
                end = base + (i + 1) * FRAME
                while mark_i < len(marks) - 1 and marks[mark_i][0] < end:
                    mark_i += 1
                self.lat_ts.append([ts])
                self.lat_ns.append([marks[mark_i][1] - ts])
        return n


def latency_samples(verifiers, t_from: int, t_to: int):
    """Latencies (ns) of messages sent within [t_from, t_to), sorted."""
    if HAVE_NUMPY:
        parts = []
        for v in verifiers:
            for ts, lat in zip(v.lat_ts, v.lat_ns, strict=True):
                ts = np.asarray(ts)
                sel = (ts >= t_from) & (ts < t_to)
                parts.append(np.asarray(lat)[sel])
        if not parts:
            return []
        return np.sort(np.concatenate(parts))
    out = []
    for v in verifiers:
        for ts, lat in zip(v.lat_ts, v.lat_ns, strict=True):
            out.extend(d for t, d in zip(ts, lat, strict=True) if t_from <= t < t_to)
    out.sort()
    return out


def percentile(sorted_values, q: float) -> float:
    n = len(sorted_values)
    if n == 0:
        return float("nan")
    i = min(n - 1, max(0, int(round(q / 100.0 * (n - 1)))))
    return float(sorted_values[i])
