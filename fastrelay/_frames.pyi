# Type stub for the compiled relay (fastrelay/_frames.pyx; layouts in _frames.pxd).
import asyncio
import enum
from collections.abc import Sequence
from typing import Any, Callable, Protocol

class Opcode(enum.IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA

class CloseCode(enum.IntEnum):
    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    NO_STATUS_RECEIVED = 1005
    ABNORMAL_CLOSURE = 1006
    INVALID_PAYLOAD_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011

class State(enum.IntEnum):
    HANDSHAKE = 0
    OPEN = 1
    CLOSING = 2
    CLOSED = 3

class _Gate(Protocol):
    # Returns a handshake.Incomplete, Accept or Refuse.
    def decide(self, head: memoryview, scan_from: int, conn: Connection) -> Any: ...
    # With access checks: a Refuse, or (read_only, expires_at).
    def grant(
        self, room: str, query: str, authorization: tuple[str, ...], conn: Connection
    ) -> Any: ...

class _Backplane(Protocol):
    # Called once per loop turn with (room, packet body, messages in it): the
    # turn's local messages, gathered per room, in order.
    def send_batch(self, batch: list[tuple[str, bytes, int]]) -> None: ...
    # True: the room is ready now; False: hub.room_ready() will say when.
    def room_opened(self, room: str) -> bool: ...
    def room_closed(self, room: str) -> None: ...

class _EventLike(Protocol):
    def set(self) -> None: ...

class Room:
    name: str
    pending: bool
    def __len__(self) -> int: ...

class Hub:
    gate: _Gate | None
    fast_upgrade: bool
    fast_needs_grant: bool
    max_connections: int
    max_request_head: int
    max_headers: int
    compression: bool
    close_log: Callable[[Connection, int, str, bool], None] | None
    backplane: _Backplane | None
    all_gone: _EventLike | None
    rooms: dict[str, Room]
    echo: bool
    max_message_size: int
    max_backlog: int
    drop_slow: bool
    backpressure: bool
    slow_client_timeout: float
    max_rate: int
    handshake_timeout: float
    close_timeout: float
    ping_interval: float
    ping_timeout: float
    now: float
    connected: int
    messages: int
    deliveries: int
    protocol_errors: int
    slow_disconnects: int
    slow_drops: int
    clients_count: int
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | Any,
        gate: _Gate | None = ...,
        *,
        echo: bool = ...,
        max_message_size: int = ...,
        max_backlog: int = ...,
        slow_client_policy: str = ...,
        max_messages_per_second: int = ...,
        handshake_timeout: float = ...,
        close_timeout: float = ...,
        ping_interval: float = ...,
        ping_timeout: float = ...,
        slow_client_timeout: float = ...,
    ) -> None: ...
    def counters(self) -> dict[str, Any]: ...
    def sweep(self, now: float) -> int: ...
    def close_all(self, code: int, reason: str) -> None: ...
    def abort_all(self) -> None: ...
    def flush(self) -> None: ...
    def publish(self, room_name: str, text: bool, payload: bytes) -> int: ...
    def deliver_packet(self, room_name: str, packet: bytes, start: int) -> int: ...
    def room_ready(self, room_name: str) -> None: ...
    def release_pending_rooms(self) -> None: ...

class Connection(asyncio.BufferedProtocol):
    hub: Hub
    room: Room | None
    transport: Any
    state: State
    deflate: bool
    read_only: bool
    expires_at: float
    close_code: int
    deadline: float
    backlog: int
    peer: str
    def __init__(self, hub: Hub) -> None: ...
    def abort(self) -> None: ...

def base64url_decode_canonical(segment: bytes) -> bytes | None: ...

class HmacTokens:
    """Accepts plain HMAC tokens (_tokens.pxi); None for anything else."""
    def __init__(
        self,
        secret: bytes,
        algorithms: Sequence[str],
        *,
        audience: str | None,
        issuer: str | None,
        leeway: float,
    ) -> None: ...
    def claims(self, token: str, now: float | None = None) -> dict[str, Any] | None: ...
