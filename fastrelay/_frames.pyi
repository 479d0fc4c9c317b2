# Type stub for the compiled codec (fastrelay/_frames.pyx).
import asyncio
from typing import Any

STATE_HANDSHAKE: int
STATE_OPEN: int
STATE_CLOSING: int
STATE_CLOSED: int

class FrameError(Exception):
    code: int
    reason: str
    def __init__(self, code: int, reason: str) -> None: ...

def encode_frame(opcode: int, payload: bytes, fin: bool = ..., mask: bytes | None = ...) -> bytes: ...
def validate_utf8(data: bytes) -> bool: ...

class FrameReader:
    def __init__(self, require_mask: bool = ...) -> None: ...
    def feed(self, data: bytes) -> list[tuple[bool, int, bytes]]: ...

class Room:
    name: str
    def __len__(self) -> int: ...

class Hub:
    rooms: dict[str, Room]
    echo: bool
    max_message_size: int
    max_backlog: int
    drop_slow: bool
    max_rate: int
    connected: int
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        echo: bool = ...,
        max_message_size: int = ...,
        max_backlog: int = ...,
        slow_client_policy: str = ...,
        max_messages_per_second: int = ...,
    ) -> None: ...
    def counters(self) -> dict[str, Any]: ...
    def tick(self) -> None: ...
    def flush(self) -> None: ...

class Connection(asyncio.BufferedProtocol):
    hub: Hub
    room: Room | None
    transport: Any
    state: int
    deflate: bool
    backlog: int
    close_code: int
    pong_received: bool
    def __init__(self, hub: Hub) -> None: ...
    def accept(self, room_name: str, response: bytes, consumed: int, deflate: bool = ...) -> None: ...
    def reject(self, response: bytes) -> None: ...
    def close(self, code: int = ..., reason: str = ...) -> None: ...
    def abort(self) -> None: ...
    def send_ping(self, payload: bytes = ...) -> None: ...
    def on_close(self, code: int, reason: str, by_peer: bool) -> None: ...
    def on_slow_client(self) -> None: ...
