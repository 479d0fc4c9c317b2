"""The metrics collector and its HTTP listener, on real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import errno
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fastrelay._frames import Hub
from fastrelay.metrics import (
    METRICS,
    MetricsServer,
    build_registry,
    start_metrics_server,
)

# Every await in these tests is bounded by this, so a bug fails, not hangs.
BOUND = 5.0

FULL_SNAPSHOT = {
    "connected_clients": 3,
    "messages_total": 10,
    "connections_total": 5,
    "disconnections_total": 2,
    "deliveries_total": 30,
    "bytes_received_total": 1000,
    "bytes_sent_total": 3000,
    "rooms": 2,
    "handshake_failures": {"bad_request": 1, "forbidden_origin": 4},
    "closes": {1000: 2, 1001: 1},
    "slow_client_disconnects_total": 1,
    "slow_client_drops_total": 7,
    "protocol_errors_total": 1,
    # With a backplane (Relay.snapshot adds them) and workers (the supervisor).
    "backplane_connected": 1,
    "backplane_published_total": 9,
    "backplane_received_total": 4,
    "backplane_dropped_total": 1,
    "backplane_reconnects_total": 2,
    "backplane_queued_bytes": 0,
    "workers": 2,
    "worker_restarts_total": 1,
}


# Counted by the server, which parses the upgrade in Python, and added by
# Relay.snapshot() to Hub.counters(); every other metric reads a Hub counter.
SERVER_KEYS = {"handshake_failures"}


def hub_counters() -> dict[str, Any]:
    """counters() of a real, fresh Hub."""
    loop = asyncio.new_event_loop()
    try:
        return Hub(loop).counters()
    finally:
        loop.close()


def exposition(snapshot: dict[str, Any]) -> str:
    return generate_latest(build_registry(lambda: snapshot)).decode()


def sample(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} not in exposition"
    return float(match.group(1))


# --- the keys: Hub.counters() and the metrics table ---


def test_hub_counters_and_the_metrics_table_name_the_same_keys():
    counter_keys = set(hub_counters())
    # Optional metrics come from the backplane or the supervisor, not the hub.
    table_keys = {m.key for m in METRICS if not m.optional}
    assert counter_keys - table_keys == set(), "Hub counters that no metric exports"
    assert table_keys - SERVER_KEYS - counter_keys == set(), "metrics reading keys Hub lacks"
    assert SERVER_KEYS.isdisjoint(counter_keys)


def test_a_real_hub_snapshot_is_exported_whole():
    snapshot = {**hub_counters(), "handshake_failures": {}}
    required = [m for m in METRICS if not m.optional]
    for m in required:
        # Labelled metrics read a {label value: count} mapping, the others a number.
        assert isinstance(snapshot[m.key], dict) == (m.label is not None), m.key
    text = exposition(snapshot)
    for m in METRICS:
        # Without a backplane or workers their metrics are not exported at all.
        assert (f"# TYPE {m.name} {m.type}\n" in text) == (not m.optional), m.name
    for m in required:
        if m.label is None:
            assert sample(text, m.name) == 0


def test_the_full_snapshot_used_here_has_exactly_the_table_keys():
    assert set(FULL_SNAPSHOT) == {m.key for m in METRICS}


# --- the collector ---


def test_the_four_predecessor_metrics_have_their_exact_names_and_types():
    text = exposition(FULL_SNAPSHOT)
    assert "# TYPE websocket_connected_clients gauge\n" in text
    assert "# TYPE websocket_messages_total counter\n" in text
    assert "# TYPE websocket_connections_total counter\n" in text
    assert "# TYPE websocket_disconnections_total counter\n" in text
    assert sample(text, "websocket_connected_clients") == 3
    assert sample(text, "websocket_messages_total") == 10
    assert sample(text, "websocket_connections_total") == 5
    assert sample(text, "websocket_disconnections_total") == 2
    # CounterMetricFamily must not have produced doubled or created series.
    assert "_total_total" not in text and "_created" not in text


def test_every_metric_is_exposed_with_its_value():
    text = exposition(FULL_SNAPSHOT)
    for m in METRICS:
        assert f"# TYPE {m.name} {m.type}\n" in text
    assert sample(text, "websocket_deliveries_total") == 30
    assert sample(text, "websocket_received_bytes_total") == 1000
    assert sample(text, "websocket_sent_bytes_total") == 3000
    assert sample(text, "websocket_rooms") == 2
    assert sample(text, "websocket_handshake_failures_total", '{reason="bad_request"}') == 1
    assert sample(text, "websocket_handshake_failures_total", '{reason="forbidden_origin"}') == 4
    assert sample(text, "websocket_closes_total", '{code="1000"}') == 2
    assert sample(text, "websocket_closes_total", '{code="1001"}') == 1
    assert sample(text, "websocket_slow_client_disconnects_total") == 1
    assert sample(text, "websocket_slow_client_drops_total") == 7
    assert sample(text, "websocket_protocol_errors_total") == 1


def test_output_parses_as_prometheus_text():
    families = {f.name: f for f in text_string_to_metric_families(exposition(FULL_SNAPSHOT))}
    # The parser names counter families without their _total suffix.
    assert families["websocket_messages"].type == "counter"
    assert families["websocket_connected_clients"].type == "gauge"
    closes = {s.labels["code"]: s.value for s in families["websocket_closes"].samples}
    assert closes == {"1000": 2, "1001": 1}


OPTIONAL_KEYS = {m.key for m in METRICS if m.optional}


@pytest.mark.parametrize("key", sorted(set(FULL_SNAPSHOT) - OPTIONAL_KEYS))
def test_a_missing_key_fails_the_scrape_instead_of_reading_zero(key):
    incomplete = {k: v for k, v in FULL_SNAPSHOT.items() if k != key}
    with pytest.raises(KeyError, match=key):
        exposition(incomplete)


@pytest.mark.parametrize("key", sorted(OPTIONAL_KEYS))
def test_an_optional_key_missing_leaves_only_its_metric_out(key):
    (metric,) = [m for m in METRICS if m.key == key]
    incomplete = {k: v for k, v in FULL_SNAPSHOT.items() if k != key}
    text = exposition(incomplete)
    assert f"# TYPE {metric.name} " not in text
    assert sample(exposition(FULL_SNAPSHOT), metric.name) == FULL_SNAPSHOT[key]


def test_an_empty_label_mapping_exports_the_family_without_samples():
    text = exposition({**FULL_SNAPSHOT, "closes": {}})
    assert "# TYPE websocket_closes_total counter\n" in text
    assert "websocket_closes_total{" not in text


def test_every_handshake_failure_reason_present_is_exported():
    text = exposition({**FULL_SNAPSHOT, "handshake_failures": {"some_new_reason": 2}})
    assert sample(text, "websocket_handshake_failures_total", '{reason="some_new_reason"}') == 2


def test_values_are_read_at_scrape_time():
    counters = {**FULL_SNAPSHOT, "messages_total": 1}
    registry = build_registry(lambda: counters)
    assert sample(generate_latest(registry).decode(), "websocket_messages_total") == 1
    counters["messages_total"] = 42
    assert sample(generate_latest(registry).decode(), "websocket_messages_total") == 42


def test_registry_is_private():
    from prometheus_client import REGISTRY

    build_registry(lambda: FULL_SNAPSHOT)
    assert "websocket_messages_total" not in generate_latest(REGISTRY).decode()


# --- the HTTP listener ---


def run(
    body: Callable[[MetricsServer], Awaitable[None]],
    snapshot=lambda: FULL_SNAPSHOT,
    ready=lambda: True,
    **kwargs,
) -> None:
    """Start a listener on a free port, run `body` against it, close it."""

    async def main() -> None:
        server = await start_metrics_server("127.0.0.1", 0, snapshot, ready, **kwargs)
        try:
            await asyncio.wait_for(body(server), BOUND)
        finally:
            await asyncio.wait_for(server.close(), BOUND)

    asyncio.run(main())


async def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the whole response (the server closes), parse it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    data = await asyncio.wait_for(reader.read(), BOUND)  # EOF: Connection: close
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split(" ")[1]), headers, body


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


def test_metrics_endpoint():
    async def body(server: MetricsServer) -> None:
        status, headers, payload = await exchange(server.port, get("/metrics"))
        assert status == 200
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        assert headers["connection"] == "close"
        assert int(headers["content-length"]) == len(payload)
        assert sample(payload.decode(), "websocket_messages_total") == 10

    run(body)


def test_query_string_is_ignored():
    async def body(server: MetricsServer) -> None:
        assert (await exchange(server.port, get("/metrics?x=1")))[0] == 200

    run(body)


def test_healthz():
    async def body(server: MetricsServer) -> None:
        status, _, payload = await exchange(server.port, get("/healthz"))
        assert (status, payload) == (200, b"ok")

    run(body)


def test_readyz_follows_ready():
    state = {"ready": True}

    async def body(server: MetricsServer) -> None:
        assert (await exchange(server.port, get("/readyz")))[0] == 200
        state["ready"] = False
        status, _, payload = await exchange(server.port, get("/readyz"))
        assert (status, payload) == (503, b"not ready")

    run(body, ready=lambda: state["ready"])


def test_unknown_path_is_404():
    async def body(server: MetricsServer) -> None:
        assert (await exchange(server.port, get("/nope")))[0] == 404

    run(body)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_are_405(method):
    async def body(server: MetricsServer) -> None:
        status, headers, _ = await exchange(server.port, get("/metrics", method))
        assert status == 405 and headers["allow"] == "GET, HEAD"

    run(body)


def test_head_has_headers_but_no_body():
    async def body(server: MetricsServer) -> None:
        status, headers, payload = await exchange(server.port, get("/metrics", "HEAD"))
        assert status == 200 and int(headers["content-length"]) > 0 and payload == b""

    run(body)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /metrics\r\n\r\n",
        b"GET /metrics SPDY/3\r\n\r\n",
        b"GET /x HTTP/1.1\r\n",
    ],
)
def test_malformed_or_incomplete_request_is_400(request_bytes):
    async def body(server: MetricsServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request_bytes)
        writer.write_eof()  # for the incomplete one: the client gives up
        data = await asyncio.wait_for(reader.read(), BOUND)
        writer.close()
        assert data.startswith(b"HTTP/1.1 400 ")

    run(body)


def test_request_arriving_one_byte_at_a_time():
    async def body(server: MetricsServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        for i in range(len(request := get("/healthz"))):
            writer.write(request[i : i + 1])
            await writer.drain()
        data = await asyncio.wait_for(reader.read(), BOUND)
        writer.close()
        assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"\r\n\r\nok")

    run(body)


def test_oversized_request_head_is_431():
    async def body(server: MetricsServer) -> None:
        request = b"GET /metrics HTTP/1.1\r\nX-Filler: " + b"a" * 2000 + b"\r\n\r\n"
        status, _, _ = await exchange(server.port, request)
        assert status == 431

    run(body, max_request_head=1024)


def test_slow_request_times_out_with_408():
    async def body(server: MetricsServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metrics HTTP/1.1\r\n")  # and never the end of the head
        data = await asyncio.wait_for(reader.read(), BOUND)
        writer.close()
        assert data.startswith(b"HTTP/1.1 408 ")

    run(body, request_timeout=0.2)


def test_client_that_connects_and_leaves_does_not_break_the_listener():
    async def body(server: MetricsServer) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.close()
        assert (await exchange(server.port, get("/healthz")))[0] == 200

    run(body)


def test_failing_snapshot_gives_500_and_the_listener_survives(caplog):
    def broken() -> dict[str, Any]:
        raise RuntimeError("bug in the relay")

    async def body(server: MetricsServer) -> None:
        assert (await exchange(server.port, get("/metrics")))[0] == 500
        assert (await exchange(server.port, get("/healthz")))[0] == 200

    with caplog.at_level("ERROR", logger="fastrelay.metrics"):
        run(body, snapshot=broken)
    assert "metrics scrape failed" in caplog.text


def test_a_snapshot_missing_a_key_gives_500_naming_it(caplog):
    incomplete = {k: v for k, v in FULL_SNAPSHOT.items() if k != "deliveries_total"}

    async def body(server: MetricsServer) -> None:
        assert (await exchange(server.port, get("/metrics")))[0] == 500

    with caplog.at_level("ERROR", logger="fastrelay.metrics"):
        run(body, snapshot=lambda: incomplete)
    assert "KeyError: 'deliveries_total'" in caplog.text


def test_port_zero_binds_a_free_port_and_url_names_it():
    async def body(server: MetricsServer) -> None:
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"

    run(body)


def test_bind_failure_raises_oserror():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def main() -> None:
            with pytest.raises(OSError) as info:
                await start_metrics_server("127.0.0.1", port, dict, lambda: True)
            assert info.value.errno == errno.EADDRINUSE

        asyncio.run(main())


def test_close_stops_listening_and_ends_open_connections():
    async def main() -> None:
        server = await start_metrics_server("127.0.0.1", 0, dict, lambda: True)
        port = server.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\n")  # a request in progress
        await writer.drain()
        await asyncio.wait_for(server.close(), BOUND)
        # Ended either way: closed by the handler (EOF) or, if the close won
        # the race with the accept, reset by the kernel.
        try:
            assert await asyncio.wait_for(reader.read(), BOUND) == b""
        except ConnectionResetError:
            pass
        writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        await server.close()  # twice is harmless

    asyncio.run(main())
