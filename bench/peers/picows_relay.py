"""Broadcast relay on picows (Cython WebSocket library) and uvloop.

picows hands every frame to a listener callback; for each complete data
message the relay loops over the room's transports and calls send(), which
builds the frame (header and a copy of the payload) in that transport's own
buffer and writes it at once: one send() system call per delivery.
"""

from __future__ import annotations

import argparse

from _common import Listening, room_of, run_peer
from picows import WSCloseCode, WSListener, WSMsgType, WSTransport, ws_create_server

TEXT = WSMsgType.TEXT
BINARY = WSMsgType.BINARY
CONTINUATION = WSMsgType.CONTINUATION
CLOSE = WSMsgType.CLOSE

# path -> {transport: None}; a dict keeps insertion order and O(1) removal.
rooms: dict[str, dict[WSTransport, None]] = {}


class RelayListener(WSListener):
    __slots__ = ("path", "members", "frag_type", "frag_parts")

    def __init__(self, path: str) -> None:
        self.path = path
        self.members: dict[WSTransport, None] | None = None
        # Fragmented messages are reassembled so that members receive the
        # same message; picows delivers frames, not messages.
        self.frag_type: WSMsgType | None = None
        self.frag_parts: list[bytes] = []

    def on_ws_connected(self, transport: WSTransport) -> None:
        members = rooms.get(self.path)
        if members is None:
            members = rooms[self.path] = {}
        members[transport] = None
        self.members = members

    def on_ws_frame(self, transport: WSTransport, frame) -> None:
        msg_type = frame.msg_type
        if msg_type is TEXT or msg_type is BINARY:
            if frame.fin:
                # send() copies the payload, so the memoryview into picows'
                # read buffer is only used while it is valid.
                payload = frame.get_payload_as_memoryview()
                for member in self.members:
                    member.send(msg_type, payload)
            else:
                self.frag_type = msg_type
                self.frag_parts = [frame.get_payload_as_bytes()]
        elif msg_type is CONTINUATION:
            if self.frag_type is None:
                transport.send_close(WSCloseCode.PROTOCOL_ERROR)
                transport.disconnect()
                return
            self.frag_parts.append(frame.get_payload_as_bytes())
            if frame.fin:
                payload = b"".join(self.frag_parts)
                msg_type = self.frag_type
                self.frag_type: WSMsgType | None = None
                self.frag_parts = []
                for member in self.members:
                    member.send(msg_type, payload)
        elif msg_type is CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        members = self.members
        if members is not None:
            members.pop(transport, None)
            if not members:
                rooms.pop(self.path, None)
            self.members = None


def listener_factory(request) -> RelayListener:
    return RelayListener(room_of(request.path.decode("latin-1")))


async def listen(args: argparse.Namespace) -> Listening:
    server = await ws_create_server(
        listener_factory, args.host, args.port, backlog=1024, ssl=args.ssl
    )

    async def close() -> None:
        server.close()

    return Listening(server.sockets[0].getsockname()[1], close)


if __name__ == "__main__":
    run_peer(__doc__, listen)
