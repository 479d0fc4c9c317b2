"""The publish API: a backend pushes a message into a room, and operators
list rooms, over HTTP on the private metrics listener.

    POST /publish/<room>   body = the message  -> {"room", "delivered"}
    GET  /rooms[?limit=N&after=ROOM]           -> {"rooms": [{"room", "members"}], "total", "next"}
    GET  /rooms/<room>                         -> {"room", "members"}, 404 when it has none

The room in the URL is the relay's room without its leading "/" and with
the same percent-decoding (`/publish/team%2Fa` and `/publish/team/a` both
name `/team/a`). Every request needs `Authorization: Bearer <api key>`,
compared in constant time. A `text/*` or JSON body goes out as a text frame
and must be UTF-8; any other body as a binary frame.

The API asks an `AsyncRooms` for the rooms. In one relay process that is
`LocalRooms` over the relay itself: "delivered" is how many members of the
room on this process got the message (the backplane, if any, carries it to
other processes and hosts). With `server.workers` above 1 it is the
supervisor (supervisor.py), which hands the message to one worker and sums
the workers' counts: "delivered" and "members" then count the room's
members connected to this host, over all its workers. When no worker can
answer the API says 503 (or 504 when a worker took a message and did not
confirm it in time), as an `Unavailable` raised by the rooms.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Mapping
from typing import Protocol
from urllib.parse import parse_qs, unquote_to_bytes

from .metrics import BodyReader, Request, Response

log = logging.getLogger("fastrelay.api")

PUBLISH = "/publish/"
ROOMS = "/rooms"
PAGE_SIZE = 100  # rooms per page of GET /rooms, unless ?limit= says otherwise
MAX_PAGE_SIZE = 1000

_JSON = "application/json"
_CHALLENGE = (("WWW-Authenticate", 'Bearer realm="fastrelay-api"'),)


class Rooms(Protocol):
    """The rooms of one relay process, answered at once (server.Relay)."""

    def publish(self, room: str, text: bool, payload: bytes) -> int: ...

    def room_sizes(self) -> Mapping[str, int]: ...

    def members(self, room: str) -> int: ...


class AsyncRooms(Protocol):
    """What the API needs: the same questions, possibly asked of other
    processes. Each may raise Unavailable."""

    async def publish(self, room: str, text: bool, payload: bytes) -> int: ...

    async def room_sizes(self) -> Mapping[str, int]: ...

    async def members(self, room: str) -> int: ...


class Unavailable(Exception):
    """The rooms cannot answer now: the API answers `status` with `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class LocalRooms:
    """AsyncRooms over the rooms of this process."""

    def __init__(self, rooms: Rooms) -> None:
        self._rooms = rooms

    async def publish(self, room: str, text: bool, payload: bytes) -> int:
        return self._rooms.publish(room, text, payload)

    async def room_sizes(self) -> Mapping[str, int]:
        return self._rooms.room_sizes()

    async def members(self, room: str) -> int:
        return self._rooms.members(room)


def _json(status: int, value: object, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    body = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
    return Response(status, body, _JSON, headers)


def _error(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return _json(status, {"error": message}, headers)


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _room_of(encoded: str) -> str | None:
    """The room named by the rest of a URL path, decoded as the relay
    decodes upgrade paths; None if it is not UTF-8."""
    try:
        return "/" + unquote_to_bytes(encoded).decode("utf-8")
    except UnicodeDecodeError:
        return None


def _frame_kind(content_type: str | None) -> bool | str:
    """True for a text frame, False for binary, or why the type is refused."""
    if content_type is None:
        return False
    media, *params = [part.strip().lower() for part in content_type.split(";")]
    is_text = media.startswith("text/") or media == _JSON or media.endswith("+json")
    if not is_text:
        return False
    for param in params:
        name, _, value = param.partition("=")
        if name.strip() == "charset" and value.strip().strip('"') not in ("utf-8", "us-ascii"):
            # A text frame is UTF-8 (RFC 6455 §5.6); the relay does not transcode.
            return "text must be UTF-8 (charset=utf-8)"
    return True


class PublishApi:
    def __init__(self, key: bytes, rooms: AsyncRooms, max_message_size: int) -> None:
        # Digests of equal length: compare_digest then takes the same time
        # whatever the length of the key presented.
        self._key_digest = _digest(key)
        self._rooms = rooms
        self._max_message_size = max_message_size

    def handles(self, path: str) -> bool:
        return path.startswith(PUBLISH) or path == ROOMS or path.startswith(ROOMS + "/")

    def _authorized(self, request: Request) -> bool:
        value = request.header("authorization") or ""
        scheme, _, credentials = value.partition(" ")
        presented = credentials.strip().encode("latin-1") if scheme.lower() == "bearer" else b""
        return hmac.compare_digest(_digest(presented), self._key_digest)

    async def respond(self, request: Request, read_body: BodyReader) -> Response:
        try:
            return await self._respond(request, read_body)
        except Unavailable as e:
            return _error(e.status, e.message)

    async def _respond(self, request: Request, read_body: BodyReader) -> Response:
        if not self._authorized(request):
            return _error(401, "a valid API key is required", _CHALLENGE)
        if request.path.startswith(PUBLISH):
            if request.method != "POST":
                return _error(405, "use POST", (("Allow", "POST"),))
            return await self._publish(request, read_body)
        if request.method not in ("GET", "HEAD"):
            return _error(405, "use GET", (("Allow", "GET, HEAD"),))
        if request.path == ROOMS:
            return await self._list(request)
        return await self._one(request.path[len(ROOMS) + 1 :])

    async def _publish(self, request: Request, read_body: BodyReader) -> Response:
        room = _room_of(request.path[len(PUBLISH) :])
        if room is None:
            return _error(400, "the room is not UTF-8 after percent-decoding")
        if "transfer-encoding" in request.headers:
            return _error(411, "send the body with a Content-Length")
        length_field = request.header("content-length")
        if length_field is None:
            return _error(411, "send the body with a Content-Length")
        if not (length_field.isascii() and length_field.isdigit()):
            return _error(400, "bad Content-Length")
        length = int(length_field)
        if length > self._max_message_size:
            # Refused before reading: the body never enters memory.
            return _error(413, f"message larger than {self._max_message_size} bytes")
        kind = _frame_kind(request.header("content-type"))
        if isinstance(kind, str):
            return _error(415, kind)
        payload = await read_body(length) if length else b""
        if kind:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                return _error(400, "a text body must be valid UTF-8")
        delivered = await self._rooms.publish(room, kind, payload)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("published %d bytes to room %s: %d members", length, room, delivered)
        return _json(200, {"room": room, "delivered": delivered})

    async def _list(self, request: Request) -> Response:
        query = parse_qs(request.query)
        limit_values = query.get("limit", [str(PAGE_SIZE)])
        limit_text = limit_values[-1]
        if not (limit_text.isascii() and limit_text.isdigit()) or not (
            1 <= int(limit_text) <= MAX_PAGE_SIZE
        ):
            return _error(400, f"limit must be an integer from 1 to {MAX_PAGE_SIZE}")
        limit = int(limit_text)
        after = query.get("after", [""])[-1]
        sizes = await self._rooms.room_sizes()
        names = sorted(name for name in sizes if name > after)
        page = names[:limit]
        return _json(
            200,
            {
                "rooms": [{"room": name, "members": sizes[name]} for name in page],
                "total": len(sizes),
                # Pass it as ?after= for the next page; null on the last one.
                "next": page[-1] if len(names) > limit else None,
            },
        )

    async def _one(self, encoded: str) -> Response:
        room = _room_of(encoded)
        if room is None:
            return _error(400, "the room is not UTF-8 after percent-decoding")
        members = await self._rooms.members(room)
        if not members:
            return _error(404, "no such room")
        return _json(200, {"room": room, "members": members})
