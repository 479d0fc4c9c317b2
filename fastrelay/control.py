"""The private channel between the supervisor and one worker.

A UNIX socketpair per worker, created by the supervisor; the worker gets its
end as an inherited file descriptor. Messages are tuples, pickled, each
preceded by its length. Both ends are this program, so pickle is safe
here; nothing else can reach the socket.

supervisor -> worker: ("start", Config, index) once, then requests
worker -> supervisor: ("ready", port) or ("failed", one-line reason) once,
                      then one answer per request, in order

A request is (kind, number, *arguments); its answer is (kind, number,
value), the number telling a late answer (to a request the supervisor
stopped waiting for) from the one awaited:

    ("snapshot", n)                     -> counters, at each scrape of /metrics
    ("publish", n, room, text, payload) -> members here that got it (Hub.publish:
                                           also published once to the backplane)
    ("members", n, room)                -> members of the room here
    ("rooms", n)                        -> {room: members here}

When the supervisor dies the worker reads end-of-file and shuts down, so
no worker outlives its supervisor.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from typing import Any

_LENGTH = struct.Struct(">I")


class ControlChannel:
    """One end of the socketpair, as framed messages."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._length: int | None = None  # of the message whose body is awaited

    @classmethod
    async def open(cls, sock: socket.socket) -> ControlChannel:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    def send(self, *message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.writer.write(_LENGTH.pack(len(data)) + data)

    async def receive(self) -> tuple[Any, ...]:
        """The next message; asyncio.IncompleteReadError at end-of-file.

        Safe to cancel (a timeout): readexactly() takes nothing from the
        buffer until it has it all, and a length already read is kept for
        the next call, so the framing is never lost."""
        if self._length is None:
            (self._length,) = _LENGTH.unpack(await self.reader.readexactly(_LENGTH.size))
        body = await self.reader.readexactly(self._length)
        self._length = None
        message = pickle.loads(body)
        assert isinstance(message, tuple)
        return message

    def close(self) -> None:
        self.writer.close()
