"""Rooms across processes through a real redis-server: three fastrelay
processes on different ports (as if on three hosts), real websockets
clients on each, every delivery checked exactly."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from urllib.parse import unquote_to_bytes

import pytest
from redis_server import RedisServer
from scaleout import (
    STEP,
    backplane,
    channel,
    connect,
    expect_exactly,
    metric,
    recv,
    run,
    wait_until,
)
from websockets.uri import parse_uri

from relay_process import METRICS_ON, merged

MIB = 1 << 20


@pytest.fixture(scope="module")
def hosts(module_relay_factory, redis_server):
    """Three relays joined by the backplane, compression offered."""
    config = merged(METRICS_ON, {"relay": {"compression": True}, **backplane(redis_server)})
    return [module_relay_factory(config, name=f"host{i}") for i in range(3)]


def messages_of(kind: str, sender: int, count: int) -> list[str | bytes]:
    if kind == "text":
        return [f"s{sender} m{i} ünïcode" for i in range(count)]
    if kind == "binary":
        return [bytes([sender, i]) + b"\x00\xff" * 40 for i in range(count)]
    if kind == "1MiB":
        return [bytes([sender, i]) * (MIB // 2) for i in range(count)]
    assert kind == "fragmented"
    return [f"s{sender} fragmented {i} " * 50 for i in range(count)]


async def send(ws, kind: str, message: str | bytes) -> None:
    if kind == "fragmented":
        assert isinstance(message, str)
        # Three frames: websockets sends an iterable as a fragmented message.
        third = len(message) // 3
        await ws.send(iter([message[:third], message[third : 2 * third], message[2 * third :]]))
    else:
        await ws.send(message)


@pytest.mark.parametrize(
    ("kind", "count"), [("text", 30), ("binary", 30), ("1MiB", 2), ("fragmented", 10)]
)
def test_every_member_on_every_process_gets_every_message_once_in_order(
    hosts, redis_server, kind, count
):
    room = f"/all-{kind}"

    async def main():
        # Two members per process: one compressing (permessage-deflate), one not.
        members = [
            await connect(host.ws(room), compress=compress).__aenter__()
            for host in hosts
            for compress in (True, False)
        ]
        await asyncio.to_thread(redis_server.wait_subscribers, channel(room), len(hosts))
        senders = members[::2]  # one per process
        sent = [messages_of(kind, i, count) for i in range(len(senders))]

        async def send_all(i, ws):
            for message in sent[i]:
                await send(ws, kind, message)

        # Concurrent senders: each sender's order is what is checked.
        await asyncio.gather(*(send_all(i, ws) for i, ws in enumerate(senders)))

        async def check(ws):
            got = [await recv(ws) for _ in range(count * len(senders))]
            for i, expected in enumerate(sent):
                assert [m for m in got if m in expected] == expected, f"sender {i}"
            assert sorted(map(repr, got)) == sorted(repr(m) for s in sent for m in s)

        await asyncio.gather(*(check(ws) for ws in members))
        # Nothing more follows: no duplicate was on its way.
        await members[0].send("end")
        await asyncio.gather(*(expect_exactly(ws, [], "end") for ws in members))
        for ws in members:
            await ws.close()

    run(main())


def test_rooms_stay_isolated_across_processes(hosts, redis_server):
    async def main():
        red = [await connect(h.ws("/red")).__aenter__() for h in hosts]
        blue = [await connect(h.ws("/blue")).__aenter__() for h in hosts]
        for room in ("/red", "/blue"):
            await asyncio.to_thread(redis_server.wait_subscribers, channel(room), 3)
        # In phases: each process reads Redis on one connection, in publish
        # order, so a leak from an earlier phase would come before the end.
        await red[0].send("for red")
        for ws in red:
            assert await recv(ws) == "for red"
        await blue[2].send("for blue")
        for ws in blue:
            assert await recv(ws) == "for blue"
        await red[0].send("red end")
        await blue[2].send("blue end")
        for ws in red:
            assert await recv(ws) == "red end"
        for ws in blue:
            assert await recv(ws) == "blue end"
        for ws in red + blue:
            await ws.close()

    run(main())


def test_room_names_of_any_form_map_to_binary_safe_channels(hosts, redis_server):
    # Unicode, a space, a literal percent sign and a long path. The room is
    # the path the client sends, percent-decoded; its channel is the room's
    # UTF-8 bytes after the prefix.
    path = "/café/✓ x/100%/" + "ж" * 600
    sent = parse_uri(hosts[0].ws(path)).resource_name
    room = unquote_to_bytes(sent).decode("utf-8")
    assert room == path

    async def main():
        a = await connect(hosts[0].ws(path)).__aenter__()
        b = await connect(hosts[1].ws(path)).__aenter__()
        await asyncio.to_thread(redis_server.wait_subscribers, channel(room), 2)
        await a.send("hé")
        assert await recv(b) == "hé"
        assert await recv(a) == "hé"
        await a.close()
        await b.close()

    run(main())


def test_channels_are_released_when_rooms_empty(hosts, redis_server):
    room = "/short-lived"

    async def main():
        a = await connect(hosts[0].ws(room)).__aenter__()
        b = await connect(hosts[1].ws(room)).__aenter__()
        await asyncio.to_thread(redis_server.wait_subscribers, channel(room), 2)
        await a.close()
        # host0's room is empty: it unsubscribes; host1 still has a member.
        await asyncio.to_thread(redis_server.wait_subscribers, channel(room), 1)
        await b.close()
        await asyncio.to_thread(
            wait_until, lambda: channel(room) not in redis_server.channels(), "no subscriber left"
        )

    run(main())


def test_each_process_counts_what_crossed_the_backplane(hosts, redis_server):
    room = "/counted"
    before = [
        (metric(h, "websocket_backplane_published_total"), metric(h, "websocket_messages_total"))
        for h in hosts
    ]

    async def main():
        a = await connect(hosts[0].ws(room)).__aenter__()
        b = await connect(hosts[1].ws(room)).__aenter__()
        await asyncio.to_thread(redis_server.wait_subscribers, channel(room), 2)
        for i in range(5):
            await a.send(f"m{i}")
        await a.send("end")
        await expect_exactly(b, [f"m{i}" for i in range(5)], "end")
        await a.close()
        await b.close()

    run(main())
    assert metric(hosts[0], "websocket_backplane_connected") == 1
    # Counted when Redis has answered the pipeline, which may come just
    # after the other process delivered.
    wait_until(
        lambda: metric(hosts[0], "websocket_backplane_published_total") == before[0][0] + 6,
        "host0 counted its 6 messages as published",
    )
    # Messages count where their sender is: host1 relayed 6 but received none
    # from its clients.
    assert metric(hosts[0], "websocket_messages_total") == before[0][1] + 6
    assert metric(hosts[1], "websocket_messages_total") == before[1][1]
    assert metric(hosts[1], "websocket_backplane_dropped_total") == 0


def test_echo_off_leaves_out_only_the_sender_across_processes(relay_factory, redis_server):
    config = merged(backplane(redis_server), {"relay": {"echo": False}})
    a, b = relay_factory(config, name="a"), relay_factory(config, name="b")
    room = "/no-echo"

    async def main():
        sender = await connect(a.ws(room)).__aenter__()
        near = await connect(a.ws(room)).__aenter__()
        far = await connect(b.ws(room)).__aenter__()
        await asyncio.to_thread(redis_server.wait_subscribers, channel(room), 2)
        await sender.send("one")
        await sender.send("two")
        for ws in (near, far):
            assert [await recv(ws), await recv(ws)] == ["one", "two"]
        # The sender got nothing: the next thing it receives is from `far`.
        await far.send("from far")
        assert await recv(sender) == "from far"
        for ws in (sender, near, far):
            await ws.close()

    run(main())


def test_a_password_from_the_environment_is_used_and_never_logged(
    relay_factory, tmp_path, monkeypatch
):
    secret = "s3cret-Pa55word"
    server = RedisServer(tmp_path, password=secret).start()
    try:
        monkeypatch.setenv("FASTRELAY_TEST_REDIS_PASSWORD", secret)
        env_config = backplane(server, password_env="FASTRELAY_TEST_REDIS_PASSWORD")
        a = relay_factory(env_config, name="env")
        url_with_password = server.url.replace("redis://", f"redis://:{secret}@")
        b = relay_factory({"backplane": {"url": url_with_password}}, name="url")
        room = "/secret"

        async def main():
            x = await connect(a.ws(room)).__aenter__()
            y = await connect(b.ws(room)).__aenter__()
            await asyncio.to_thread(server.wait_subscribers, channel(room), 2)
            await x.send("authenticated")
            assert await recv(y) == "authenticated"
            await x.close()
            await y.close()

        run(main())
        for relay in (a, b):
            relay.expect("stderr", re.escape("backplane: connected to Redis at"))
        assert re.search(r"connected to Redis at redis://:\*\*\*@127\.0\.0\.1:", b.stderr.text())
    finally:
        for relay in (a, b):
            relay.stop()
        server.stop()
    for relay in (a, b):
        assert secret not in relay.stderr.text() + relay.stdout.text()


def test_a_publish_through_the_api_reaches_members_on_every_process(relay_factory, redis_server):
    """The HTTP publish API (issue 13) on one relay, members on another: the
    message crosses the backplane like any other."""
    key = "publish-api-key-0123456789abcdef"
    config = merged(
        merged(METRICS_ON, backplane(redis_server)), {"api": {"enabled": True, "key": key}}
    )
    publisher, other = relay_factory(config, name="api"), relay_factory(config, name="other")
    room = "/announcements"

    async def main():
        far = await connect(other.ws(room)).__aenter__()
        near = await connect(publisher.ws(room)).__aenter__()
        await asyncio.to_thread(redis_server.wait_subscribers, channel(room), 2)
        request = urllib.request.Request(
            publisher.metrics_url.rsplit("/", 1)[0] + "/publish" + room,
            data=b"to everyone",
            method="POST",
            headers={"Authorization": f"Bearer {key}", "Content-Type": "text/plain"},
        )
        answer = await asyncio.to_thread(urllib.request.urlopen, request, timeout=20)
        assert answer.status == 200
        for ws in (near, far):
            assert await recv(ws) == "to everyone"
        for ws in (near, far):
            await ws.close()

    run(main())


def test_a_new_room_hears_other_processes_from_its_first_101_on(hosts, redis_server):
    """A client joining a room that is new on its process is told it joined
    (the 101) only once that process's subscription is confirmed: everything
    another process's member sends after that 101 reaches it. The speaker
    talks steadily while the listener joins, ten new rooms in a row;
    a message lost in a subscription's first milliseconds fails the test."""
    first, second = hosts[0], hosts[1]

    async def one_room(room: str) -> None:
        speaker = await connect(first.ws(room)).__aenter__()
        await asyncio.to_thread(redis_server.wait_subscribers, channel(room), 1)
        sent = [0]
        stop = asyncio.Event()

        async def talk() -> None:
            while not stop.is_set() and sent[0] < 50_000:
                sent[0] += 1
                await speaker.send(str(sent[0]))
                await asyncio.sleep(0.0005)  # pacing: a steady talker, not a flood

        async def drain() -> None:
            # The speaker hears itself (echo): keep reading, or it would
            # hold its room back.
            async for _ in speaker:
                pass

        talking = asyncio.create_task(talk())
        draining = asyncio.create_task(drain())
        while sent[0] < 20:
            await asyncio.sleep(0)
        listener = await connect(second.ws(room)).__aenter__()
        joined_at = sent[0]  # everything after this was sent after the 101
        seen = []
        while not seen or seen[-1] < joined_at + 50:
            seen.append(int(await recv(listener)))
        stop.set()
        await talking
        draining.cancel()
        after = [n for n in seen if n > joined_at]
        assert after == list(range(joined_at + 1, seen[-1] + 1)), (joined_at, seen[:10])
        await speaker.close()
        await listener.close()

    async def main():
        for n in range(10):
            await one_room(f"/fresh-{n}")

    run(main())


def test_a_client_admitted_at_start_reaches_other_processes(relay_factory, redis_server):
    """A relay takes clients only once its first Redis session is up (or has
    failed): the first message of a client that connects the moment the
    relay says it is listening reaches the members on other processes."""
    room = "/first-moments"
    config = backplane(redis_server)
    elsewhere = relay_factory(config, name="elsewhere")

    async def main():
        async with connect(elsewhere.ws(room)) as listener:
            starting = relay_factory(config, name="starting")  # returns once it listens
            async with connect(starting.ws(room)) as early:
                await early.send("at once")
                await early.send("end")
                await expect_exactly(listener, ["at once"], "end")

    run(main())


def test_a_room_on_one_process_stays_off_redis_until_another_process_joins(
    relay_factory, redis_server
):
    """A PUBLISH that no other process hears (reply 1: ourselves) stops the
    room's publishing; a second process's hello starts it again before that
    process's members are told they joined."""
    room = "/one-place"
    config = merged(METRICS_ON, backplane(redis_server))
    first, second = relay_factory(config, name="first"), relay_factory(config, name="second")
    published = "websocket_backplane_published_total"

    async def main():
        async with connect(first.ws(room)) as alone:
            await alone.send("heard by nobody else")
            assert await recv(alone) == "heard by nobody else"
            # Its PUBLISH went out and its reply came back: one subscriber.
            await asyncio.to_thread(
                wait_until, lambda: metric(first, published) == 1, "the first publish"
            )
            for i in range(20):
                await alone.send(f"local {i}")
            for i in range(20):
                assert await recv(alone) == f"local {i}"
            # Delivered locally (so the hub's turn and its batch are over),
            # and none of the twenty went to Redis.
            assert metric(first, published) == 1
            async with connect(second.ws(room)) as newcomer:
                # Joined (its 101) only once the first process answered the
                # hello: what is sent from now on reaches it.
                await alone.send("now shared")
                await alone.send("end")
                await expect_exactly(newcomer, ["now shared"], "end")
            assert metric(first, published) == 3

    run(main())


def test_a_subscriber_that_never_acknowledges_delays_a_join_boundedly(relay_factory, redis_server):
    """Something else subscribed to a room's channel (redis-cli, a monitor)
    counts as a listener but never acknowledges a hello: members still join,
    after ACK_WAIT, and messages still flow."""
    room = "/watched"
    config = backplane(redis_server)
    relay = relay_factory(config, name="watched")
    watcher = redis_server.client().pubsub()
    watcher.subscribe(channel(room))
    try:
        assert watcher.get_message(timeout=STEP)["type"] == "subscribe"

        async def main():
            async with connect(relay.ws(room)) as member:
                await member.send("hello")
                assert await recv(member) == "hello"

        run(main())
        # The watcher saw our hello (kind 2) and the message's packet (kind 1).
        kinds = []
        while len(kinds) < 2:
            message = watcher.get_message(timeout=STEP)
            assert message is not None
            if message["type"] == "message":
                kinds.append(message["data"][0])
        assert kinds == [2, 1]
    finally:
        watcher.close()
