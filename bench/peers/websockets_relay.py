"""Broadcast relay on `websockets` (asyncio implementation) and uvloop.

Uses `websockets.broadcast()`, the library's recommended fan-out primitive:
it writes to every connection synchronously without awaiting each one.
"""

from __future__ import annotations

import argparse

from _common import Listening, room_of, run_peer
from websockets.asyncio.server import broadcast, serve

rooms: dict[str, set] = {}


async def handler(websocket) -> None:
    path = room_of(websocket.request.path)
    members = rooms.get(path)
    if members is None:
        members = rooms[path] = set()
    members.add(websocket)
    try:
        # recv() returns str for text and bytes for binary; broadcast() maps
        # them back to the same opcode, so the message type is preserved.
        async for message in websocket:
            broadcast(members, message)
    finally:
        members.discard(websocket)
        if not members:
            rooms.pop(path, None)


async def listen(args: argparse.Namespace) -> Listening:
    # compression=None: fastrelay does not compress by default and the load
    # generator does not offer permessage-deflate; keep the comparison even.
    # max_queue is larger than the default 16 so a burst from a sender's
    # in-flight window does not stall reading every 16 messages.
    # open_timeout: the spot check's handshake arrives while the relay is
    # saturated by the load; the default 10 s dropped it once on a busy VM.
    server = await serve(
        handler,
        args.host,
        args.port,
        compression=None,
        max_queue=1024,
        backlog=1024,
        open_timeout=60,
        ssl=args.ssl,
    )

    async def close() -> None:
        server.close()
        await server.wait_closed()

    return Listening(server.sockets[0].getsockname()[1], close)


if __name__ == "__main__":
    run_peer(__doc__, listen)
