"""`server.workers: 2` on one port with a real redis-server: the supervisor,
its workers, their shared rooms, the host's one metrics endpoint and the
publish API on it."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time

from redis_server import RedisServer
from scaleout import backplane, channel, connect, expect_exactly, metric, recv, run, wait_until
from test_publish_api import KEY, api_json, http

from relay_process import METRICS_ON, merged

API_ON = {"api": {"enabled": True, "key": KEY}}
API_TIMEOUT = 2.0  # fastrelay.supervisor.API_TIMEOUT: a silent worker is given up on after it

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


async def api(relay, method, path, body=b"", headers=None, key=KEY):
    """(status, JSON answer) of one publish API request, off the event loop."""
    return await asyncio.to_thread(api_json, relay, method, path, body, headers, key)


async def expect_ends(clients: list, first: list) -> None:
    """Each client has got `first` (in order); then every client sends an
    end marker and each gets all of them and nothing else. A second copy of
    a message published before would come first: each worker's messages
    reach Redis, and from there the other worker, in order, and both
    workers have a client sending a marker."""
    for ws in clients:
        assert [await recv(ws) for _ in first] == first
    ends = [f"end {i}" for i in range(len(clients))]
    await asyncio.gather(*(ws.send(end) for ws, end in zip(clients, ends, strict=True)))
    for ws in clients:
        assert sorted([await recv(ws) for _ in ends]) == sorted(ends)


def test_the_publish_api_covers_every_worker(relay_factory, redis_server):
    relay = relay_factory(merged(workers_config(redis_server), API_ON))
    relay.expect("stdout", r"^publish API on http://\S+/publish/<room>$")

    async def main():
        clients = await join_until_both_workers(relay, redis_server, "/news")
        async with connect(relay.ws("/other")) as other:
            n = len(clients)
            status, answer = await api(
                relay, "POST", "/publish/news", "héllo".encode(), {"Content-Type": "text/plain"}
            )
            # Every member on this host, whichever worker holds it.
            assert (status, answer) == (200, {"room": "/news", "delivered": n})
            await expect_ends(clients, ["héllo"])  # each got it exactly once
            # One message entered the relay; n end markers; each reached n members.
            wait_until(
                lambda: metric(relay, "websocket_messages_total") == 1 + n,
                f"websocket_messages_total == {1 + n}",
            )
            assert metric(relay, "websocket_deliveries_total") == (1 + n) * n

            # Rooms summed over the workers, paged over the merged set.
            assert await api(relay, "GET", "/rooms") == (
                200,
                {
                    "rooms": [{"room": "/news", "members": n}, {"room": "/other", "members": 1}],
                    "total": 2,
                    "next": None,
                },
            )
            assert await api(relay, "GET", "/rooms?limit=1") == (
                200,
                {"rooms": [{"room": "/news", "members": n}], "total": 2, "next": "/news"},
            )
            assert await api(relay, "GET", "/rooms?limit=1&after=%2Fnews") == (
                200,
                {"rooms": [{"room": "/other", "members": 1}], "total": 2, "next": None},
            )
            assert await api(relay, "GET", "/rooms/news") == (200, {"room": "/news", "members": n})
            assert (await api(relay, "GET", "/rooms/nobody"))[0] == 404
            assert await api(relay, "POST", "/publish/nobody", b"x") == (
                200,
                {"room": "/nobody", "delivered": 0},
            )
            # Refusals are the single process's.
            status, fields, _ = await asyncio.to_thread(
                http, relay, "POST", "/publish/news", b"x", None, "wrong-key-0123456789"
            )
            assert status == 401 and fields["www-authenticate"].startswith("Bearer")
            assert (await api(relay, "GET", "/publish/news"))[0] == 405
            assert (await api(relay, "PUT", "/rooms"))[0] == 405
            too_large = {"Content-Length": str(2**40)}
            assert (await api(relay, "POST", "/publish/news", b"", too_large))[0] == 413
            # None of these reached a member: the end markers come next.
            await expect_ends(clients, [])
            await other.send("mine")
            assert await recv(other) == "mine"
        for ws in clients:
            await ws.close()

    run(main())


def test_the_publish_api_skips_a_stopped_worker_and_answers_503_without_any(
    relay_factory, redis_server
):
    relay = relay_factory(merged(workers_config(redis_server), API_ON))
    pids = worker_pids(relay)

    def pause(*indexes: int) -> None:
        for index in indexes:
            os.kill(pids[index], signal.SIGSTOP)  # workers of this test's relay, by PID

    def resume() -> None:
        for pid in pids.values():
            os.kill(pid, signal.SIGCONT)

    async def timed(method, path, body=b""):
        started = time.monotonic()
        answer = await api(relay, method, path, body, {"Content-Type": "text/plain"})
        return answer, time.monotonic() - started

    async def main():
        clients = await join_until_both_workers(relay, redis_server, "/stall")
        n = len(clients)
        try:
            pause(1)
            # Worker 1 is given up on after API_TIMEOUT: worker 2's members.
            (status, answer), took = await timed("GET", "/rooms/stall")
            assert status == 200 and 0 < answer["members"] < n, answer
            assert took < API_TIMEOUT + 5
            on_worker_2 = answer["members"]
            # Worker 1 is silent: the message goes to worker 2, at once.
            (status, answer), took = await timed("POST", "/publish/stall", b"while stopped")
            assert (status, answer) == (200, {"room": "/stall", "delivered": on_worker_2})
            assert took < API_TIMEOUT + 5

            pause(2)
            status, answer = await api(relay, "GET", "/rooms")
            assert status == 503 and "no worker answered" in answer["error"], answer
            # Offered to no worker: not published (the end markers come next).
            status, answer = await api(relay, "POST", "/publish/stall", b"lost")
            assert status == 503 and "no worker answered" in answer["error"], answer
        finally:
            resume()
        # Worker 1's members get it through Redis once it runs again.
        await expect_ends(clients, ["while stopped"])
        # Both answer again (their late answers to the requests given up on
        # are told apart from the awaited ones).
        assert await api(relay, "GET", "/rooms/stall") == (200, {"room": "/stall", "members": n})
        for ws in clients:
            await ws.close()

    run(main())
