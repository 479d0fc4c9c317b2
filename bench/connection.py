"""A load-generator client's connection once its TCP socket is open: the
server's 101 taken, writes that never block, the closing handshake.

loadgen.Member (64-byte text messages) and large.LargeMember (binary
messages up to a megabyte) read and check what arrives in their own ways;
this is the part they share. A subclass supplies the reading side:
_ingest() for bytes that came with the 101 and _stop_reading(); it may
react to a failed send (_send_failed) and to its queued bytes all being
written (_out_drained).
"""

from __future__ import annotations

import abc
import asyncio
import socket
from typing import Optional

from .frames import close_frame, new_mask
from .upgrade import check_response


class ClientConnection(abc.ABC):
    def __init__(self) -> None:
        self.sock: Optional[socket.socket] = None
        self.fd = -1
        self.lost = False  # the connection ended: EOF or a socket error
        self.closing = False  # our close frame is on its way
        self.error: Optional[str] = None
        self.key = new_mask()  # masks every frame this client sends
        self.out: list[bytes] = []  # what the kernel did not take yet, in order
        self.closed: Optional[asyncio.Future] = None  # resolves when the connection ends

    def handshake_done(self, sock: socket.socket, head: bytes, accept: bytes) -> None:
        """The Connector's call: check the server's 101 (head: everything
        read so far, frames that followed the response included)."""
        end = head.find(b"\r\n\r\n")
        check_response(head[:end], accept)
        self.sock = sock
        self.fd = sock.fileno()
        self.closed = asyncio.get_running_loop().create_future()
        rest = head[end + 4 :]
        if rest:  # frames may follow the 101 response in the same read
            self._ingest(rest)

    @abc.abstractmethod
    def _ingest(self, data: bytes) -> None:
        """Frames that came in the Connector's read of the 101, not in one
        of this connection's own reads."""

    @abc.abstractmethod
    def _stop_reading(self) -> None:
        """No more reads: the connection is closing or lost."""

    # -- writing ---------------------------------------------------------
    def write(self, data) -> None:
        if self.lost:
            return
        if self.out:
            self.out.append(bytes(data))
            return
        try:
            n = self.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self._send_failed(exc)
            return
        if n < len(data):
            # The kernel buffer is full (rare with bounded windows): finish
            # the write when the socket is writable again.
            self.out.append(bytes(data[n:]))
            asyncio.get_running_loop().add_writer(self.fd, self._on_writable)

    def _on_writable(self) -> None:
        while self.out:
            data = self.out[0]
            try:
                n = self.sock.send(data)
            except BlockingIOError:
                return
            except OSError as exc:
                self.out.clear()
                asyncio.get_running_loop().remove_writer(self.fd)
                self._send_failed(exc)
                return
            if n < len(data):
                self.out[0] = data[n:]
                return
            self.out.pop(0)
        asyncio.get_running_loop().remove_writer(self.fd)
        self._out_drained()

    @abc.abstractmethod
    def _send_failed(self, exc: OSError) -> None:
        """A write failed: the subclass records why and gives up the connection."""

    def _out_drained(self) -> None:  # noqa: B027 (an optional hook: nothing by default)
        """Everything queued is written (a sender may have more to send)."""

    # -- ending ----------------------------------------------------------
    def close(self) -> None:
        """Closing handshake: a close frame (1000); `closed` resolves on
        the server's EOF."""
        if self.sock is None or self.lost:
            return
        self.closing = True
        self.write(close_frame(self.key))

    def dispose(self) -> None:
        if self.sock is not None:
            self._stop_reading()
            if self.out:
                asyncio.get_running_loop().remove_writer(self.fd)
                self.out.clear()
            self.sock.close()
            self.sock = None
