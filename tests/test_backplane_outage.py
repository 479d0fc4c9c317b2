"""Redis unreachable at start and lost in the middle: a real redis-server
started late, stopped and started again by PID. Local rooms never stop;
cross-process messages are dropped and counted meanwhile; each relay gets
back on its own and resubscribes its rooms."""

from __future__ import annotations

import asyncio
import re
import urllib.request

import pytest
from redis_server import RedisServer
from scaleout import backplane, channel, connect, metric, recv, run

from relay_process import METRICS_ON, merged

# Reconnect attempts at most 0.5 s apart, so recovery is quick; waiting on
# the relays' own log lines bounds it.
RECOVERY = 30.0


def readyz(relay) -> int:
    url = relay.metrics_url.replace("/metrics", "/readyz")
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status


@pytest.mark.timeout(120)
def test_local_rooms_go_on_and_the_backplane_comes_back(relay_factory, tmp_path):
    server = RedisServer(tmp_path)  # not started yet: unreachable at start
    config = merged(METRICS_ON, backplane(server, reconnect_max_delay=0.5))
    a, b = relay_factory(config, name="a"), relay_factory(config, name="b")
    room = "/outage"
    for relay in (a, b):
        relay.expect("stderr", r"\[WARN\] backplane: cannot reach Redis at redis://127")
        assert metric(relay, "websocket_backplane_connected") == 0
        assert readyz(relay) == 200  # local relaying works

    async def chat(a1, a2, text):
        await a1.send(text)
        assert await recv(a1) == text
        assert await recv(a2) == text

    async def both_log(pattern):
        for relay in (a, b):
            await asyncio.to_thread(relay.expect, "stderr", pattern, RECOVERY)

    async def main():
        a1 = await connect(a.ws(room)).__aenter__()
        a2 = await connect(a.ws(room)).__aenter__()
        b1 = await connect(b.ws(room)).__aenter__()
        await chat(a1, a2, "before redis")  # local delivery without Redis

        server.start()
        await both_log(r"\[INFO\] backplane: connected to Redis")
        await asyncio.to_thread(server.wait_subscribers, channel(room), 2)
        await chat(a1, a2, "with redis")
        assert await recv(b1) == "with redis"

        server.stop()  # SIGTERM by PID, waited for
        await both_log(r"\[WARN\] backplane: lost Redis at redis://127")
        dropped = metric(a, "websocket_backplane_dropped_total")
        await chat(a1, a2, "during the outage")  # local members still chat
        assert metric(a, "websocket_backplane_dropped_total") == dropped + 1
        assert metric(a, "websocket_backplane_connected") == 0
        assert readyz(a) == 200

        server.start()  # same port
        await both_log(r"\[INFO\] backplane: Redis at .* is back")
        # Every room with local members was subscribed again.
        await asyncio.to_thread(server.wait_subscribers, channel(room), 2)
        await chat(a1, a2, "after the outage")
        # b1 never got the outage message: dropped, not delayed.
        assert await recv(b1) == "after the outage"
        await b1.send("back from b")
        for ws in (a1, a2, b1):
            assert await recv(ws) == "back from b"
        for ws in (a1, a2, b1):
            await ws.close()

    try:
        run(main(), timeout=100)
        for relay in (a, b):
            assert metric(relay, "websocket_backplane_reconnects_total") == 1
            assert metric(relay, "websocket_backplane_connected") == 1
            # One WARN per lost session, not one per attempt.
            warnings = re.findall(r"\[WARN\] backplane: lost", relay.stderr.text())
            assert len(warnings) == 1
    finally:
        server.stop()
