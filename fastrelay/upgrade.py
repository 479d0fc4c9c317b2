"""Who gets in: the decision on each HTTP upgrade request.

A connection still in its handshake hands the request bytes read so far to
`Gate.decide` and acts on the value it gets back:

- `handshake.Incomplete`: read more, resume the search at `scan_from`;
- `handshake.Accept`: send its 101 response and join its room;
- `handshake.Refuse`: send its response (an HTTP error, or the demo page
  with status 200) and close.

Nothing here calls back into the connection. A further check (a token, say)
is one more step of `decide` returning a `Refuse`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from . import handshake
from ._frames import Connection

Decision = handshake.Incomplete | handshake.Accept | handshake.Refuse


@dataclass(frozen=True, slots=True)
class GateSettings:
    limits: handshake.Limits
    max_connections: int  # 0: unlimited
    demo_page: bytes | None  # served on a plain GET when set


class Gate:
    """Decides on upgrade requests, counts and logs refusals."""

    def __init__(self, settings: GateSettings, log: logging.Logger) -> None:
        self.settings = settings
        self.log = log
        self.accepting = True  # False once the shutdown has begun
        self.failures: dict[str, int] = {}  # refusals by reason (a metrics label)

    def count_failure(self, reason: str, n: int = 1) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + n

    def decide(self, head: memoryview, scan_from: int, conn: Connection) -> Decision:
        settings = self.settings
        result = handshake.parse_request(head, scan_from, settings.limits)
        if isinstance(result, handshake.Incomplete):
            return result
        if isinstance(result, handshake.Accept):
            if not self.accepting:
                result = handshake.refuse("too_many_connections", "shutting down")
            elif settings.max_connections and conn.hub.connected >= settings.max_connections:
                result = handshake.refuse("too_many_connections", "connection limit reached")
            else:
                if self.log.isEnabledFor(logging.DEBUG):
                    self.log.debug("connection %s joined room %s", conn.peer, result.room)
                return result
        if isinstance(result, handshake.PlainGet):
            if settings.demo_page is not None:
                return handshake.Refuse(
                    200,
                    "",
                    "demo page",
                    handshake.http_response(
                        200, "OK", settings.demo_page, "text/html; charset=utf-8"
                    ),
                )
            result = handshake.refuse(
                "upgrade_required", "this is a WebSocket endpoint", handshake.UPGRADE_HEADERS
            )
        self.count_failure(result.reason)
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug(
                "handshake from %s refused: %d %s", conn.peer, result.status, result.detail
            )
        return result
