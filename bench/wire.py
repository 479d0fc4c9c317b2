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

import os
from typing import Optional

try:  # numpy makes verification and frame generation vectorised.
    import numpy as np
except ImportError:  # pragma: no cover - exercised only without numpy
    np = None  # type: ignore[assignment]

PAYLOAD = 64
FRAME = 66          # server -> client: 2-byte header + payload
CFRAME = 70         # client -> server: 2-byte header + 4-byte mask + payload
SERVER_HEADER = b"\x81\x40"
CLIENT_HEADER = b"\x81\xc0"

SID_W, SEQ_W, TS_W = 6, 10, 19
SID_OFF = 0
SEQ_OFF = SID_W + 1                 # 7
TS_OFF = SEQ_OFF + SEQ_W + 1        # 18
PAD_OFF = TS_OFF + TS_W + 1         # 38
PAD = b"x" * (PAYLOAD - PAD_OFF)
MAX_SID = 10 ** SID_W - 1

HAVE_NUMPY = np is not None


def payload(sid: int, seq: int, ts: int = 0) -> bytes:
    return b"%06d:%010d:%019d:" % (sid, seq, ts) + PAD


def sender_marker(sid: int) -> bytes:
    """Bytes that start every server frame carrying a message of `sid`."""
    return SERVER_HEADER + b"%06d" % sid


def new_mask() -> bytes:
    # A random non-zero key: a server must really unmask, no zero-key shortcut.
    while True:
        key = os.urandom(4)
        if key != b"\0\0\0\0":
            return key


def mask_bytes(data: bytes, key: bytes) -> bytes:
    n = len(data)
    full = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(full, "little")).to_bytes(n, "little")


def client_frame(sid: int, seq: int, key: bytes, ts: int = 0) -> bytes:
    return CLIENT_HEADER + key + mask_bytes(payload(sid, seq, ts), key)


def close_frame(key: bytes, code: int = 1000) -> bytes:
    # Masked close frame with a 2-byte status code (opcode 0x8, FIN).
    return b"\x88\x82" + key + mask_bytes(code.to_bytes(2, "big"), key)


class FrameFactory:
    """Pre-builds a sender's masked frames in blocks (timestamp field 0).

    Throughput workloads send as fast as the window allows; building frames
    one by one in Python would make the client, not the server, the limit.
    """

    def __init__(self, sid: int, key: bytes) -> None:
        self.sid = sid
        self.key = key
        self.template = client_frame(sid, 0, key)
        if HAVE_NUMPY:
            self._row = np.frombuffer(self.template, dtype=np.uint8)
            # Mask bytes that apply to the sequence digits' positions.
            keyarr = np.frombuffer(key, dtype=np.uint8)
            pos = np.arange(SEQ_OFF, SEQ_OFF + SEQ_W)
            self._seq_mask = keyarr[pos % 4]
            self._pow = (10 ** np.arange(SEQ_W - 1, -1, -1, dtype=np.int64))

    def block(self, seq0: int, n: int) -> bytes:
        if not HAVE_NUMPY:
            return b"".join(client_frame(self.sid, s, self.key) for s in range(seq0, seq0 + n))
        arr = np.empty((n, CFRAME), dtype=np.uint8)
        arr[:] = self._row
        seqs = np.arange(seq0, seq0 + n, dtype=np.int64)
        digits = ((seqs[:, None] // self._pow) % 10 + 48).astype(np.uint8)
        start = 6 + SEQ_OFF
        arr[:, start:start + SEQ_W] = digits ^ self._seq_mask
        return arr.tobytes()


# Per-column constants for the vectorised check: a frame XOR TEMPLATE is 0
# at every fixed byte (header, separators, padding) and 0..9 at every digit
# (b ^ 0x30 <= 9 exactly when b is an ASCII digit), so one XOR, one compare
# against LIMIT and one any() validate a whole chunk.
_TEMPLATE = SERVER_HEADER + payload(0, 0, 0)
_LIMIT = bytes(9 if 2 + TS_OFF + TS_W > i >= 2 and _TEMPLATE[i] == 0x30 else 0
               for i in range(FRAME))
if HAVE_NUMPY:
    _TEMPLATE_NP = np.frombuffer(_TEMPLATE, dtype=np.uint8)
    _LIMIT_NP = np.frombuffer(_LIMIT, dtype=np.uint8)
    _SID_POW = 10 ** np.arange(SID_W - 1, -1, -1, dtype=np.int64)
    _SEQ_POW = 10 ** np.arange(SEQ_W - 1, -1, -1, dtype=np.int64)
    _TS_POW = 10 ** np.arange(TS_W - 1, -1, -1, dtype=np.int64)


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

    TRIM_AT = 8 << 20

    def __init__(self, senders: list[int]) -> None:
        self.senders = list(senders)
        self.markers = {s: sender_marker(s) for s in self.senders}
        self.verifier = StreamVerifier(senders)
        self.buf = bytearray()
        self.base = 0                               # data offset of buf[0]
        self.checkpoints = [(0, dict(self.verifier.next_seq))]
        self.followers: list[StreamVerifier] = []

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
            self.buf += chunk[:ok * FRAME]
            self.checkpoints.append((self.end, dict(self.verifier.next_seq)))
            if len(self.buf) > self.TRIM_AT:
                self._trim()
        return ok

    def counts_at(self, pos: int) -> dict:
        """Per-sender message counts in the first `pos` data bytes."""
        cp_pos, counts = self.checkpoints[0]
        for p, c in self.checkpoints:
            if p > pos:
                break
            cp_pos, counts = p, c
        counts = dict(counts)
        a, b = cp_pos - self.base, pos - self.base
        for s, marker in self.markers.items():
            counts[s] += self.buf.count(marker, a, b)
        return counts

    def _trim(self) -> None:
        # Drop what every member still on the shared path is past; cut at a
        # checkpoint so counts_at() keeps a starting point.
        low = min((v.frames * FRAME for v in self.followers if v.on_ref), default=self.end)
        keep = [cp for cp in self.checkpoints if cp[0] <= low]
        if not keep:
            return
        new_base = keep[-1][0]
        if new_base > self.base:
            del self.buf[:new_base - self.base]
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

    def __init__(self, senders: list[int], latency: bool = False,
                 ref: Optional[RefStream] = None) -> None:
        self.senders = list(senders)
        self.next_seq = {s: 0 for s in self.senders}
        self.frames = 0             # data frames verified
        self.error: Optional[str] = None
        self.latency = latency
        self.lat_ts: list = []      # send timestamps (ns)
        self.lat_ns: list = []      # delivery latency (ns)
        self.ref = ref if (HAVE_NUMPY and not latency) else None
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
        self.next_seq = self.ref.counts_at(pos)

    def _check_np(self, buf, n: int, base: int, marks) -> int:
        a = np.frombuffer(buf, dtype=np.uint8, count=n * FRAME).reshape(n, FRAME)
        x = a ^ _TEMPLATE_NP
        if (x > _LIMIT_NP).any():
            # Slow path, only when something is off: find the first bad row.
            row = int(np.argmax((x > _LIMIT_NP).any(axis=1)))
            if a[row, 0] != 0x81 or a[row, 1] != 0x40:
                n = row         # not a data frame: the caller looks at it
                if n == 0:
                    return 0
                a, x = a[:n], x[:n]
            else:
                self._fail("malformed payload in frame #%d: %r" % (self.frames + row, bytes(a[row][:24])))
                return 0
        sid = x[:, 2 + SID_OFF:2 + SID_OFF + SID_W].astype(np.int64) @ _SID_POW
        seq = x[:, 2 + SEQ_OFF:2 + SEQ_OFF + SEQ_W].astype(np.int64) @ _SEQ_POW
        single = len(self.senders) == 1
        seen = 0
        for s in self.senders:
            q = seq if single else seq[sid == s]
            if len(q) == 0:
                continue
            seen += len(q)
            exp = self.next_seq[s]
            want = np.arange(exp, exp + len(q), dtype=np.int64)
            if not np.array_equal(q, want):
                j = int(np.argmax(q != want))
                self._fail("sender %d: expected seq %d, got %d (gap, duplicate or reorder)"
                           % (s, exp + j, int(q[j])))
                return 0
            self.next_seq[s] = exp + len(q)
        if (single and (sid != self.senders[0]).any()) or (not single and seen != n):
            self._fail("frame from a sender that is not in this room")
            return 0
        if self.latency and marks:
            ts = x[:, 2 + TS_OFF:2 + TS_OFF + TS_W].astype(np.int64) @ _TS_POW
            ends = np.fromiter((m[0] for m in marks), dtype=np.int64, count=len(marks))
            times = np.fromiter((m[1] for m in marks), dtype=np.int64, count=len(marks))
            frame_ends = base + FRAME * np.arange(1, n + 1, dtype=np.int64)
            idx = np.minimum(np.searchsorted(ends, frame_ends, side="left"), len(ends) - 1)
            self.lat_ts.append(ts)
            self.lat_ns.append(times[idx] - ts)
        return n

    def _check_py(self, buf, n: int, base: int, marks) -> int:
        mv = bytes(buf[:n * FRAME])
        mark_i = 0
        for i in range(n):
            f = mv[i * FRAME:(i + 1) * FRAME]
            if f[:2] != SERVER_HEADER:
                return i
            pl = f[2:]
            try:
                ok = (f[:2] == SERVER_HEADER and pl[SID_W] == 58 and pl[SEQ_OFF + SEQ_W] == 58
                      and pl[TS_OFF + TS_W] == 58 and pl[PAD_OFF:] == PAD)
                s = int(pl[:SID_W])
                q = int(pl[SEQ_OFF:SEQ_OFF + SEQ_W])
                ts = int(pl[TS_OFF:TS_OFF + TS_W])
            except ValueError:
                ok = False
            if not ok:
                self._fail("malformed payload in frame #%d: %r" % (self.frames + i, f[:24]))
                return 0
            exp = self.next_seq.get(s)
            if exp is None:
                self._fail("frame from a sender that is not in this room")
                return 0
            if q != exp:
                self._fail("sender %d: expected seq %d, got %d (gap, duplicate or reorder)" % (s, exp, q))
                return 0
            self.next_seq[s] = exp + 1
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
            for ts, lat in zip(v.lat_ts, v.lat_ns):
                ts = np.asarray(ts)
                sel = (ts >= t_from) & (ts < t_to)
                parts.append(np.asarray(lat)[sel])
        if not parts:
            return []
        return np.sort(np.concatenate(parts))
    out = []
    for v in verifiers:
        for ts, lat in zip(v.lat_ts, v.lat_ns):
            out.extend(l for t, l in zip(ts, lat) if t_from <= t < t_to)
    out.sort()
    return out


def percentile(sorted_values, q: float) -> float:
    n = len(sorted_values)
    if n == 0:
        return float("nan")
    i = min(n - 1, max(0, int(round(q / 100.0 * (n - 1)))))
    return float(sorted_values[i])
