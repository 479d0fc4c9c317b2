"""`server.workers: 2` on one port with a real redis-server: the supervisor,
its workers, their shared rooms and the host's one metrics endpoint."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket

from redis_server import RedisServer
from scaleout import backplane, channel, connect, expect_exactly, metric, recv, run, wait_until

from relay_process import METRICS_ON, merged

STARTED = re.compile(r"\[INFO\] worker (\d) started \(pid (\d+)\)")
# Connections the kernel spreads over the workers until both have one:
# the chance that 64 all hash to one worker is 2**-63.
MAX_CLIENTS = 64


def workers_config(redis: RedisServer, **extra):
    return merged(merged(METRICS_ON, backplane(redis)), {"server": {"workers": 2}, **extra})


def worker_pids(relay) -> dict[int, int]:
    pids = {}
    for line in relay.stderr.all():
        match = STARTED.search(line)
        if match:
            pids[int(match.group(1))] = int(match.group(2))
    return pids


async def join_until_both_workers(relay, redis: RedisServer, room: str) -> list:
    """Clients for `room` until both workers have a member (Redis then
    counts two subscribers for the room's channel)."""
    clients = []
    with redis.client() as c:
        for _ in range(MAX_CLIENTS):
            clients.append(await connect(relay.ws(room)).__aenter__())
            # Joining and subscribing happen before the 101 ... but the
            # SUBSCRIBE is asynchronous: ask Redis, bounded, after each.
            try:
                await asyncio.to_thread(redis.wait_subscribers, channel(room), 2, 0.5)
                return clients
            except AssertionError:
                continue
        (_, count), *_ = c.pubsub_numsub(channel(room))
    raise AssertionError(f"{MAX_CLIENTS} clients, {count} worker(s) subscribed")


def test_workers_share_one_port_rooms_and_metrics(relay_factory, redis_server):
    relay = relay_factory(workers_config(redis_server))
    assert set(worker_pids(relay)) == {1, 2}
    room = "/shared"

    async def main():
        clients = await join_until_both_workers(relay, redis_server, room)
        sent = {i: [f"c{i} m{k}" for k in range(5)] for i in range(len(clients))}
        await asyncio.gather(
            *(clients[i].send(m) for i in sent for m in sent[i])  # concurrently
        )

        async def check(ws):
            got = [await recv(ws) for _ in range(5 * len(clients))]
            for expected in sent.values():
                assert [m for m in got if m in expected] == expected  # order per sender
            assert sorted(got) == sorted(m for ms in sent.values() for m in ms)

        await asyncio.gather(*(check(ws) for ws in clients))
        await clients[0].send("end")
        await asyncio.gather(*(expect_exactly(ws, [], "end") for ws in clients))
        return len(clients)

    members = run(main())
    messages = 5 * members + 1
    # The host's one endpoint: sums over both workers, same names.
    wait_until(
        lambda: metric(relay, "websocket_messages_total") == messages,
        f"websocket_messages_total == {messages} (what the workers relayed together)",
    )
    assert metric(relay, "websocket_deliveries_total") == messages * members
    assert metric(relay, "websocket_connected_clients") == members
    assert metric(relay, "websocket_connections_total") == members
    assert metric(relay, "websocket_workers") == 2
    assert metric(relay, "websocket_backplane_connected") == 2
    assert metric(relay, "websocket_worker_restarts_total") == 0


def test_a_killed_worker_is_restarted_and_its_clients_can_reconnect(relay_factory, redis_server):
    relay = relay_factory(workers_config(redis_server))
    room = "/restart"
    killed = worker_pids(relay)[1]

    async def main():
        clients = await join_until_both_workers(relay, redis_server, room)
        os.kill(killed, signal.SIGKILL)  # a worker this test's relay started
        await asyncio.to_thread(
            relay.expect, "stderr", r"\[ERROR\] worker 1 \(pid \d+\) exited unexpectedly"
        )
        await asyncio.to_thread(relay.expect, "stderr", STARTED.pattern)
        assert worker_pids(relay)[1] != killed
        # The killed worker's clients lost their connection ...
        survivors = []
        for ws in clients:
            try:
                await ws.send("ping")
                await recv(ws)
                survivors.append(ws)
            except Exception:
                pass
        assert 0 < len(survivors) < len(clients)
        # ... and reconnecting reaches both workers again, rooms joined.
        fresh = await join_until_both_workers(relay, redis_server, room)
        await fresh[-1].send("after restart")
        for ws in fresh + survivors:
            while (message := await recv(ws)) != "after restart":
                assert message == "ping"  # survivors' own pings, nothing else

    run(main())
    assert metric(relay, "websocket_worker_restarts_total") == 1
    assert metric(relay, "websocket_workers") == 2


def test_sigterm_closes_every_client_with_1001_and_exits_0(relay_factory, redis_server):
    relay = relay_factory(workers_config(redis_server))

    async def main():
        clients = await join_until_both_workers(relay, redis_server, "/bye")
        relay.send_signal(signal.SIGTERM)
        for ws in clients:
            await asyncio.wait_for(ws.wait_closed(), 20)
            assert ws.close_code == 1001

    run(main())
    assert relay.wait() == 0
    text = relay.stderr.text()
    assert "worker 1: shutdown complete" in text and "worker 2: shutdown complete" in text


def test_sighup_is_forwarded_to_every_worker(relay_factory, redis_server, tmp_path):
    relay = relay_factory(workers_config(redis_server, logging={"output": "relay.log"}))
    log = tmp_path / "relay.log"
    log.rename(tmp_path / "relay.log.1")  # what logrotate does
    relay.send_signal(signal.SIGHUP)
    wait_until(
        lambda: (
            log.exists()
            and all(f"worker {i}: SIGHUP: log output reopened" in log.read_text() for i in (1, 2))
        ),
        "both workers reopened the log",
    )


def test_workers_that_cannot_listen_exit_2_with_one_line(relay_factory, redis_server):
    with socket.socket() as taken:  # a port held without SO_REUSEPORT
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        relay = relay_factory(
            merged(workers_config(redis_server), {"server": {"port": port}}), ready=False
        )
        assert relay.wait() == 2
    lines = [line for line in relay.stderr.all() if line.startswith("fastrelay: error:")]
    assert lines == [f"fastrelay: error: cannot listen on 127.0.0.1:{port}: address already in use"]
