"""Broadcast relay on aiohttp's web WebSocket support, on uvloop.

Each message is encoded once and written to every member with send_frame(),
which skips the per-member str.encode() that send_str() would do.
"""

from __future__ import annotations

import argparse

from _common import Listening, room_of, run_peer
from aiohttp import WSMsgType, web

TEXT = WSMsgType.TEXT
BINARY = WSMsgType.BINARY

rooms: dict[str, set[web.WebSocketResponse]] = {}


async def relay(request: web.Request) -> web.StreamResponse:
    # One more than fastrelay's 1 MiB limit: aiohttp refuses a message of
    # exactly max_msg_size (1009), fastrelay and websockets accept it.
    ws = web.WebSocketResponse(max_msg_size=(1 << 20) + 1)
    await ws.prepare(request)
    path = room_of(request.raw_path)
    members = rooms.get(path)
    if members is None:
        members = rooms[path] = set()
    members.add(ws)
    try:
        async for msg in ws:
            if msg.type is TEXT:
                data, opcode = msg.data.encode(), TEXT
            elif msg.type is BINARY:
                data, opcode = msg.data, BINARY
            else:
                continue
            # send_frame() is a coroutine (it awaits drain above the write
            # buffer limit), so members can leave while we iterate: walk a
            # snapshot, and skip members whose transport is closing.
            for member in tuple(members):
                try:
                    await member.send_frame(data, opcode)
                except ConnectionError:
                    pass
    finally:
        members.discard(ws)
        if not members:
            rooms.pop(path, None)
    return ws


async def listen(args: argparse.Namespace) -> Listening:
    app = web.Application()
    app.router.add_get("/{tail:.*}", relay)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port, backlog=1024, ssl_context=args.ssl).start()
    return Listening(runner.addresses[0][1], runner.cleanup)


if __name__ == "__main__":
    run_peer(__doc__, listen)
