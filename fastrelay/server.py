"""The relay's asyncio side: listening, the timers' sweep, shutdown.

Bytes flow one way: the event loop reads into `_frames.Connection` (a
BufferedProtocol written in Cython), which parses frames and fans messages
out through the `_frames.Hub`. This module only does what happens once per
process or a few times a second: it builds the hub and the upgrade gate,
listens, calls `Hub.sweep` (handshake, close and keepalive deadlines, the
rate-limit window), logs closes at debug level, and shuts down gracefully.
With `backplane.url` set it also runs the Redis backplane (backplane.py)
that shares the hub's rooms with other processes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from importlib import resources
from typing import Any

from . import handshake
from ._frames import CloseCode, Connection, Hub
from .auth import Verifier
from .backplane import RedisBackplane
from .config import Config
from .tls import server_context
from .upgrade import Gate, GateSettings

# The sweep runs this many times per shortest timeout, so a deadline is met
# within a quarter of it; never slower than twice a second.
SWEEPS_PER_TIMEOUT = 4
SWEEP_MAX_INTERVAL = 0.5


def _demo_page() -> bytes:
    return resources.files("fastrelay").joinpath("demo/index.html").read_bytes()


class Relay:
    """A listening relay: start(), snapshot() for metrics, shutdown()."""

    def __init__(self, cfg: Config, log: logging.Logger, *, reuse_port: bool = False) -> None:
        """Raises keys.SecretError when access control is on and its key
        cannot be read (the config loader checked it; files can change)."""
        self.cfg = cfg
        # A worker shares its port with the others (SO_REUSEPORT).
        self.reuse_port = reuse_port
        self.log = log
        self.gate = Gate(
            GateSettings(
                limits=handshake.Limits(
                    max_head=cfg.limits.max_request_head,
                    max_headers=cfg.limits.max_headers,
                    allowed_origins=tuple(cfg.limits.allowed_origins),
                    compression=cfg.relay.compression,
                ),
                max_connections=cfg.limits.max_connections,
                demo_page=_demo_page() if cfg.relay.serve_demo else None,
                verifier=Verifier.from_config(cfg.auth) if cfg.auth.enabled else None,
            ),
            log,
        )
        self.hub: Hub | None = None
        self.backplane: RedisBackplane | None = None
        self.server: asyncio.Server | None = None
        self.port = 0
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def accepting(self) -> bool:
        return self.server is not None and self.gate.accepting

    def _ssl_context(self) -> ssl.SSLContext | None:
        tls = self.cfg.server.tls
        return server_context(tls) if tls.enabled else None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        timeouts = cfg.timeouts
        hub = self.hub = Hub(
            loop,
            self.gate,
            echo=cfg.relay.echo,
            max_message_size=cfg.relay.max_message_size,
            max_backlog=cfg.limits.max_backlog,
            slow_client_policy=cfg.limits.slow_client_policy,
            max_messages_per_second=cfg.limits.max_messages_per_second,
            handshake_timeout=timeouts.handshake,
            close_timeout=timeouts.close,
            ping_interval=timeouts.ping_interval,
            ping_timeout=timeouts.ping_timeout,
            slow_client_timeout=timeouts.slow_client,
        )
        self.gate.clock = loop.time
        if self.log.isEnabledFor(logging.DEBUG):
            hub.close_log = self._log_close
        limits = self.gate.settings.limits
        hub.fast_upgrade = self.gate.allows_fast_path()
        hub.fast_needs_grant = self.gate.settings.verifier is not None
        hub.max_connections = self.gate.settings.max_connections
        hub.max_request_head = limits.max_head
        hub.max_headers = limits.max_headers
        hub.compression = limits.compression
        if cfg.backplane.url:
            self.backplane = RedisBackplane(cfg.backplane, hub, self.log)
            hub.backplane = self.backplane
        self.server = await loop.create_server(
            functools.partial(Connection, hub),
            host=cfg.server.host,
            port=cfg.server.port,
            ssl=self._ssl_context(),
            reuse_address=True,
            reuse_port=self.reuse_port or None,
            backlog=4096,
            # Bound, not accepting yet: with a backplane, the first attempt
            # to reach Redis comes first (below).
            start_serving=False,
        )
        self.port = self.server.sockets[0].getsockname()[1]
        if self.backplane is not None:
            # Started once bound (a relay that cannot listen has nothing to
            # stop). Clients are taken once the first session is up or has
            # failed: a client admitted before would have its first messages
            # dropped for the other processes. Without Redis local rooms work
            # as they do alone, and the backplane keeps retrying.
            self.backplane.start()
            await self.backplane.first_attempt()
        await self.server.start_serving()
        shortest = min(
            timeouts.handshake, timeouts.close, timeouts.ping_timeout, timeouts.slow_client
        )
        self._sweep_interval = min(shortest / SWEEPS_PER_TIMEOUT, SWEEP_MAX_INTERVAL)
        self._sweeper = loop.call_later(self._sweep_interval, self._sweep)

    def _sweep(self) -> None:
        assert self.hub is not None
        loop = asyncio.get_running_loop()
        timed_out = self.hub.sweep(loop.time())
        if timed_out:
            self.gate.count_failure("timeout", timed_out)
            self.log.debug("%d handshakes timed out", timed_out)
        self._sweeper = loop.call_later(self._sweep_interval, self._sweep)

    def _log_close(self, conn: Connection, code: int, reason: str, by_peer: bool) -> None:
        # Per connection, so debug only; the hub counts closes by code.
        self.log.debug(
            "closing %s: %d %s (%s)", conn.peer, code, reason, "by peer" if by_peer else "by server"
        )

    # -- the publish API's view of the rooms (publish_api.Rooms) --

    def publish(self, room: str, text: bool, payload: bytes) -> int:
        """Deliver a message from outside to the room's members here;
        returns how many got it. ValueError above relay.max_message_size."""
        return self.hub.publish(room, text, payload) if self.hub is not None else 0

    def room_sizes(self) -> dict[str, int]:
        rooms = self.hub.rooms if self.hub is not None else {}
        return {name: len(room) for name, room in rooms.items()}

    def members(self, room: str) -> int:
        found = self.hub.rooms.get(room) if self.hub is not None else None
        return len(found) if found is not None else 0

    def snapshot(self) -> dict[str, Any]:
        values = self.hub.counters() if self.hub is not None else {}
        values["handshake_failures"] = dict(self.gate.failures)
        if self.backplane is not None:
            values.update(self.backplane.counters())
        return values

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, send 1001 to everyone, wait for their close frames
        up to `timeout`, then drop whoever is left."""
        self.gate.accepting = False
        if self.server is not None:
            self.server.close()
        hub = self.hub
        if hub is not None:
            all_gone = hub.all_gone = asyncio.Event()
            if hub.clients_count == 0:
                all_gone.set()
            hub.close_all(CloseCode.GOING_AWAY, "server shutting down")
            try:
                await asyncio.wait_for(all_gone.wait(), timeout)
            except asyncio.TimeoutError:
                self.log.warning(
                    "%d clients did not close within %.1fs; dropping them",
                    hub.clients_count,
                    timeout,
                )
                hub.abort_all()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.backplane is not None:
            await self.backplane.close()
