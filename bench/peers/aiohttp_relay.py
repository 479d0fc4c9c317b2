"""Broadcast relay on aiohttp's web WebSocket support, on uvloop.

Each message is encoded once and written to every member with send_frame(),
which skips the per-member str.encode() that send_str() would do.
"""

from __future__ import annotations

import uvloop
from _common import announce, parse_args, raise_nofile_limit, room_of, stop_on_signal
from aiohttp import WSMsgType, web

TEXT = WSMsgType.TEXT
BINARY = WSMsgType.BINARY

rooms: dict[str, set[web.WebSocketResponse]] = {}


async def relay(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(max_msg_size=1 << 20)
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


async def main() -> None:
    args = parse_args(__doc__)
    raise_nofile_limit()
    app = web.Application()
    app.router.add_get("/{tail:.*}", relay)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=1024)
    await site.start()
    port = runner.addresses[0][1]
    stop = stop_on_signal()
    announce(args.host, port)
    try:
        await stop
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    uvloop.run(main())
