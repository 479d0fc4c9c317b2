"""The four workloads. Each runs against one freshly started server and
returns what it measured (records.Measured): CPU use, its figures and the
verdict on every delivery."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Optional

from . import large, tls, wire
from .loadgen import (
    FRAME,
    SMALL_BUF,
    Member,
    Pacer,
    Room,
    Sender,
    SpotCheck,
    close_members,
    connect_members,
    source_addresses,
)
from .meter import Meter, usage_between
from .records import Flow, Handshakes, Latency, Measured, Throughput, Verdict
from .servers import ServerProcess

HOST = "127.0.0.1"
TAIL = 200  # messages per sender after the measured window, spot-checked
LATENCY_EVERY = 10  # latency workload: every 10th member measures latency


@dataclass
class Settings:
    duration: float = 3.0  # measured seconds per run
    warmup: float = 1.0  # seconds of load before measuring
    window: int = 1024  # most un-echoed messages per sender (fan-out)
    window_rooms: int = 256  # same, many-small-rooms workload
    window_min: int = 16  # windows start here and never go below
    # Queued work a window allows beyond the round trip (s). Deeper queues
    # made the peers slower in fan-out (bursts overflow socket buffers) and
    # faster in small rooms (bigger reads); these values favour the peers.
    queue_fanout: float = 0.05
    queue_rooms: float = 0.2
    lag_limit: int = 0  # 0: derived from window and senders
    concurrency: int = 100  # handshakes in flight while connecting
    spot_check: bool = True
    drain_timeout: float = 20.0
    connect_timeout: float = 120.0


@dataclass
class Workload:
    key: str  # stable id used in JSON
    kind: str  # fanout | latency | rooms | connections | wss | large
    label: str
    params: dict  # sizes: members/senders, members/rate, clients/room_size

    @property
    def tls(self) -> bool:
        """Served and driven over TLS (wss://)."""
        return bool(self.params.get("tls"))


# Kinds a full run leaves out unless --workloads names them (each adds minutes
# to the default run and its table); --quick runs them all, small.
OPT_IN = ("wss", "large")


def default_workloads(quick: bool) -> list[Workload]:
    if quick:
        fan = [(20, 1), (20, 2)]
        lats = [dict(members=10, rate=200)]
        rooms = dict(clients=40, room_size=2)
        conns = dict(clients=200, room_size=10)
    else:
        fan = [(100, 1), (100, 4), (1000, 1), (1000, 4)]
        # 1000 msg/s (100k deliveries/s) is within every peer's reach on
        # the 2-core dev VM; 2000 msg/s is past what websockets and aiohttp
        # sustain there, which shows as queueing.
        lats = [dict(members=100, rate=1000), dict(members=100, rate=2000)]
        rooms = dict(clients=1000, room_size=2)
        conns = dict(clients=5000, room_size=10)
    out = [
        Workload(
            "fanout-r%d-s%d" % (r, s),
            "fanout",
            "fan-out R=%d S=%d" % (r, s),
            dict(members=r, senders=s),
        )
        for r, s in fan
    ]
    for lat in lats:
        out.append(latency_workload(lat["members"], lat["rate"]))
    out.append(
        Workload(
            "rooms-%dx%d" % (rooms["clients"] // rooms["room_size"], rooms["room_size"]),
            "rooms",
            "%d rooms of %d" % (rooms["clients"] // rooms["room_size"], rooms["room_size"]),
            rooms,
        )
    )
    out.append(connections_workload(conns["clients"], conns["room_size"]))
    for r, s in [(20, 1)] if quick else [(100, 1), (100, 4)]:
        out.append(
            Workload(
                "wss-fanout-r%d-s%d" % (r, s),
                "wss",
                "wss fan-out R=%d S=%d" % (r, s),
                dict(members=r, senders=s, tls=True),
            )
        )
    out += large.workloads(quick)
    return out


def connections_workload(clients: int, room_size: int) -> Workload:
    return Workload(
        "connections-%d" % clients,
        "connections",
        "%d idle connections" % clients,
        dict(clients=clients, room_size=room_size),
    )


class WindowControl:
    """Sizes each sender's window: enough for the round trip it gets when
    nothing queues, plus `queue` seconds of queued work.

    A window only has to keep the server from running dry; anything beyond
    that is a queue. With 1024 messages in flight per sender, a room of 1000
    on a relay doing 150k deliveries/s holds seconds of work, which the end
    of each run would then have to wait for. Every 50 ms each sender's
    window becomes rate x (base round trip + queue), where rate is how
    fast its messages came back and the base round trip is the smallest
    in-flight/rate seen so far (Little's law): fast relays get deep windows,
    slow ones a short queue, and a load generator that is itself slow to
    turn echoes around (a thousand paced senders) is not mistaken for a slow
    relay. A window at most doubles per period and stays within
    [window_min, maximum].
    """

    PERIOD = 0.05

    def __init__(self, senders: list[Sender], wmin: int, wmax: int, target: float) -> None:
        self.senders, self.wmin, self.wmax, self.target = senders, wmin, wmax, target
        self.task: Optional[asyncio.Task] = None
        self.base = [float("inf")] * len(senders)
        for snd in senders:
            self._set(snd, wmin)

    def _set(self, snd: Sender, w: int) -> None:
        snd.window = w
        snd.refill_min = max(1, w // 4)

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        last = [snd.echoed for snd in self.senders]
        t = time.perf_counter()
        while True:
            await asyncio.sleep(self.PERIOD)  # a control period, not a wait for an event
            now = time.perf_counter()
            dt, t = now - t, now
            for i, snd in enumerate(self.senders):
                e = snd.echoed
                rate, last[i] = (e - last[i]) / dt, e
                if rate <= 0:
                    continue
                self.base[i] = min(self.base[i], (snd.sent - e) / rate)
                w = min(int(rate * (self.base[i] + self.target)), 2 * snd.window)
                self._set(snd, max(self.wmin, min(self.wmax, w)))
                if snd.running:
                    snd.refill()

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def windows(self) -> list[int]:
        return sorted(snd.window for snd in self.senders)


def latency_workload(members: int, rate: int) -> Workload:
    return Workload(
        "latency-r%d-%dhz" % (members, rate),
        "latency",
        "latency R=%d @%d msg/s" % (members, rate),
        dict(members=members, rate=rate),
    )


def writes_between(a, b) -> int | None:
    if a.server_writes is None or b.server_writes is None:
        return None
    return b.server_writes - a.server_writes


def received(members: list[Member]) -> int:
    return sum(m.nbytes for m in members)


def verdict(
    rooms: list[Room], spot: Optional[SpotCheck], server: ServerProcess, drained: bool
) -> Verdict:
    expected = got = 0
    errors: list[str] = []
    n_err = n_loss = 0
    for room in rooms:
        for m in room.members:
            m.finish()
            expected += room.sent_total
            got += min(m.received(), room.sent_total)
            if m.error:
                n_err += 1
                if len(errors) < 5:
                    errors.append("%s: %s" % (room.path, m.error))
            elif m.received() < room.sent_total:
                n_loss += 1
                if len(errors) < 5:
                    note = m.verifier.loss_note or "the last messages never arrived"
                    errors.append(
                        "%s: lost %d of %d (%s)"
                        % (room.path, room.sent_total - m.received(), room.sent_total, note)
                    )
    if spot is not None and spot.error:
        n_err += 1
        errors.append("websockets spot check: %s" % spot.error)
    if not drained:
        errors.append("timed out waiting for all deliveries")
    if not server.alive():
        errors.append("server process exited")
    loss = expected - got
    return Verdict(
        ok=(loss == 0 and not errors),
        errors=errors,
        loss=loss,
        deliveries_expected=expected,
        deliveries_verified=got,
        clients_with_errors=n_err,
        clients_with_loss=n_loss,
        spot_check_received=None if spot is None else spot.count,
    )


async def _drain(
    rooms: list[Room],
    spot: Optional[SpotCheck],
    joined: Optional[dict[int, int]],
    timeout: float,
) -> bool:
    """Wait (bounded) until every member has every message sent, and the
    spot check (in rooms[0]) every message sent after `joined`."""
    futs = [r.start_drain() for r in rooms]
    if spot is not None:
        final = {m.sid: m.sent for m in rooms[0].senders}
        futs.append(spot.expect(joined or {sid: 0 for sid in final}, final))
    done, pending = await asyncio.wait(futs, timeout=timeout)
    if spot is not None:
        spot.finish()
    return not pending


def client_tls(w: Workload) -> Optional[ssl.SSLContext]:
    return tls.certs().client_context() if w.tls else None


async def _open(
    server: ServerProcess,
    members: Sequence[Member],
    s: Settings,
    log: Callable[[str], None],
    tls_ctx: Optional[ssl.SSLContext] = None,
) -> tuple[float, float]:
    def progress(n: int) -> None:
        log("    connected %d/%d" % (n, len(members)))

    return await connect_members(
        HOST,
        server.port,
        members,
        s.concurrency,
        s.connect_timeout,
        progress if len(members) >= 2000 else None,
        source_addresses(len(members)),
        tls_ctx,
    )


async def _spot(
    server: ServerProcess, room: Room, s: Settings, tls_ctx: Optional[ssl.SSLContext] = None
) -> Optional[SpotCheck]:
    if not s.spot_check:
        return None
    url = "%s://%s:%d%s" % ("wss" if tls_ctx else "ws", HOST, server.port, room.path)
    spot = SpotCheck(url, [m.sid for m in room.senders], tls_ctx)
    await asyncio.wait_for(spot.connect(), 30)
    return spot


async def _teardown(members: Sequence[Member], spot: Optional[SpotCheck]) -> None:
    if spot is not None:
        await spot.close()
    await close_members(members)


@dataclass
class Load:
    """The clients of a throughput run. The spot check joins rooms[0]."""

    rooms: list[Room]
    members: list[Member]
    senders: list[Sender]
    flow: Flow
    tls: Optional[ssl.SSLContext] = None  # wss: the clients' TLS context


async def run_fanout(
    server: ServerProcess, w: Workload, s: Settings, log: Callable[[str], None]
) -> Measured:
    n, k = w.params["members"], w.params["senders"]
    flow = Flow(
        window_max=s.window,
        lag_limit=s.lag_limit or min(max(2 * k * s.window, 1024), 8192),
        queue_s=s.queue_fanout,
    )
    room = Room("/fanout", flow.lag_limit)
    sids = list(range(1, k + 1))
    senders = [Sender(room, sids, sid, s.window_min) for sid in sids]
    members: list[Member] = [*senders, *(Member(room, sids) for _ in range(n - k))]
    load = Load([room], members, senders, flow, client_tls(w))
    return await _throughput(server, load, s, log)


async def run_rooms(
    server: ServerProcess, w: Workload, s: Settings, log: Callable[[str], None]
) -> Measured:
    n, size = w.params["clients"], w.params["room_size"]
    flow = Flow(
        window_max=s.window_rooms,
        lag_limit=s.lag_limit or max(4 * size * s.window_rooms, 256),
        queue_s=s.queue_rooms,
    )
    rooms, senders = [], []
    for r in range(n // size):
        room = Room("/small-%d" % r, flow.lag_limit)
        sids = [r * size + j + 1 for j in range(size)]
        senders += [Sender(room, sids, sid, s.window_min) for sid in sids]
        rooms.append(room)
    return await _throughput(server, Load(rooms, list(senders), senders, flow), s, log)


async def _throughput(
    server: ServerProcess, load: Load, s: Settings, log: Callable[[str], None]
) -> Measured:
    meter = Meter(server)
    spot = None
    pacer = Pacer()
    senders, flow = load.senders, load.flow
    control = WindowControl(senders, s.window_min, flow.window_max, flow.queue_s)
    try:
        await _open(server, load.members, s, log, load.tls)
        for m in load.members:
            # Receivers are read in rounds (see loadgen's docstring). So are
            # senders when everyone sends (small rooms): a thousand sockets
            # read on every event would cost the client more than the server.
            # Where a few senders drive a big room they read at once, so
            # their echoes reopen their window without waiting for a round.
            immediate = isinstance(m, Sender) and len(senders) < len(load.members)
            m.start_reading(None if immediate else pacer)
        for snd in senders:
            snd.running = True
        for snd in senders:
            snd.refill()
        control.start()
        await asyncio.sleep(s.warmup)  # load is running; this only times it
        a = meter.snap(received(load.members))
        await asyncio.sleep(s.duration)
        b = meter.snap(received(load.members))
        # Tail: the websockets spot check joins while the load goes on, and
        # every sender sends TAIL more messages that it must all receive.
        joined = None
        if s.spot_check:
            spot = await _spot(server, load.rooms[0], s, load.tls)
            joined = {m.sid: m.sent for m in load.rooms[0].senders}
        tail = [snd.stop_after(TAIL if spot is not None else 0) for snd in senders]
        await asyncio.wait_for(asyncio.gather(*tail), s.drain_timeout)
        windows = control.windows()
        control.stop()
        flow.windows = (windows[0], windows[len(windows) // 2], windows[-1])
        flow.lag_waits = sum(r.lag_waits for r in load.rooms)
        drained = await _drain(load.rooms, spot, joined, s.drain_timeout)
        usage = usage_between(a, b)
        deliveries = (b.received - a.received) // FRAME
        figures = Throughput(
            deliveries=deliveries,
            per_s=deliveries / usage.wall,
            messages_sent=sum(r.sent_total for r in load.rooms),
            flow=flow,
            paced_bytes_per_read=pacer.read_bytes / pacer.reads if pacer.reads else None,
            server_writes=writes_between(a, b),
        )
        return Measured(verdict(load.rooms, spot, server, drained), usage, figures)
    finally:
        control.stop()
        await _teardown(load.members, spot)
        pacer.close()


async def run_latency(
    server: ServerProcess, w: Workload, s: Settings, log: Callable[[str], None]
) -> Measured:
    n, rate = w.params["members"], w.params["rate"]
    room = Room("/latency", 1 << 40)  # open loop: never throttled
    sender = Sender(room, [1], 1, 1, latency=True)
    # Every LATENCY_EVERY-th member (spread over the join order, so early and
    # late positions in the relay's fan-out loop are both sampled) measures
    # latency and is read the moment bytes arrive; the others are read in
    # rounds like fan-out receivers. Reading all 100 at once would make the
    # client, which then pays a syscall per frame, slower than the relay.
    members = [sender] + [
        Member(room, [1], latency=(i % LATENCY_EVERY == 0), stamped=True) for i in range(1, n)
    ]
    timed = [m for m in members if m.verifier.latency]
    pacer = Pacer()
    meter = Meter(server)
    loop = asyncio.get_running_loop()
    spot = None
    ticker: Optional[asyncio.TimerHandle] = None
    try:
        await _open(server, members, s, log)
        spot = await _spot(server, room, s)
        for m in members:
            m.start_reading(None if m.verifier.latency else pacer)
        t0 = time.monotonic()
        interval = 0.001

        # Offered load is fixed: each tick sends what is due by the clock,
        # stamped with the send time, whatever the server's speed.
        def tick() -> None:
            nonlocal ticker
            due = int((time.monotonic() - t0) * rate) + 1 - sender.sent
            if due > 0:
                sender.send_stamped(due)
            ticker = loop.call_later(interval, tick)

        tick()
        await asyncio.sleep(s.warmup)
        a = meter.snap(received(members))
        t_from = time.monotonic_ns()
        await asyncio.sleep(s.duration)
        t_to = time.monotonic_ns()
        b = meter.snap(received(members))
        if ticker is not None:  # stop sending before the drain
            ticker.cancel()
        drained = await _drain([room], spot, None, s.drain_timeout)
        judged = verdict([room], spot, server, drained)
        lat = wire.latency_samples([m.verifier for m in timed], t_from, t_to)
        figures = Latency(
            rate=rate,
            deliveries=(b.received - a.received) // FRAME,
            messages_sent=room.sent_total,
            timed_members=len(timed),
            samples=len(lat),
            p50_ms=wire.percentile(lat, 50) / 1e6,
            p99_ms=wire.percentile(lat, 99) / 1e6,
            max_ms=(float(lat[-1]) / 1e6 if len(lat) else float("nan")),
        )
        return Measured(judged, usage_between(a, b), figures)
    finally:
        if ticker is not None:
            ticker.cancel()
        await _teardown(members, spot)
        pacer.close()


async def run_connections(
    server: ServerProcess, w: Workload, s: Settings, log: Callable[[str], None]
) -> Measured:
    n, size = w.params["clients"], w.params["room_size"]
    meter = Meter(server)
    rooms: list[Room] = []
    members: list[Member] = []
    senders: list[Sender] = []
    for r in range((n + size - 1) // size):
        room = Room("/idle-%d" % r, 1 << 40)
        sid = r + 1
        snd = Sender(room, [sid], sid, 1, buf_size=SMALL_BUF)
        senders.append(snd)
        members.append(snd)
        for _ in range(min(size, n - r * size) - 1):
            members.append(Member(room, [sid], buf_size=SMALL_BUF))
        rooms.append(room)
    spot = None
    pacer = Pacer()
    try:
        rss0 = meter.rss()
        a = meter.snap()
        t0, t1 = await _open(server, members, s, log)
        b = meter.snap()
        rss1 = meter.rss()
        spot = await _spot(server, rooms[0], s)
        for m in members:
            m.start_reading(pacer)
        # Liveness: one message per room must reach every idle member.
        for snd in senders:
            snd.send(1)
        drained = await _drain(rooms, spot, None, s.drain_timeout)
        figures = Handshakes(
            clients=n,
            per_s=n / (t1 - t0),
            rss_before=rss0,
            rss_after=rss1,
            rss_per_conn=(None if rss0 is None or rss1 is None else (rss1 - rss0) / n),
        )
        return Measured(verdict(rooms, spot, server, drained), usage_between(a, b), figures)
    finally:
        await _teardown(members, spot)
        pacer.close()


Runner = Callable[[ServerProcess, Workload, Settings, Callable[[str], None]], Awaitable[Measured]]

RUNNERS: dict[str, Runner] = {
    "fanout": run_fanout,
    "latency": run_latency,
    "rooms": run_rooms,
    "connections": run_connections,
    "wss": run_fanout,  # the fan-out, every connection over TLS
    "large": large.run_large,
}
