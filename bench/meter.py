"""CPU and memory of the load generator, the server and the rest of the
machine, sampled at the edges of a measured window."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .records import Usage
from .servers import ServerProcess

try:
    import psutil
except ImportError:  # pragma: no cover
    psutil = None


@dataclass
class Snapshot:
    t: float  # perf_counter, s
    client_cpu: float  # this process's CPU time, s
    server_cpu: float  # the server tree's CPU time, s
    busy: float  # machine-wide CPU time, s (Meter.busy)
    received: int  # bytes the members had received after their handshakes
    # Time spent runnable but waiting for a CPU (/proc/PID/schedstat), s:
    # a server at 60 % CPU that waited 40 % of the time was not idle, it
    # was queued behind other processes on its core.
    client_runq: float = float("nan")
    server_runq: float = float("nan")
    # write()/writev() calls the server made (syscw in /proc/PID/io; sendmsg
    # and sendto are not counted there): deliveries per write says how well
    # a server that writes through write() batches, TLS transports included.
    server_writes: int | None = None


def usage_between(a: Snapshot, b: Snapshot) -> Usage:
    wall = b.t - a.t
    client = b.client_cpu - a.client_cpu
    server = b.server_cpu - a.server_cpu
    # Everything but the load generator and the server: a busy machine
    # makes any figure moot.
    other = max(0.0, ((b.busy - a.busy) - client - server) / wall)
    return Usage(
        wall=wall,
        client=client / wall,
        server=server / wall,
        other=other,
        client_runq=(b.client_runq - a.client_runq) / wall,
        server_runq=(b.server_runq - a.server_runq) / wall,
    )


def runq_wait(pid: int | str) -> float:
    """Seconds the process's threads have waited on a run queue so far
    (second field of /proc/PID/schedstat, ns; the main thread's, which is
    where an event loop runs); NaN where schedstats are unavailable."""
    try:
        with open("/proc/%s/schedstat" % pid) as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return float("nan")


class Meter:
    """CPU of this process (the load generator) and of the server."""

    def __init__(self, server: ServerProcess) -> None:
        self.ps = psutil.Process(server.pid) if psutil is not None else None

    def _tree(self) -> list:
        # A --server-cmd may be a wrapper (sh -c, taskset, timeout ...):
        # count the whole process tree it started.
        try:
            return [self.ps] + self.ps.children(recursive=True)
        except psutil.Error:
            return [self.ps]

    def server_cpu(self) -> float:
        if self.ps is None:
            return float("nan")
        total = 0.0
        for p in self._tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                if p is self.ps:
                    return float("nan")
        return total

    def server_runq(self) -> float:
        if self.ps is None:
            return float("nan")
        return sum(runq_wait(p.pid) for p in self._tree())

    def server_writes(self) -> int | None:
        if self.ps is None:
            return None
        total = 0
        for p in self._tree():
            try:
                total += p.io_counters().write_count
            except (psutil.Error, AttributeError):
                return None
        return total

    def rss(self) -> int | None:
        if self.ps is None:
            return None
        total = 0
        for p in self._tree():
            try:
                total += p.memory_info().rss
            except psutil.Error:
                if p is self.ps:
                    return None
        return total

    @staticmethod
    def busy() -> float:
        """CPU seconds all processes have spent so far, machine-wide
        (user + nice + system in /proc/stat; irq and softirq time, much of
        it the loopback traffic of this very benchmark, left out). One file
        read: a scan of every process would stall the event loop for tens
        of ms."""
        if psutil is None:
            return float("nan")
        t = psutil.cpu_times()
        return t.user + t.nice + t.system

    def snap(self, received: int = 0) -> Snapshot:
        return Snapshot(
            t=time.perf_counter(),
            client_cpu=time.process_time(),
            server_cpu=self.server_cpu(),
            busy=self.busy(),
            received=received,
            client_runq=runq_wait("self"),
            server_runq=self.server_runq(),
            server_writes=self.server_writes(),
        )
