"""What the backplane and worker tests share: bounded websockets clients,
exact-delivery checks, and waiting on a relay's own output or Redis's
answer (never on a fixed sleep)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import websockets
from redis_server import RedisServer

from relay_process import RelayProcess
from scrape import scrape

STEP = 20.0  # any one await; a lost message fails the test, never hangs it
PREFIX = b"fastrelay:"


def run(coro: Any, timeout: float = 50) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def connect(url: str, *, compress: bool = False) -> Any:
    return websockets.connect(
        url,
        open_timeout=STEP,
        close_timeout=STEP,
        max_size=None,
        compression="deflate" if compress else None,
    )


async def recv(ws: Any) -> str | bytes:
    return await asyncio.wait_for(ws.recv(), STEP)


async def expect_exactly(ws: Any, expected: list[str | bytes], end: str) -> None:
    """`ws` gets `expected` (in order) and then `end`, and nothing else: a
    duplicate or a message from elsewhere would come before the end marker
    (same room, same path through Redis, order kept)."""
    got = [await recv(ws) for _ in range(len(expected))]
    assert got == expected
    assert await recv(ws) == end


def channel(room: str) -> bytes:
    return PREFIX + room.encode("utf-8")


def wait_until(check: Callable[[], bool], what: str, timeout: float = STEP) -> None:
    """Poll a condition only an outside party can answer (Redis, /metrics)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.02)


def metric(relay: RelayProcess, name: str) -> float:
    assert relay.metrics_url
    return scrape(relay.metrics_url).get(name, float("nan"))


def backplane(redis: RedisServer, **extra: Any) -> dict[str, Any]:
    return {"backplane": {"url": redis.url, **extra}}
