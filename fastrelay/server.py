"""The relay's asyncio side: listening, the upgrade, timers, shutdown.

Bytes flow one way: the event loop reads into `_frames.Connection` (a
BufferedProtocol written in Cython), which parses frames and fans messages
out. This module only handles what happens once per connection: the HTTP
upgrade (through `handshake`), timeouts, keepalive, logging of opens and
closes, and the graceful shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from importlib import resources
from typing import Any

from . import handshake
from ._frames import STATE_OPEN, Connection, Hub

# Close codes used here (RFC 6455 §7.4.1).
GOING_AWAY = 1001
INTERNAL_ERROR = 1011


def _demo_page() -> bytes:
    return resources.files("fastrelay").joinpath("demo/index.html").read_bytes()


class RelayProtocol(Connection):
    """One client connection; the Cython base class does the per-frame work."""

    def __init__(self, relay: Relay) -> None:
        super().__init__(relay.hub)
        self.relay = relay
        self.scan_from = 0
        self.peer = "?"
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        relay = self.relay
        relay.protocols.add(self)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = f"{peer[0]}:{peer[1]}"
        self.timer = relay.loop.call_later(relay.cfg.timeouts.handshake, self._handshake_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        was_open = self.state == STATE_OPEN
        super().connection_lost(exc)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        relay = self.relay
        relay.protocols.discard(self)
        if was_open:
            relay.log.debug("connection %s lost without a close frame", self.peer)
        if not relay.protocols and relay.all_gone is not None:
            relay.all_gone.set()

    def handle_request(self, head: memoryview) -> None:
        relay = self.relay
        result = handshake.parse_request(head, self.scan_from, relay.limits)
        if isinstance(result, handshake.Incomplete):
            self.scan_from = result.scan_from
            return
        if isinstance(result, handshake.Accept):
            if relay.max_connections and relay.hub.connected >= relay.max_connections:
                result = handshake.refuse("too_many_connections", "connection limit reached")
            elif not relay.accepting:
                result = handshake.refuse("too_many_connections", "shutting down")
            else:
                self._cancel_timer()
                self.accept(result.room, result.response, result.consumed, result.deflate)
                relay.log.debug("connection %s joined room %s", self.peer, result.room)
                return
        if isinstance(result, handshake.PlainGet):
            if relay.demo_page is None:
                result = handshake.refuse("upgrade_required", "this is a WebSocket endpoint",
                                          handshake.UPGRADE_HEADERS)
            else:
                self._cancel_timer()
                self.reject(handshake.http_response(200, "OK", relay.demo_page,
                                                    "text/html; charset=utf-8"))
                return
        self._cancel_timer()
        relay.count_handshake_failure(result.reason)
        relay.log.debug("handshake from %s refused: %d %s", self.peer, result.status, result.detail)
        self.reject(result.response)

    def on_close(self, code: int, reason: str, by_peer: bool) -> None:
        relay = self.relay
        # Per connection, so debug; protocol errors are counted in metrics.
        relay.log.debug("closing %s: %d %s (%s)", self.peer, code, reason,
                        "by peer" if by_peer else "by server")
        if not by_peer and self.timer is None:
            # We sent the close: wait for the peer's, then drop it anyway.
            self.timer = relay.loop.call_later(relay.cfg.timeouts.close, self.abort)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _handshake_timeout(self) -> None:
        self.timer = None
        self.relay.count_handshake_failure("timeout")
        self.relay.log.debug("handshake from %s timed out", self.peer)
        self.abort()


class Relay:
    """A listening relay: start(), snapshot() for metrics, shutdown()."""

    def __init__(self, cfg: Any, log: logging.Logger) -> None:
        self.cfg = cfg
        self.log = log
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.hub: Hub = None  # type: ignore[assignment]
        self.server: asyncio.base_events.Server | None = None
        self.protocols: set[RelayProtocol] = set()
        self.all_gone: asyncio.Event | None = None
        self.accepting = False
        self.handshake_failures: dict[str, int] = {}
        self.limits = handshake.Limits(
            max_head=cfg.limits.max_request_head,
            max_headers=cfg.limits.max_headers,
            allowed_origins=tuple(cfg.limits.allowed_origins),
            compression=cfg.relay.compression,
        )
        self.max_connections = cfg.limits.max_connections
        self.demo_page = _demo_page() if cfg.relay.serve_demo else None
        self.port = 0
        self._keepalive: asyncio.TimerHandle | None = None
        self._rate_window: asyncio.TimerHandle | None = None

    @property
    def url(self) -> str:
        scheme = "wss" if self.cfg.server.tls.enabled else "ws"
        host = self.cfg.server.host
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.port}/"

    def _ssl_context(self) -> ssl.SSLContext | None:
        tls = self.cfg.server.tls
        if not tls.enabled:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls.cert_file, tls.key_file)
        return context

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.hub = Hub(
            self.loop,
            echo=self.cfg.relay.echo,
            max_message_size=self.cfg.relay.max_message_size,
            max_backlog=self.cfg.limits.max_backlog,
            slow_client_policy=self.cfg.limits.slow_client_policy,
            max_messages_per_second=self.cfg.limits.max_messages_per_second,
        )
        self.server = await self.loop.create_server(
            lambda: RelayProtocol(self),
            host=self.cfg.server.host,
            port=self.cfg.server.port,
            ssl=self._ssl_context(),
            reuse_address=True,
            backlog=4096,
        )
        self.port = self.server.sockets[0].getsockname()[1]
        self.accepting = True
        if self.cfg.timeouts.ping_interval > 0:
            self._keepalive = self.loop.call_later(self.cfg.timeouts.ping_interval, self._ping_all)
        if self.cfg.limits.max_messages_per_second:
            self._tick()

    def _tick(self) -> None:
        self.hub.tick()
        self._rate_window = self.loop.call_later(1.0, self._tick)

    def count_handshake_failure(self, reason: str) -> None:
        self.handshake_failures[reason] = self.handshake_failures.get(reason, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        values = self.hub.counters() if self.hub is not None else {}
        values["handshake_failures"] = dict(self.handshake_failures)
        return values

    def _ping_all(self) -> None:
        """Keepalive: ping every open client that has no ping outstanding;
        ping_timeout later, close those that have not answered (half-open
        connections never do)."""
        timeouts = self.cfg.timeouts
        pinged = [p for p in self.protocols if p.state == STATE_OPEN and p.pong_received]
        for protocol in pinged:
            protocol.send_ping(b"")
        self.loop.call_later(timeouts.ping_timeout, self._reap, pinged)
        self._keepalive = self.loop.call_later(timeouts.ping_interval, self._ping_all)

    def _reap(self, pinged: list[RelayProtocol]) -> None:
        for protocol in pinged:
            if protocol.state == STATE_OPEN and not protocol.pong_received:
                protocol.close(INTERNAL_ERROR, "keepalive ping timeout")

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, send 1001 to everyone, wait for their close frames
        up to `timeout`, then drop whoever is left."""
        self.accepting = False
        for timer in (self._keepalive, self._rate_window):
            if timer is not None:
                timer.cancel()
        if self.server is not None:
            self.server.close()
        self.all_gone = asyncio.Event()
        if not self.protocols:
            self.all_gone.set()
        for protocol in list(self.protocols):
            protocol.close(GOING_AWAY, "server shutting down")
        try:
            await asyncio.wait_for(self.all_gone.wait(), timeout)
        except asyncio.TimeoutError:
            self.log.warning("%d clients did not close within %.1fs; dropping them",
                             len(self.protocols), timeout)
            for protocol in list(self.protocols):
                protocol.abort()
