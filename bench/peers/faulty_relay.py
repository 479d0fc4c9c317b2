"""A deliberately broken relay, to show that the benchmark catches faults.

Same as picows_relay.py, except that every Nth delivery (counted over all
members) is dropped, duplicated or corrupted, as chosen on the command line.
`python bench/selfcheck.py` runs the benchmark against it and expects the
run to fail verification.
"""

from __future__ import annotations

import argparse

import uvloop
from _common import announce, raise_nofile_limit, room_of, stop_on_signal
from picows import WSListener, WSMsgType, WSTransport, ws_create_server

rooms: dict[str, dict[WSTransport, None]] = {}
fault = {"kind": "drop", "every": 0, "count": 0}


def deliver(member: WSTransport, msg_type, payload) -> None:
    fault["count"] += 1
    if fault["every"] and fault["count"] % fault["every"] == 0:
        kind = fault["kind"]
        if kind == "drop":
            return
        if kind == "duplicate":
            member.send(msg_type, payload)
        elif kind == "corrupt":
            data = bytearray(payload)
            data[len(data) // 2] ^= 0x01
            payload = bytes(data)
    member.send(msg_type, payload)


class FaultyListener(WSListener):
    def __init__(self, path: str) -> None:
        self.path = path
        self.members: dict[WSTransport, None] | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.members = rooms.setdefault(self.path, {})
        self.members[transport] = None

    def on_ws_frame(self, transport: WSTransport, frame) -> None:
        if frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
            payload = frame.get_payload_as_bytes()
            for member in self.members:
                deliver(member, frame.msg_type, payload)
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.members is not None:
            self.members.pop(transport, None)
            if not self.members:
                rooms.pop(self.path, None)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fault", choices=("drop", "duplicate", "corrupt"), default="drop")
    parser.add_argument(
        "--every", type=int, default=1000, help="the fault hits every Nth delivery (0: never)"
    )
    args = parser.parse_args()
    fault.update(kind=args.fault, every=args.every)
    raise_nofile_limit()
    stop = stop_on_signal()
    server = await ws_create_server(
        lambda req: FaultyListener(room_of(req.path.decode("latin-1"))),
        args.host,
        args.port,
        backlog=1024,
    )
    announce(args.host, server.sockets[0].getsockname()[1])
    try:
        await stop
    finally:
        server.close()


if __name__ == "__main__":
    uvloop.run(main())
