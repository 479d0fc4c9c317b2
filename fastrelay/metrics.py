"""Prometheus metrics and health checks on their own HTTP port, the private
listener that also carries the publish API (publish_api.py) when enabled.

The relay keeps plain integer counters; this module reads them only when
scraped, through a custom collector over a `snapshot()` callable, so counting
costs the hot path nothing (prometheus_client's Counter.inc() takes a lock).

The HTTP side is deliberately tiny: one request per connection, a bounded
request head and a deadline, then the connection closes. Its own paths are
GET/HEAD only; the paths of an `ApiHandler` get the request (and may read a
body) themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

from prometheus_client import (
    CollectorRegistry,
    ProcessCollector,
    exposition,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

Snapshot = Callable[[], Mapping[str, Any]]
Refresh = Callable[[], Awaitable[None]]

log = logging.getLogger("fastrelay.metrics")

# generate_latest() writes the 0.0.4 text format; newer prometheus_client
# versions name that content type explicitly, older ones call it LATEST.
CONTENT_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)


@dataclass(frozen=True)
class MetricDef:
    name: str  # exposed name, exactly
    type: Literal["gauge", "counter"]
    key: str  # snapshot key
    label: str | None  # for labelled metrics: the snapshot value is {label value: count}
    help: str
    # Exported only when the snapshot has the key: the backplane's metrics
    # (with backplane.url) and the supervisor's (with server.workers > 1).
    optional: bool = False


# The table of exported metrics; the README table is generated from it.
METRICS = (
    MetricDef(
        "websocket_connected_clients",
        "gauge",
        "connected_clients",
        None,
        "Clients connected now.",
    ),
    MetricDef(
        "websocket_messages_total",
        "counter",
        "messages_total",
        None,
        "Messages received from clients and relayed to their room.",
    ),
    MetricDef(
        "websocket_connections_total",
        "counter",
        "connections_total",
        None,
        "WebSocket connections established (successful upgrades).",
    ),
    MetricDef(
        "websocket_disconnections_total",
        "counter",
        "disconnections_total",
        None,
        "WebSocket connections ended, for any reason.",
    ),
    MetricDef(
        "websocket_deliveries_total",
        "counter",
        "deliveries_total",
        None,
        "Messages written to clients (one message to a room of n members counts n).",
    ),
    MetricDef(
        "websocket_received_bytes_total",
        "counter",
        "bytes_received_total",
        None,
        "Bytes read from clients' sockets.",
    ),
    MetricDef(
        "websocket_sent_bytes_total",
        "counter",
        "bytes_sent_total",
        None,
        "Bytes written to clients' sockets.",
    ),
    MetricDef("websocket_rooms", "gauge", "rooms", None, "Rooms with at least one member now."),
    MetricDef(
        "websocket_handshake_failures_total",
        "counter",
        "handshake_failures",
        "reason",
        "Upgrade requests refused, by reason.",
    ),
    MetricDef(
        "websocket_closes_total",
        "counter",
        "closes",
        "code",
        "Close frames sent or received, by close code.",
    ),
    MetricDef(
        "websocket_slow_client_disconnects_total",
        "counter",
        "slow_client_disconnects_total",
        None,
        "Clients disconnected because their backlog exceeded limits.max_backlog.",
    ),
    MetricDef(
        "websocket_slow_client_drops_total",
        "counter",
        "slow_client_drops_total",
        None,
        "Messages not delivered to a client whose backlog exceeded limits.max_backlog "
        "(policy drop).",
    ),
    MetricDef(
        "websocket_protocol_errors_total",
        "counter",
        "protocol_errors_total",
        None,
        "Connections closed for a protocol violation (1002, 1007, 1009).",
    ),
    MetricDef(
        "websocket_backplane_connected",
        "gauge",
        "backplane_connected",
        None,
        "1 while connected to the Redis backplane (with workers: how many workers are).",
        optional=True,
    ),
    MetricDef(
        "websocket_backplane_published_total",
        "counter",
        "backplane_published_total",
        None,
        "Messages of local clients published to the backplane.",
        optional=True,
    ),
    MetricDef(
        "websocket_backplane_received_total",
        "counter",
        "backplane_received_total",
        None,
        "Messages of other processes received from the backplane.",
        optional=True,
    ),
    MetricDef(
        "websocket_backplane_dropped_total",
        "counter",
        "backplane_dropped_total",
        None,
        "Messages of local clients not published (backplane down, or its queue full); "
        "local members still got them.",
        optional=True,
    ),
    MetricDef(
        "websocket_backplane_reconnects_total",
        "counter",
        "backplane_reconnects_total",
        None,
        "Times the backplane connection was lost and made again.",
        optional=True,
    ),
    MetricDef(
        "websocket_backplane_queued_bytes",
        "gauge",
        "backplane_queued_bytes",
        None,
        "Bytes of messages waiting to be published (bounded by backplane.max_queue_bytes).",
        optional=True,
    ),
    MetricDef(
        "websocket_workers",
        "gauge",
        "workers",
        None,
        "Worker processes running now (server.workers > 1).",
        optional=True,
    ),
    MetricDef(
        "websocket_worker_restarts_total",
        "counter",
        "worker_restarts_total",
        None,
        "Workers started again after exiting unexpectedly (server.workers > 1).",
        optional=True,
    ),
)


class RelayCollector(Collector):
    """Reads the relay's counters at scrape time.

    Every key of METRICS must be in the snapshot (optional ones may be
    absent, and are then not exported): a missing one raises
    KeyError, which fails the scrape (500, logged) rather than exporting a 0
    that looks like a real value.
    """

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        for m in METRICS:
            if m.optional and m.key not in snap:
                continue
            family_cls = GaugeMetricFamily if m.type == "gauge" else CounterMetricFamily
            # CounterMetricFamily strips a trailing "_total" from the family
            # name and adds it back to the sample, so `m.name` is exposed as is.
            if m.label is None:
                yield family_cls(m.name, m.help, value=snap[m.key])
                continue
            family = family_cls(m.name, m.help, labels=[m.label])
            by_label = snap[m.key]
            for label_value in sorted(by_label, key=str):
                family.add_metric([str(label_value)], by_label[label_value])
            yield family


def build_registry(snapshot: Snapshot) -> CollectorRegistry:
    """A private registry: the relay's metrics plus process CPU/memory/fds."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(snapshot))
    ProcessCollector(registry=registry)
    return registry


def url_host(host: str) -> str:
    """`host` as written in a URL: IPv6 literals need brackets."""
    return f"[{host}]" if ":" in host else host


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class Response(NamedTuple):
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()  # e.g. Allow, WWW-Authenticate


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # as received, percent-encoded, without the query
    query: str
    headers: Mapping[str, tuple[str, ...]]  # lower-case names

    def header(self, name: str) -> str | None:
        """The value of a header sent once; None when absent or repeated."""
        values = self.headers.get(name, ())
        return values[0] if len(values) == 1 else None


# Reads exactly n bytes of the request body (bounded by the request timeout).
BodyReader = Callable[[int], Awaitable[bytes]]


class ApiHandler(Protocol):
    """Paths served by someone else on this listener (the publish API)."""

    def handles(self, path: str) -> bool: ...

    async def respond(self, request: Request, read_body: BodyReader) -> Response: ...


_ALLOW_OWN = (("Allow", "GET, HEAD"),)


class MetricsServer:
    """The running listener; create it with start_metrics_server()."""

    def __init__(
        self,
        host: str,
        snapshot: Snapshot,
        ready: Callable[[], bool],
        request_timeout: float,
        max_request_head: int,
        api: ApiHandler | None = None,
        refresh: Refresh | None = None,
    ) -> None:
        self.host = host
        self._api = api
        self._refresh = refresh
        self._registry = build_registry(snapshot)
        self._ready = ready
        self._request_timeout = request_timeout
        self._max_request_head = max_request_head
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{url_host(self.host)}:{self.port}/metrics"

    async def _start(self, port: int) -> None:
        # `limit` bounds the StreamReader buffer, hence the request head.
        self._server = await asyncio.start_server(
            self._handle, self.host, port, limit=self._max_request_head
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and end the requests in progress."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            response, head_only = await self._read_and_route(reader, writer)
            writer.write(_serialize(response, head_only))
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client left, or we are closing: nothing to answer
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _read_and_route(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[Response, bool]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._request_timeout)
        except asyncio.TimeoutError:
            return Response(408, b"request timeout\n"), False
        except asyncio.LimitOverrunError:
            return Response(431, b"request head too large\n"), False
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                raise ConnectionResetError from None  # connected and left
            return Response(400, b"incomplete request\n"), False
        request = _parse_head(head)
        if request is None:
            return Response(400, b"bad request\n"), False
        head_only = request.method == "HEAD"
        if self._api is not None and self._api.handles(request.path):

            async def read_body(n: int) -> bytes:
                if (request.header("expect") or "").lower() == "100-continue":
                    # The client waits for this before sending the body (RFC 9110 §10.1.1).
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await writer.drain()
                return await asyncio.wait_for(reader.readexactly(n), self._request_timeout)

            try:
                return await self._api.respond(request, read_body), head_only
            except asyncio.TimeoutError:
                return Response(408, b"request timeout\n"), False
            except asyncio.IncompleteReadError:
                raise ConnectionResetError from None  # left before the whole body
        if request.method not in ("GET", "HEAD"):
            return Response(405, b"method not allowed\n", headers=_ALLOW_OWN), False
        if request.path == "/metrics" and self._refresh is not None:
            await self._refresh()
        return self._route(request.path), head_only

    def _route(self, path: str) -> Response:
        if path == "/metrics":
            try:
                return Response(200, generate_latest(self._registry), CONTENT_TYPE)
            except Exception:
                # A bug in snapshot() must not take the listener down, and
                # the scraper should see a failed scrape, not stale zeros.
                log.exception("metrics scrape failed")
                return Response(500, b"scrape failed\n")
        if path == "/healthz":
            return Response(200, b"ok")
        if path == "/readyz":
            return Response(200, b"ready") if self._ready() else Response(503, b"not ready")
        return Response(404, b"not found\n")


def _parse_head(head: bytes) -> Request | None:
    """The request line and header fields; None when the request line is
    malformed. Field lines without a name and a colon are skipped: nothing
    here forwards the request, so there is no other reader to disagree with."""
    request_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    method, target, _ = parts
    headers: dict[str, tuple[str, ...]] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            continue
        key = name.lower()
        headers[key] = (*headers.get(key, ()), value.strip(" \t"))
    path, _, query = target.partition("?")
    return Request(method, path, query, headers)


def _serialize(response: Response, head_only: bool) -> bytes:
    headers = [
        f"HTTP/1.1 {response.status} {_REASONS[response.status]}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    headers += [f"{name}: {value}" for name, value in response.headers]
    head = ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body


async def start_metrics_server(
    host: str,
    port: int,
    snapshot: Snapshot,
    ready: Callable[[], bool],
    *,
    request_timeout: float = 10.0,
    max_request_head: int = 8192,
    api: ApiHandler | None = None,
    refresh: Refresh | None = None,
) -> MetricsServer:
    """Listen on host:port (0 = a free port) and serve /metrics, /healthz, /readyz,
    and the paths `api` handles.

    `snapshot()` is called on each scrape of /metrics; `ready()` on each
    request to /readyz (200 while true, 503 otherwise). `refresh()`, when
    given, is awaited before each scrape (the supervisor gathers its
    workers' counters). Raises OSError when the address cannot be bound.
    """
    server = MetricsServer(host, snapshot, ready, request_timeout, max_request_head, api, refresh)
    await server._start(port)
    return server
