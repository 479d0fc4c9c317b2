"""The Redis pub/sub backplane: rooms shared by processes and hosts.

The hub gathers each loop turn's local messages per room, in compiled code,
into packet bodies (per message: opcode, length, payload) and hands them
over in one call (`send_batch`); they wait in a queue bounded in bytes
until the writer task publishes them. All messages of one room in a turn
travel as one Redis message (a packet: a header, then the body), and all
packets of a batch as one pipeline: one write, whatever the number of
messages. Packets published by other processes are read by the reader task
and handed whole to `Hub.deliver_packet`, which encodes each message once
into the turn's arena like a local one.

Each room has its own channel (prefix + room, UTF-8), subscribed while the
room has local members. A packet starts with its kind and the publishing
process's random id, so a process drops its own packets when Redis sends
them back. One connection publishes, in order, so a sender's messages keep
their order.

A room whose members are all on this process costs Redis nothing: when a
PUBLISH reaches no other subscriber (its reply is 1, ourselves), the room's
messages stay local until another process says hello. A process says hello
on a room's channel once its subscription is confirmed; every process that
hears it publishes that room's messages from then on and acknowledges. The
new process's members are told they joined (their 101) only once every
other subscriber has acknowledged (or ACK_WAIT passed): no message sent
after a member joined is kept from it.

When Redis is unreachable local delivery goes on; the messages meant for
other processes are dropped and counted, and a session is retried with
capped exponential backoff and jitter. A new session subscribes every
room that has local members before it counts as connected.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import struct
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .config import BackplaneConfig, redact_url

if TYPE_CHECKING:
    from ._frames import Hub

# A packet: its kind and the publishing process's id, then for DATA the
# body the hub built: per message its opcode, 4-byte big-endian payload
# length and payload (the hub seals a body at 256 KiB, so one busy room
# cannot make a single huge Redis message).
DATA = 1
HELLO = 2  # then a nonce: "I have subscribed this room; do you publish it?"
ACK = 3  # then the hello's origin and nonce: "I do, from now on."
ORIGIN_SIZE = 8
_HEAD = struct.Struct(">B8s")
_HELLO = struct.Struct(">B8s8s")
_ACK = struct.Struct(">B8s8s8s")
# A new room's members wait at most this long for the acknowledgements (a
# subscriber that is not fastrelay, e.g. redis-cli, never sends one). Long
# enough for a busy process to answer: one that answers later may not have
# published what its members sent meanwhile.
ACK_WAIT = 3.0
# Bodies of several turns are merged up to this size (the hub's own limit
# for one turn's body, see PACKET_TARGET in _frames.pyx).
PACKET_TARGET = 256 * 1024

RECONNECT_MIN_DELAY = 0.1
# An idle publishing connection is checked this often, so a Redis that
# went away silently is noticed without waiting for the next message.
IDLE_PING_INTERVAL = 10.0
CONNECT_TIMEOUT = 5.0
# Seconds Redis may take to answer a pipeline before the session is
# deemed lost.
COMMAND_TIMEOUT = 10.0
CLOSE_TIMEOUT = 2.0
# At start, clients wait at most this long for the first session (Redis
# accepting but never answering must not keep the relay closed).
FIRST_WAIT = CONNECT_TIMEOUT


class RoomLink:
    """What this process knows of the other processes in a room whose
    channel it has subscribed."""

    __slots__ = ("others", "epoch", "nonce", "acks_due", "acks", "timer")

    def __init__(self) -> None:
        self.others = True  # publish its messages; False: nobody else listened
        self.epoch = 0  # hellos heard: a PUBLISH reply from before one is stale
        self.nonce = b""  # our hello, while it waits for acknowledgements
        self.acks_due = -1  # other subscribers when it was published; -1: not known yet
        self.acks = 0  # acknowledgements heard (they may come before that number)
        self.timer: asyncio.TimerHandle | None = None


class RedisBackplane:
    """What the hub calls (`send_batch`, `room_opened`, `room_closed`:
    never blocking, never raising) and the tasks that talk to Redis.

    start() begins connecting in the background; close() stops.
    """

    def __init__(self, settings: BackplaneConfig, hub: Hub, log: logging.Logger) -> None:
        self.settings = settings
        self.hub = hub
        self.log = log
        self.where = redact_url(settings.url)
        self.prefix = settings.channel_prefix.encode("utf-8")
        self.origin = os.urandom(ORIGIN_SIZE)
        self.connected = False
        # The queue to Redis: (room, packet body, messages) in the hub's order,
        # and hellos and acknowledgements: (room, packet, nonce of a hello).
        self.queue: list[tuple[str, bytes, int]] = []
        self.control: list[tuple[str, bytes, bytes]] = []
        self.links: dict[str, RoomLink] = {}  # rooms whose subscription is confirmed
        self.head = _HEAD.pack(DATA, self.origin)
        self.queued_bytes = 0  # queued plus being published
        self.subscribed: set[bytes] = set()
        self.unsubscribing: set[bytes] = set()  # UNSUBSCRIBE sent, not done
        self.wake_writer = asyncio.Event()
        self.rooms_changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.first_done = asyncio.Event()  # the first session is up, or failed
        # Counters read at scrape time.
        self.published = 0  # messages handed to Redis
        self.received = 0  # messages from other processes
        self.dropped = 0  # messages other processes did not get from us
        self.reconnects = 0  # sessions started again after one was lost
        self.foreign_warned = False

    # -- the hub's side: synchronous, never raises --------------------------------

    def send_batch(self, batch: list[tuple[str, bytes, int]]) -> None:
        """This turn's packet bodies: (room, body, how many messages)."""
        if not self.connected:
            self.dropped += sum(packet[2] for packet in batch)
            return
        limit = self.settings.max_queue_bytes
        links = self.links
        for packet in batch:
            link = links.get(packet[0])
            if link is not None and not link.others:
                continue  # no other process has this room
            size = len(packet[1])
            if self.queued_bytes + size > limit:
                self.dropped += packet[2]  # local members have them already
                continue
            self.queue.append(packet)
            self.queued_bytes += size
        self.wake_writer.set()

    def room_opened(self, room: str) -> bool:
        """A room's first local member: subscribe. While connected the room
        waits (False) for the subscription's confirmation (read_loop calls
        hub.room_ready); without Redis there is nothing to wait for."""
        self.rooms_changed.set()
        if not self.connected:
            return True
        # Still subscribed from before (the room emptied and came back before
        # the unsubscribe): ready now, unless that unsubscribe is on its way.
        channel = self.channel(room)
        return channel in self.subscribed and channel not in self.unsubscribing

    def room_closed(self, room: str) -> None:
        self.rooms_changed.set()

    def counters(self) -> dict[str, int]:
        return {
            "backplane_connected": int(self.connected),
            "backplane_published_total": self.published,
            "backplane_received_total": self.received,
            "backplane_dropped_total": self.dropped,
            "backplane_reconnects_total": self.reconnects,
            "backplane_queued_bytes": self.queued_bytes,
        }

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def first_attempt(self) -> None:
        """Until the first session is up or has failed (bounded by the
        connect and command timeouts; waited for at most FIRST_WAIT)."""
        try:
            await asyncio.wait_for(self.first_done.wait(), FIRST_WAIT)
        except asyncio.TimeoutError:
            pass

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            # Bounded: closing redis-py's connections can wait on a socket
            # that is being connected; shutdown must not.
            await asyncio.wait([self.task], timeout=CLOSE_TIMEOUT)
            self.task = None

    def channel(self, room: str) -> bytes:
        return self.prefix + room.encode("utf-8")

    def client(self) -> redis.Redis:
        options: dict[str, Any] = {}
        if self.settings.password_env:
            options["password"] = os.environ.get(self.settings.password_env)
        if self.settings.ca_file:
            options["ssl_ca_certs"] = self.settings.ca_file
        return redis.Redis.from_url(
            self.settings.url,
            # Reconnecting is ours to do (resubscribe, count, log), not the
            # client's: every error ends the session.
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=COMMAND_TIMEOUT,
            **options,
        )

    async def run(self) -> None:
        """Sessions, one after another, for as long as the relay runs."""
        delay = RECONNECT_MIN_DELAY
        ever_connected = False
        warned = False
        while True:
            client = self.client()
            pubsub = client.pubsub()
            try:
                try:
                    await self.open_session(client, pubsub)
                finally:
                    self.first_done.set()
                if ever_connected:
                    self.reconnects += 1
                    self.log.info(
                        "backplane: Redis at %s is back; %d rooms subscribed",
                        self.where,
                        len(self.subscribed),
                    )
                else:
                    self.log.info("backplane: connected to Redis at %s", self.where)
                ever_connected = True
                warned = False
                delay = RECONNECT_MIN_DELAY
                await self.serve_session(client, pubsub)
            except (RedisError, OSError) as e:
                if not warned:
                    self.log.warning(
                        "backplane: %s Redis at %s (%s); local rooms go on, messages to "
                        "other processes are dropped until it is back",
                        "lost" if self.connected else "cannot reach",
                        self.where,
                        redact_error(e, self.settings),
                    )
                    warned = True
            finally:
                self.end_session()
                # redis-py leaves these two unannotated.
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                await client.aclose()
            # Full jitter in the upper half: processes that lost Redis
            # together do not all come back in the same instant.
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, self.settings.reconnect_max_delay)

    async def open_session(self, client: redis.Redis, pubsub: PubSub) -> None:
        await client.ping()
        await pubsub.connect()  # type: ignore[no-untyped-call]
        self.subscribed = set()
        await self.sync_subscriptions(pubsub)
        self.connected = True

    def end_session(self) -> None:
        self.connected = False
        # No confirmation will come: rooms waiting for one go on locally.
        self.hub.release_pending_rooms()
        # What is still queued will not reach the other processes.
        self.dropped += sum(count for _, _, count in self.queue)
        self.queue = []
        self.control = []
        self.queued_bytes = 0
        self.subscribed = set()
        for link in self.links.values():
            if link.timer is not None:
                link.timer.cancel()
        self.links = {}

    async def serve_session(self, client: redis.Redis, pubsub: PubSub) -> None:
        """Run the three loops of a session; the first to fail ends them all."""
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(self.read_loop(pubsub)),
            loop.create_task(self.write_loop(client)),
            loop.create_task(self.subscription_loop(pubsub)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # raises the failure that ended the session
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- the session's loops --------------------------------------------------------

    async def sync_subscriptions(self, pubsub: PubSub) -> None:
        """Subscribe the channels of rooms with local members, drop the others."""
        wanted = {self.channel(room) for room in self.hub.rooms}
        new = wanted - self.subscribed
        gone = self.subscribed - wanted
        if new:
            await pubsub.subscribe(*new)
            self.subscribed |= new
        if gone:
            self.unsubscribing = gone
            try:
                await pubsub.unsubscribe(*gone)
            finally:
                self.unsubscribing = set()
            self.subscribed -= gone

    async def subscription_loop(self, pubsub: PubSub) -> None:
        while True:
            await self.rooms_changed.wait()
            self.rooms_changed.clear()
            await self.sync_subscriptions(pubsub)

    async def write_loop(self, client: redis.Redis) -> None:
        while True:
            try:
                await asyncio.wait_for(self.wake_writer.wait(), IDLE_PING_INTERVAL)
            except asyncio.TimeoutError:
                await client.ping()
                continue
            self.wake_writer.clear()
            # Whatever queued while the previous pipeline was in flight goes
            # in this one.
            while self.queue or self.control:
                batch, self.queue = self.queue, []
                control, self.control = self.control, []
                size = sum(len(body) for _, body, _ in batch)
                messages = sum(count for _, _, count in batch)
                try:
                    await self.publish(client, control, batch)
                except BaseException:
                    self.dropped += messages  # maybe published, maybe not
                    raise
                finally:
                    self.queued_bytes -= size
                self.published += messages

    async def publish(
        self,
        client: redis.Redis,
        control: list[tuple[str, bytes, bytes]],
        batch: list[tuple[str, bytes, int]],
    ) -> None:
        """One pipeline. The turns that queued while the previous pipeline
        was in flight are merged: a room's bodies of several turns, in
        order, travel as one packet (up to PACKET_TARGET), so each process
        parses one Redis message per room per round trip, not per turn.
        PUBLISH answers how many subscribers got each packet: the hellos'
        answers say how many acknowledgements to wait for, the data's
        whether anyone else still listens."""
        pipe = client.pipeline(transaction=False)
        sent: list[tuple[str, bytes, int]] = []  # (room, hello nonce or b"", epoch)
        for room, signal, nonce in control:
            pipe.publish(self.channel(room), signal)
            sent.append((room, nonce, 0))
        bodies: dict[str, list[bytes]] = {}
        for room, body, _ in batch:
            bodies.setdefault(room, []).append(body)
        head = self.head
        for room, parts in bodies.items():
            channel = self.channel(room)
            link = self.links.get(room)
            epoch = -1 if link is None else link.epoch
            packet = [head]
            size = 0
            for body in parts:
                if size and size + len(body) > PACKET_TARGET:
                    pipe.publish(channel, b"".join(packet))
                    sent.append((room, b"", epoch))
                    packet, size = [head], 0
                packet.append(body)
                size += len(body)
            pipe.publish(channel, b"".join(packet))
            sent.append((room, b"", epoch))
        replies = await pipe.execute()
        for (room, nonce, epoch), receivers in zip(sent, replies, strict=True):
            link = self.links.get(room)
            if link is None:
                continue
            if nonce:
                if link.nonce == nonce:
                    self.await_acks(room, link, int(receivers) - 1)
            elif epoch == link.epoch and int(receivers) <= 1:
                # Only we got it, and no hello came since it was sent: the
                # room's messages stay here until one does.
                link.others = False

    def say_hello(self, room: str) -> None:
        """Our subscription to the room is confirmed: ask the others to
        publish its messages (its members wait for their answers)."""
        link = self.links.get(room)
        if link is None:
            link = self.links[room] = RoomLink()
        link.nonce = os.urandom(8)
        link.acks_due = -1
        link.acks = 0
        self.control.append((room, _HELLO.pack(HELLO, self.origin, link.nonce), link.nonce))
        self.wake_writer.set()

    def await_acks(self, room: str, link: RoomLink, due: int) -> None:
        link.acks_due = due
        if link.acks >= due:
            self.joined(room, link)
        else:
            link.timer = asyncio.get_running_loop().call_later(
                ACK_WAIT, self.ack_wait_over, room, link.nonce
            )

    def ack_wait_over(self, room: str, nonce: bytes) -> None:
        link = self.links.get(room)
        if link is not None and link.nonce == nonce:
            self.joined(room, link)

    def joined(self, room: str, link: RoomLink) -> None:
        """Every other process publishes the room's messages: its new
        members may be told they joined (their 101 was held until now)."""
        if link.timer is not None:
            link.timer.cancel()
            link.timer = None
        link.nonce = b""
        self.hub.room_ready(room)

    def heard_hello(self, room: str, origin: bytes, nonce: bytes) -> None:
        link = self.links.get(room)
        if link is not None:
            link.others = True
            link.epoch += 1
        self.control.append((room, _ACK.pack(ACK, self.origin, origin, nonce), b""))
        self.wake_writer.set()

    def heard_ack(self, room: str, data: bytes) -> None:
        _, _, to, nonce = _ACK.unpack(data)
        link = self.links.get(room)
        if to != self.origin or link is None or not link.nonce or link.nonce != nonce:
            return
        link.acks += 1
        if link.acks == link.acks_due:
            self.joined(room, link)

    async def read_loop(self, pubsub: PubSub) -> None:
        hub = self.hub
        prefix_len = len(self.prefix)
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is None:
                continue
            kind = message["type"]
            if kind == "subscribe":
                # Redis confirmed the channel: from now on every message to
                # it reaches us. Now ask the others to publish the room.
                self.say_hello(message["channel"][prefix_len:].decode("utf-8", "replace"))
                continue
            if kind == "unsubscribe":
                link = self.links.pop(
                    message["channel"][prefix_len:].decode("utf-8", "replace"), None
                )
                if link is not None and link.timer is not None:
                    link.timer.cancel()
                continue
            if kind != "message":
                continue
            data = message["data"]
            if data[1 : 1 + ORIGIN_SIZE] == self.origin:
                continue  # ours, back from Redis: local members have it
            try:
                room = message["channel"][prefix_len:].decode("utf-8")
                packet_kind = data[0] if data else 0
                if packet_kind == DATA and len(data) >= _HEAD.size:
                    self.received += hub.deliver_packet(room, data, _HEAD.size)
                elif packet_kind == HELLO and len(data) == _HELLO.size:
                    _, origin, nonce = _HELLO.unpack(data)
                    self.heard_hello(room, origin, nonce)
                elif packet_kind == ACK and len(data) == _ACK.size:
                    self.heard_ack(room, data)
                else:
                    raise ValueError("not a fastrelay packet")
            except ValueError as e:  # UnicodeDecodeError is one
                self.foreign_message(message["channel"], e)

    def foreign_message(self, channel: bytes, problem: Exception) -> None:
        # Someone else publishes on our channels (a prefix shared with
        # another application?): say so once, ignore what they send.
        if not self.foreign_warned:
            self.foreign_warned = True
            self.log.warning(
                "backplane: ignoring messages on %r that fastrelay did not publish (%s)",
                channel,
                problem,
            )


def redact_error(error: BaseException, settings: BackplaneConfig) -> str:
    """An exception's text without the password (some errors quote the URL)."""
    text = " ".join((str(error) or type(error).__name__).splitlines())
    password = redis_password(settings)
    return text.replace(password, "***") if password else text


def redis_password(settings: BackplaneConfig) -> str | None:
    if settings.password_env:
        return os.environ.get(settings.password_env)
    password = urlsplit(settings.url).password
    return unquote(password) if password else None
