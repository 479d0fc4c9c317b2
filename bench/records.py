"""What the benchmark measured, as typed records: one RunResult per
(workload, repetition, server) run, one SummaryRow per (workload, server)
over its repetitions, and the RunMeta that says how they were obtained.
The JSON output is these records, as dicts."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .machine import Machine
    from .provenance import CodeState
    from .workloads import Settings, Workload


@dataclass
class Usage:
    """CPU use over a measured window, in CPUs (CPU seconds per wall second)."""

    wall: float  # seconds
    client: float  # the load generator (this process)
    server: float  # the server's whole process tree
    other: float  # everything else on the machine
    # Fraction of the window spent runnable but waiting for a CPU (schedstat).
    client_runq: float = float("nan")
    server_runq: float = float("nan")


@dataclass
class Verdict:
    """Whether every delivery of a run verified, and if not, what went wrong."""

    ok: bool
    errors: list[str] = field(default_factory=list)  # the first few findings
    loss: int = 0  # deliveries expected and never received
    deliveries_expected: int = 0
    deliveries_verified: int = 0
    clients_with_errors: int = 0
    clients_with_loss: int = 0
    spot_check_received: int | None = None  # messages the websockets client got; None: off

    @classmethod
    def failed(cls, error: str) -> Verdict:
        return cls(ok=False, errors=[error])


@dataclass
class Flow:
    """Flow control of a throughput run (see workloads.WindowControl)."""

    window_max: int  # most un-echoed messages per sender
    lag_limit: int  # most messages the slowest member may trail by
    queue_s: float  # queued work a window allows beyond the round trip
    windows: tuple[int, int, int] = (0, 0, 0)  # min, median, max window at the end
    lag_waits: int = 0  # times senders paused for a lagging member


@dataclass
class Throughput:
    """Fan-out and small rooms: deliveries per second."""

    deliveries: int  # in the measured window
    per_s: float
    messages_sent: int  # whole run, tail included
    flow: Flow
    paced_bytes_per_read: float | None  # receivers read in rounds: bytes per recv
    server_writes: int | None = None  # the server's write system calls in the window


@dataclass
class Latency:
    """One sender at a fixed rate: delivery latency at the timed members."""

    rate: int  # offered messages per second
    deliveries: int  # in the measured window, all members
    messages_sent: int
    timed_members: int
    samples: int  # latencies measured in the window
    p50_ms: float
    p99_ms: float
    max_ms: float


@dataclass
class Handshakes:
    """Idle connections: how fast they open, what each one costs in memory."""

    clients: int
    per_s: float
    rss_before: int | None  # server RSS, bytes
    rss_after: int | None
    rss_per_conn: float | None


@dataclass
class Bulk:
    """Large messages: payload bytes delivered per second, server memory."""

    size: int  # payload bytes per message
    deliveries: int  # in the measured window, all members
    per_s: float  # deliveries/s
    bytes_per_s: float  # payload bytes delivered per second, all members
    messages_sent: int
    rss_before: int | None  # server RSS once connected, before the first message
    rss_peak: int | None  # highest sampled (every 50 ms) during the burst
    rss_after: int | None  # 1 s after the last delivery


Figures = Throughput | Latency | Handshakes | Bulk


@dataclass
class Measured:
    """What one workload runner returns."""

    verdict: Verdict
    usage: Usage
    figures: Figures


@dataclass
class RunResult:
    workload: str  # Workload.key
    server: str
    rep: int
    verdict: Verdict
    usage: Usage | None = None  # None when the run failed before measuring
    figures: Figures | None = None
    traceback: str | None = None  # for an unexpected exception in the harness

    def figure(self) -> float | None:
        """The headline: deliveries/s, p99 latency (ms), handshakes/s or bytes/s."""
        f = self.figures
        if isinstance(f, Bulk):
            return f.bytes_per_s
        if isinstance(f, (Throughput, Handshakes)):
            return f.per_s
        if isinstance(f, Latency):
            return f.p99_ms
        return None

    def server_ns_per_delivery(self) -> float | None:
        """Server CPU time per delivery in the measured window; for idle
        connections, per handshake (the unit of work of that workload)."""
        f = self.figures
        if self.usage is not None and isinstance(f, Handshakes) and f.clients:
            return self.usage.server * self.usage.wall / f.clients * 1e9
        if self.usage is None or not isinstance(f, (Throughput, Latency, Bulk)) or not f.deliveries:
            return None
        return self.usage.server * self.usage.wall / f.deliveries * 1e9


@dataclass
class Stats:
    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: list[float | None]) -> Stats | None:
        vals = [v for v in values if v is not None and not math.isnan(v)]
        if not vals:
            return None
        return cls(statistics.median(vals), min(vals), max(vals), len(vals))


@dataclass
class SummaryRow:
    """One (workload, server) over its repetitions."""

    workload: str
    kind: str
    label: str
    server: str
    reps: int
    ok: bool  # every repetition verified
    loss: int  # summed over repetitions
    errors: list[str]
    figure: Stats | None  # see RunResult.figure()
    server_ns_per_delivery: Stats | None
    client_cpu: Stats | None
    server_cpu: Stats | None
    other_cpu: Stats | None
    server_runq: Stats | None = None  # server runnable but waiting for its CPU
    p50_ms: Stats | None = None  # latency
    max_ms: Stats | None = None  # latency
    rss_per_conn: Stats | None = None  # idle connections
    rss_mib: tuple[Stats | None, Stats | None, Stats | None] | None = (
        None  # large: before/peak/after
    )
    vs_fastrelay: float | None = None  # median figure / fastrelay's
    rss_vs_fastrelay: float | None = None


@dataclass
class RunMeta:
    """How a benchmark run was made: what a reader needs to reproduce it."""

    date: str  # UTC, ISO 8601
    command: str
    quick: bool
    servers: list[str]
    reps: int
    pinning: str  # which CPU the server and the load generator were on
    nofile: int  # RLIMIT_NOFILE of the load generator
    numpy: bool  # verification vectorised
    settings: Settings
    machine: Machine
    workloads: list[Workload]
    code: CodeState  # the fastrelay code every fastrelay run of this run ran
    elapsed_s: float = 0.0
