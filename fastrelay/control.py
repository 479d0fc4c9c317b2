"""The private channel between the supervisor and one worker.

A UNIX socketpair per worker, created by the supervisor; the worker gets its
end as an inherited file descriptor. Messages are tuples, pickled, each
preceded by its length. Both ends are this program, so pickle is safe
here; nothing else can reach the socket.

supervisor -> worker: ("start", Config, index) once, then ("snapshot",)
                      at each scrape of the supervisor's /metrics
worker -> supervisor: ("ready", port) or ("failed", one-line reason) once,
                      then ("snapshot", counters) for each request

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

    @classmethod
    async def open(cls, sock: socket.socket) -> ControlChannel:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    def send(self, *message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.writer.write(_LENGTH.pack(len(data)) + data)

    async def receive(self) -> tuple[Any, ...]:
        """The next message; asyncio.IncompleteReadError at end-of-file."""
        (length,) = _LENGTH.unpack(await self.reader.readexactly(_LENGTH.size))
        message = pickle.loads(await self.reader.readexactly(length))
        assert isinstance(message, tuple)
        return message

    def close(self) -> None:
        self.writer.close()
