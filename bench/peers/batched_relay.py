"""Control peer: fastrelay's batching idea in plain Python, on picows and uvloop.

It tells how much of fastrelay's lead comes from batching writes and how
much from its compiled path. picows does the handshake and parses client
frames (its parser is Cython, like fastrelay's); everything else is Python:

- each complete data message is encoded into a server frame once and queued
  on its room;
- once per event-loop turn (loop.call_soon), every room with queued frames
  joins them into one bytes object and writes it to each member with one
  transport write: one system call per member per turn, not per delivery.

The queue is per room rather than per member: every member of a room gets
the same bytes, so one join serves them all and no Python work is done per
delivery. picows_relay.py is the same relay with one send() per delivery,
so the two differ only in batching.
"""

from __future__ import annotations

import argparse
import asyncio
import struct

from _common import Listening, room_of, run_peer
from picows import WSCloseCode, WSListener, WSMsgType, WSTransport, ws_create_server

TEXT = WSMsgType.TEXT
BINARY = WSMsgType.BINARY
CONTINUATION = WSMsgType.CONTINUATION
CLOSE = WSMsgType.CLOSE
# First byte of a final frame of each data message type: FIN bit + opcode.
FIRST_BYTE = {TEXT: 0x81, BINARY: 0x82}


def encode_frame(msg_type: WSMsgType, payload) -> bytes:
    """An unmasked, final server frame (RFC 6455 section 5.2)."""
    first, n = FIRST_BYTE[msg_type], len(payload)
    if n < 126:
        head = bytes((first, n))
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, 126, n)
    else:
        head = struct.pack("!BBQ", first, 127, n)
    return head + payload


class Room:
    __slots__ = ("members", "pending")

    def __init__(self) -> None:
        # The members' asyncio transports, written directly (picows' own
        # send() would build and write a frame per member); a dict keeps
        # join order and O(1) removal.
        self.members: dict[asyncio.Transport, None] = {}
        self.pending: list[bytes] = []  # frames queued this turn, in arrival order

    def flush(self) -> None:
        pending = self.pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        self.pending = []
        for member in self.members:
            # A member picows is disconnecting stays listed until its
            # connection_lost; writing to its closed transport would raise.
            if not member.is_closing():
                member.write(data)


class Hub:
    """The rooms, and the rooms with frames queued in this loop turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.rooms: dict[str, Room] = {}
        self.dirty: list[Room] = []

    def join(self, path: str, member: asyncio.Transport) -> Room:
        room = self.rooms.get(path)
        if room is None:
            room = self.rooms[path] = Room()
        # Frames queued before the join are not the newcomer's.
        room.flush()
        room.members[member] = None
        return room

    def leave(self, path: str, room: Room, member: asyncio.Transport) -> None:
        room.members.pop(member, None)
        if not room.members:
            room.pending = []
            self.rooms.pop(path, None)

    def publish(self, room: Room, frame: bytes) -> None:
        if not room.pending:
            if not self.dirty:
                self.loop.call_soon(self.flush)
            self.dirty.append(room)
        room.pending.append(frame)

    def flush(self) -> None:
        dirty, self.dirty = self.dirty, []
        for room in dirty:
            room.flush()


class BatchedListener(WSListener):
    __slots__ = ("hub", "path", "room", "member", "frag_type", "frag_parts")

    def __init__(self, hub: Hub, path: str) -> None:
        self.hub = hub
        self.path = path
        self.room: Room  # set once connected: frames only come after that
        self.member: asyncio.Transport | None = None
        # picows delivers frames, not messages: fragments are collected
        # here and the whole message is relayed as one frame.
        self.frag_type: WSMsgType | None = None
        self.frag_parts: list[bytes] = []

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.member = transport.underlying_transport
        self.room = self.hub.join(self.path, self.member)

    def on_ws_frame(self, transport: WSTransport, frame) -> None:
        msg_type = frame.msg_type
        if msg_type is TEXT or msg_type is BINARY:
            if self.frag_type is not None:
                self._fail(transport)  # a new message inside a fragmented one
            elif frame.fin:
                self.hub.publish(
                    self.room, encode_frame(msg_type, frame.get_payload_as_memoryview())
                )
            else:
                self.frag_type = msg_type
                self.frag_parts = [frame.get_payload_as_bytes()]
        elif msg_type is CONTINUATION:
            if self.frag_type is None:
                self._fail(transport)
                return
            self.frag_parts.append(frame.get_payload_as_bytes())
            if frame.fin:
                payload = b"".join(self.frag_parts)
                self.hub.publish(self.room, encode_frame(self.frag_type, payload))
                self.frag_type = None
                self.frag_parts = []
        elif msg_type is CLOSE:
            # What was queued for this member goes out before its close frame.
            self.room.flush()
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()

    def _fail(self, transport: WSTransport) -> None:
        self.room.flush()
        transport.send_close(WSCloseCode.PROTOCOL_ERROR)
        transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.member is not None:
            self.hub.leave(self.path, self.room, self.member)
            self.member = None


async def listen(args: argparse.Namespace) -> Listening:
    hub = Hub(asyncio.get_running_loop())
    server = await ws_create_server(
        lambda request: BatchedListener(hub, room_of(request.path.decode("latin-1"))),
        args.host,
        args.port,
        backlog=1024,
        ssl=args.ssl,
    )

    async def close() -> None:
        server.close()

    return Listening(server.sockets[0].getsockname()[1], close)


if __name__ == "__main__":
    run_peer(__doc__, listen)
