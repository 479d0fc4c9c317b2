"""A deliberately broken relay, to show that the benchmark catches faults.

A picows relay like picows_relay.py but simpler (it does not reassemble
fragmented messages, which the load generator never sends) that drops,
duplicates or corrupts every Nth delivery, counted over all members, as
chosen on the command line. `python bench/selfcheck.py` runs the quick
fan-out against it in each mode and expects verification to fail, then
with no fault and expects it to pass.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from _common import Listening, room_of, run_peer
from picows import WSListener, WSMsgType, WSTransport, ws_create_server

rooms: dict[str, dict[WSTransport, None]] = {}


@dataclass
class Fault:
    kind: str = "drop"  # drop | duplicate | corrupt
    every: int = 0  # the fault hits every Nth delivery; 0: never
    count: int = 0  # deliveries so far, over all members


fault = Fault()


def deliver(member: WSTransport, msg_type, payload) -> None:
    fault.count += 1
    if fault.every and fault.count % fault.every == 0:
        if fault.kind == "drop":
            return
        if fault.kind == "duplicate":
            member.send(msg_type, payload)
        elif fault.kind == "corrupt":
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


def add_fault_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fault", choices=("drop", "duplicate", "corrupt"), default="drop")
    parser.add_argument(
        "--every", type=int, default=1000, help="the fault hits every Nth delivery (0: never)"
    )


async def listen(args: argparse.Namespace) -> Listening:
    fault.kind, fault.every = args.fault, args.every
    server = await ws_create_server(
        lambda req: FaultyListener(room_of(req.path.decode("latin-1"))),
        args.host,
        args.port,
        backlog=1024,
    )

    async def close() -> None:
        server.close()

    return Listening(server.sockets[0].getsockname()[1], close)


if __name__ == "__main__":
    run_peer(__doc__, listen, add_fault_arguments)
