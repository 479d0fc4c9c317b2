"""Who gets in: the decision on each HTTP upgrade request.

A connection still in its handshake hands the request bytes read so far to
`Gate.decide` and acts on the value it gets back:

- `handshake.Incomplete`: read more, resume the search at `scan_from`;
- `handshake.Accept`: send its 101 response and join its room;
- `handshake.Refuse`: send its response (an HTTP error, or the demo page
  with status 200) and close.

Nothing here calls back into the connection. Access control is one more
step of `decide`: with a verifier, the token decides between a `Refuse`
(401, 403) and an `Accept` carrying what the token grants (read-only, the
time it ends).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import auth, handshake
from ._frames import Connection

Decision = handshake.Incomplete | handshake.Accept | handshake.Refuse


@dataclass(frozen=True, slots=True)
class GateSettings:
    limits: handshake.Limits
    max_connections: int  # 0: unlimited
    demo_page: bytes | None  # served on a plain GET when set
    verifier: auth.Verifier | None = None  # set: every upgrade needs a token


class Gate:
    """Decides on upgrade requests, counts and logs refusals."""

    def __init__(self, settings: GateSettings, log: logging.Logger) -> None:
        self.settings = settings
        self.log = log
        self.accepting = True  # False once the shutdown has begun
        self.failures: dict[str, int] = {}  # refusals by reason (a metrics label)
        # The event loop's time(), set by the server. Without it a token's
        # expiry is placed on the hub's clock as of its last sweep, which
        # lags by up to a sweep interval and would close connections early.
        self.clock: Callable[[], float] | None = None

    def allows_fast_path(self) -> bool:
        """Whether the compiled scan may accept ordinary upgrades without
        asking: nothing to check beyond the request itself (no tokens, no
        origin list) and nothing to log per connection."""
        settings = self.settings
        return not settings.limits.allowed_origins and not self.log.isEnabledFor(logging.DEBUG)

    def grant(
        self, room: str, query: str, authorization: tuple[str, ...], conn: Connection
    ) -> handshake.Refuse | tuple[bool, float]:
        """The token check for a request the compiled scan accepted: a
        refusal (counted), or (read_only, expires_at) to open with."""
        verifier = self.settings.verifier
        assert verifier is not None  # the hub asks only when access checks are on
        outcome = self._token_outcome(verifier, room, query, authorization, conn)
        if isinstance(outcome, handshake.Refuse):
            self.count_failure(outcome.reason)
        return outcome

    def count_failure(self, reason: str, n: int = 1) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + n

    def decide(self, head: memoryview, scan_from: int, conn: Connection) -> Decision:
        settings = self.settings
        result = handshake.parse_request(head, scan_from, settings.limits)
        if isinstance(result, handshake.Incomplete):
            return result
        if isinstance(result, handshake.Accept):
            result = self._admit(result, conn)
            if isinstance(result, handshake.Accept):
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

    def _admit(
        self, accept: handshake.Accept, conn: Connection
    ) -> handshake.Accept | handshake.Refuse:
        """A well-formed upgrade request: is there room, and is it allowed?"""
        settings = self.settings
        if not self.accepting:
            return handshake.refuse("too_many_connections", "shutting down")
        if settings.max_connections and conn.hub.connected >= settings.max_connections:
            return handshake.refuse("too_many_connections", "connection limit reached")
        if settings.verifier is not None:
            return self._check_token(settings.verifier, accept, conn)
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("connection %s joined room %s", conn.peer, accept.room)
        return accept

    def _check_token(
        self, verifier: auth.Verifier, accept: handshake.Accept, conn: Connection
    ) -> handshake.Accept | handshake.Refuse:
        outcome = self._token_outcome(
            verifier, accept.room, accept.query, accept.authorization, conn
        )
        if isinstance(outcome, handshake.Refuse):
            return outcome
        read_only, expires_at = outcome
        return dataclasses.replace(accept, read_only=read_only, expires_at=expires_at)

    def _token_outcome(
        self,
        verifier: auth.Verifier,
        room: str,
        query: str,
        authorization: tuple[str, ...],
        conn: Connection,
    ) -> handshake.Refuse | tuple[bool, float]:
        token = auth.find_token(query, authorization)
        outcome = verifier.check(token, room)
        if isinstance(outcome, auth.Denial):
            return handshake.refuse(
                outcome.reason, outcome.detail, (("WWW-Authenticate", outcome.challenge()),)
            )
        expires_at = 0.0
        if verifier.enforce_expiry:
            # The hub's deadlines are on the event loop's clock; the token's
            # is Unix time.
            loop_now = self.clock() if self.clock is not None else conn.hub.now
            expires_at = loop_now + (outcome.expires - time.time())
        if self.log.isEnabledFor(logging.DEBUG):
            # The subject names who joined; the token itself is never logged.
            self.log.debug(
                "connection %s joined room %s (sub %r%s)",
                conn.peer,
                room,
                outcome.subject,
                ", read-only" if outcome.read_only else "",
            )
        return outcome.read_only, expires_at
