"""`server.workers: N` (N > 1): N worker processes on one port, supervised.

Each worker is a whole relay (`python -m fastrelay.worker`) listening on
the same port with SO_REUSEPORT, so the kernel spreads new connections over
them; the backplane joins their rooms. The supervisor serves no clients. It

- starts the workers and prints the URLs once all of them listen;
- restarts a worker that exits unexpectedly, after a backoff that grows
  while it keeps crashing (logged, counted);
- forwards SIGHUP (log reopen) to every worker; on SIGINT/SIGTERM stops
  them all gracefully (each sends 1001 to its clients) and exits 0 once
  every worker has; a second signal is forwarded too (the workers exit at
  once) and the supervisor exits 130;
- serves the host's one metrics endpoint: at each scrape it asks every
  worker for its counters over the worker's control channel (control.py)
  and exports the sums under the same names. Counters of workers that
  exited are kept, so totals never go backwards;
- serves the publish API there too (`api.enabled`, WorkerRooms): a
  published message goes to exactly one worker, which delivers it to its
  own members and publishes it once to the backplane, which brings it to
  the other workers and hosts; room counts are summed over the workers. A
  worker that is restarting, or does not answer within API_TIMEOUT, is
  left out of the counts and offered no message until it answers again;
  with none left the API answers 503.

Workers run in their own session: a terminal's Ctrl-C reaches the
supervisor only, which then stops them in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import socket
import subprocess
import sys
import zlib
from typing import Any

import uvloop

from ._version import __version__
from .cli import EXIT_INTERRUPTED, EXIT_OK, StartupError, _listen_error, announce
from .config import Config, api_key
from .control import ControlChannel
from .keys import SecretError
from .logs import LogSink
from .metrics import METRICS, MetricsServer, start_metrics_server
from .publish_api import PublishApi, Unavailable

RESTART_MIN_DELAY = 0.5
RESTART_MAX_DELAY = 30.0
STABLE_AFTER = 10.0  # a worker that ran this long starts its backoff afresh
START_TIMEOUT = 30.0  # a worker's start -> it listens
SNAPSHOT_TIMEOUT = 5.0
API_TIMEOUT = 2.0  # a worker's answer to a publish API request
KILL_AFTER = 5.0  # second signal: workers exit at once, or are killed after this
EXIT_WORKER_FAILED = 1  # a worker did not shut down cleanly

# Snapshot keys whose values only grow; gauges (clients now, rooms now...)
# are not carried over from a worker that exited.
COUNTER_KEYS = frozenset(m.key for m in METRICS if m.type == "counter")


def describe_status(status: int) -> str:
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"


def add_into(total: dict[str, Any], snapshot: dict[str, Any], keys: frozenset[str] | None) -> None:
    """Sum `snapshot` into `total`: numbers add up, {label: n} maps per label."""
    for key, value in snapshot.items():
        if keys is not None and key not in keys:
            continue
        if isinstance(value, dict):
            into = total.setdefault(key, {})
            for label, n in value.items():
                into[label] = into.get(label, 0) + n
        else:
            total[key] = total.get(key, 0) + value


@dataclasses.dataclass
class WorkerSlot:
    """One of the N places; its process changes when it is restarted."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    control: ControlChannel | None = None
    started_at: float = 0.0
    crashes: int = 0  # consecutive quick exits, for the backoff
    snapshot: dict[str, Any] | None = None  # its counters at the last scrape
    asking: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    requests: int = 0  # numbers its requests, to tell a late answer from the awaited one
    silent: bool = False  # its last request went unanswered in time
    status: int | None = None  # exit status once stopped for good


class NoAnswer(Exception):
    """A worker is not running (restarting), its channel ended, or it did
    not answer in time; the message says which, `sent` whether the request
    reached its channel."""

    def __init__(self, message: str, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class Supervisor:
    def __init__(self, cfg: Config, sink: LogSink, config_path: str | None, count: int) -> None:
        self.cfg = cfg
        self.sink = sink
        self.log = sink.logger
        self.config_path = config_path
        self.slots = [WorkerSlot(i + 1) for i in range(count)]
        self.worker_cfg = cfg
        self.stop = asyncio.Event()
        self.stopping = False
        self.forced: int | None = None  # the second signal, once received
        self.restarts = 0
        self.retired: dict[str, Any] = {}  # counters of processes that exited

    # -- signals ----------------------------------------------------------------

    def on_stop_signal(self, sig: signal.Signals) -> None:
        if self.stopping:
            self.log.warning("%s during shutdown: workers exit now", sig.name)
            self.forced = sig
            self.signal_workers(sig)
            asyncio.get_running_loop().call_later(KILL_AFTER, self.signal_workers, signal.SIGKILL)
            return
        self.stopping = True
        self.log.info("%s received: stopping %d workers", sig.name, len(self.slots))
        self.stop.set()

    def on_hup(self) -> None:
        try:
            self.sink.reopen()
        except OSError as e:
            self.log.error("SIGHUP: cannot reopen %s: %s", self.sink.output, e.strerror or e)
        self.signal_workers(signal.SIGHUP)
        self.log.info("SIGHUP: log output reopened; forwarded to the workers")

    def signal_workers(self, sig: int) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                slot.proc.send_signal(sig)  # by PID, to a child not yet reaped

    # -- workers ----------------------------------------------------------------

    def reserve_port(self) -> socket.socket | None:
        """With port 0 every worker needs the same free port: bind one here
        (SO_REUSEPORT, never listening, so it gets no connections) and keep
        it for the supervisor's life, so a restarted worker finds it free."""
        server = self.cfg.server
        if server.port != 0:
            return None
        family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
        holder = socket.socket(family, socket.SOCK_STREAM)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            holder.bind((server.host, 0))
        except OSError as e:
            holder.close()
            raise _listen_error(self.sink, "relay", server.host, 0, e) from None
        port = holder.getsockname()[1]
        self.worker_cfg = dataclasses.replace(
            self.cfg, server=dataclasses.replace(server, port=port)
        )
        return holder

    async def start_worker(self, slot: WorkerSlot) -> None:
        """Start the slot's process and return once it listens; StartupError
        with the worker's reason if it cannot."""
        ours, theirs = socket.socketpair()
        with theirs:  # the worker's end: ours to close once it has it
            slot.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "fastrelay.worker",
                str(theirs.fileno()),
                pass_fds=[theirs.fileno()],
                start_new_session=True,
                stdin=subprocess.DEVNULL,
            )
        slot.control = await ControlChannel.open(ours)
        slot.started_at = asyncio.get_running_loop().time()
        slot.control.send("start", self.worker_cfg, slot.index)
        try:
            reply = await asyncio.wait_for(slot.control.receive(), START_TIMEOUT)
        except (asyncio.IncompleteReadError, ConnectionError):
            status = await slot.proc.wait()
            raise StartupError(
                f"worker {slot.index} ended while starting ({describe_status(status)})"
            ) from None
        except asyncio.TimeoutError:
            raise StartupError(
                f"worker {slot.index} did not start listening within {START_TIMEOUT:.0f}s"
            ) from None
        if reply[0] != "ready":
            await slot.proc.wait()
            raise StartupError(reply[1])
        self.log.info("worker %d started (pid %d)", slot.index, slot.proc.pid)

    async def keep_running(self, slot: WorkerSlot) -> None:
        """Restart the slot's worker each time it exits, until the stop."""
        loop = asyncio.get_running_loop()
        while True:
            assert slot.proc is not None
            status = await slot.proc.wait()
            self.retire(slot)
            if self.stopping:
                slot.status = status
                return
            quick = loop.time() - slot.started_at < STABLE_AFTER
            slot.crashes = slot.crashes + 1 if quick else 1
            delay = min(RESTART_MIN_DELAY * 2 ** (slot.crashes - 1), RESTART_MAX_DELAY)
            self.restarts += 1
            self.log.error(
                "worker %d (pid %d) exited unexpectedly (%s); restarting in %.1fs",
                slot.index,
                slot.proc.pid,
                describe_status(status),
                delay,
            )
            try:
                await asyncio.wait_for(self.stop.wait(), delay)
                slot.status = status
                return  # stopping: no restart
            except asyncio.TimeoutError:
                pass
            try:
                await self.start_worker(slot)
            except StartupError as e:
                self.log.error("worker %d could not start: %s", slot.index, e)
                if slot.proc.returncode is None:
                    slot.proc.kill()

    def retire(self, slot: WorkerSlot) -> None:
        if slot.control is not None:
            slot.control.close()
            slot.control = None
        if slot.snapshot is not None:
            add_into(self.retired, slot.snapshot, COUNTER_KEYS)
            slot.snapshot = None

    # -- metrics ----------------------------------------------------------------

    async def refresh(self) -> None:
        """Ask every live worker for its counters (before each scrape)."""
        await asyncio.gather(*(self.ask(slot) for slot in self.slots))

    async def ask(self, slot: WorkerSlot) -> None:
        control = slot.control
        try:
            snapshot = await self.request(slot, SNAPSHOT_TIMEOUT, "snapshot")
        except NoAnswer:
            return  # exiting or stuck: its last counters stand
        if control is not None and slot.control is control:
            slot.snapshot = snapshot

    async def request(self, slot: WorkerSlot, timeout: float, kind: str, *arguments: Any) -> Any:
        """The worker's answer to one request (control.py); NoAnswer if it
        has none within `timeout`. One request at a time per worker."""
        async with slot.asking:
            control = slot.control
            if control is None:
                raise NoAnswer(f"worker {slot.index} is restarting", sent=False)
            slot.requests += 1
            number = slot.requests
            try:
                control.send(kind, number, *arguments)
                answer = await asyncio.wait_for(self._answer_to(control, number), timeout)
            except (asyncio.IncompleteReadError, ConnectionError):
                raise NoAnswer(f"worker {slot.index} exited", sent=True) from None
            except asyncio.TimeoutError:
                if not slot.silent:
                    self.log.warning(
                        "worker %d did not answer within %.1fs (%s)", slot.index, timeout, kind
                    )
                slot.silent = True
                raise NoAnswer(
                    f"worker {slot.index} did not answer within {timeout:g}s", sent=True
                ) from None
            if slot.silent:
                self.log.info("worker %d answers again", slot.index)
                slot.silent = False
            return answer

    @staticmethod
    async def _answer_to(control: ControlChannel, number: int) -> Any:
        # Skips the late answers to requests given up on; bounded by the
        # caller's timeout (and by their number: one per earlier request).
        while True:
            _, answered, value = await control.receive()
            if answered == number:
                return value

    def snapshot(self) -> dict[str, Any]:
        total: dict[str, Any] = {m.key: {} if m.label else 0 for m in METRICS if not m.optional}
        add_into(total, self.retired, None)
        for slot in self.slots:
            if slot.snapshot is not None:
                add_into(total, slot.snapshot, None)
        total["workers"] = sum(1 for s in self.slots if s.control is not None)
        total["worker_restarts_total"] = self.restarts
        return total

    def ready(self) -> bool:
        return not self.stopping and any(s.control is not None for s in self.slots)

    # -- the whole life -----------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self.on_hup)
        self.log.info(
            "fastrelay %s starting %d workers (config: %s)",
            __version__,
            len(self.slots),
            self.config_path or "built-in defaults",
        )
        holder = self.reserve_port()
        try:
            return await self.serve()
        finally:
            if holder is not None:
                holder.close()

    async def serve(self) -> int:
        api = self.publish_api()
        started = await asyncio.gather(
            *(self.start_worker(slot) for slot in self.slots), return_exceptions=True
        )
        failures = [r for r in started if isinstance(r, BaseException)]
        if failures:
            await self.stop_workers()
            raise failures[0]
        keepers = [asyncio.create_task(self.keep_running(slot)) for slot in self.slots]
        metrics = await self.start_metrics(api)
        announce(self.cfg, self.worker_cfg.server.port, metrics, api is not None, self.log)

        await self.stop.wait()
        self.signal_workers(signal.SIGTERM)
        await asyncio.gather(*keepers)
        if metrics is not None:
            await metrics.close()
        if self.forced is not None:
            return EXIT_INTERRUPTED
        unclean = [s for s in self.slots if s.status not in (0, None)]
        for slot in unclean:
            assert slot.status is not None
            self.log.error("worker %d stopped with %s", slot.index, describe_status(slot.status))
        self.log.info("shutdown complete")
        return EXIT_WORKER_FAILED if unclean else EXIT_OK

    def publish_api(self) -> PublishApi | None:
        """The publish API over the workers, when enabled; its key is read
        before any worker starts (checked at load time; files can change)."""
        cfg = self.cfg
        if not (cfg.api.enabled and cfg.metrics.enabled):
            return None
        try:
            key = api_key(cfg.api)
        except SecretError as e:
            raise StartupError(f"api.{e.option}: {e.problem}") from None
        return PublishApi(key, WorkerRooms(self), cfg.relay.max_message_size)

    async def start_metrics(self, api: PublishApi | None) -> MetricsServer | None:
        m = self.cfg.metrics
        if not m.enabled:
            return None
        try:
            return await start_metrics_server(
                m.host, m.port, self.snapshot, self.ready, api=api, refresh=self.refresh
            )
        except OSError as e:
            self.stopping = True
            self.stop.set()
            await self.stop_workers()
            raise _listen_error(self.sink, "metrics", m.host, m.port, e) from None

    async def stop_workers(self) -> None:
        """Startup failed: stop whatever started, gracefully and bounded."""
        self.stopping = True
        self.signal_workers(signal.SIGTERM)
        for slot in self.slots:
            if slot.proc is not None:
                try:
                    await asyncio.wait_for(slot.proc.wait(), self.cfg.timeouts.shutdown + 5)
                except asyncio.TimeoutError:
                    slot.proc.kill()
                    await slot.proc.wait()


class WorkerRooms:
    """The host's rooms for the publish API (publish_api.AsyncRooms), asked
    of the workers over their control channels."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def live(self) -> list[WorkerSlot]:
        live = [slot for slot in self.supervisor.slots if slot.control is not None]
        if not live:
            raise Unavailable(503, "no worker is running (they are restarting); try again")
        return live

    async def publishers(self, room: str) -> list[WorkerSlot]:
        """The workers that may take the room's message, in the order they
        are offered it: the same first one while it runs and answers, so
        that messages published one after the other reach every member in
        that order. A worker that went silent is offered nothing until it
        answers again: when all are silent they are asked once more."""
        slots = self.supervisor.slots
        start = zlib.crc32(room.encode()) % len(slots)
        ordered = [slot for slot in slots[start:] + slots[:start] if slot.control is not None]
        if not ordered:
            self.live()  # raises Unavailable
        if all(slot.silent for slot in ordered):
            await self.each("members", room)  # an answer clears `silent`; none: 503
        return [slot for slot in ordered if not slot.silent]

    async def each(self, kind: str, *arguments: Any) -> list[Any]:
        """The answers of the live workers that answer in time (at least one)."""
        live = self.live()
        answers = await asyncio.gather(*(self._answer(slot, kind, *arguments) for slot in live))
        answered = [answer for answer in answers if answer is not _SILENT]
        if not answered:
            raise Unavailable(503, f"no worker answered within {API_TIMEOUT:g}s; try again")
        return answered

    async def _answer(self, slot: WorkerSlot, kind: str, *arguments: Any) -> Any:
        try:
            return await self.supervisor.request(slot, API_TIMEOUT, kind, *arguments)
        except NoAnswer:
            return _SILENT

    async def publish(self, room: str, text: bool, payload: bytes) -> int:
        """Hands the message to one worker; it delivers it to its members and
        publishes it once to the backplane, which carries it to the other
        workers. Returns the room's members on this host (all workers)."""
        candidates = await self.publishers(room)
        counting = {
            slot.index: asyncio.ensure_future(self._answer(slot, "members", room))
            for slot in candidates[1:]
        }
        try:
            for slot in candidates:
                try:
                    delivered = await self.supervisor.request(
                        slot, API_TIMEOUT, "publish", room, text, payload
                    )
                    break
                except NoAnswer as e:
                    if e.sent:
                        # Never offered to another worker: it may have been published.
                        raise Unavailable(
                            504,
                            f"{e} after taking the message: it may or may not have been "
                            "delivered (not sent again, to avoid duplicates)",
                        ) from None
            else:
                raise Unavailable(503, "no worker is running (they are restarting); try again")
        finally:
            await asyncio.gather(*counting.values())
        # A worker that could not take the message was counted as another.
        others = [task.result() for index, task in counting.items() if index != slot.index]
        return int(delivered) + sum(int(n) for n in others if n is not _SILENT)

    async def room_sizes(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for sizes in await self.each("rooms"):
            for room, members in sizes.items():
                total[room] = total.get(room, 0) + members
        return total

    async def members(self, room: str) -> int:
        return sum(await self.each("members", room))


_SILENT = object()  # a worker left out of an answer


def supervise(cfg: Config, sink: LogSink, config_path: str | None, count: int) -> int:
    return uvloop.run(Supervisor(cfg, sink, config_path, count).run())
