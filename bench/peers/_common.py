"""Command line and readiness line shared by the peer relays."""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    # Port 0 lets the kernel choose; the real port is printed in the ready
    # line, which is what the harness reads (no pre-picked ports, no races).
    parser.add_argument("--port", type=int, default=0)
    return parser.parse_args()


def raise_nofile_limit() -> None:
    # The connections workload opens thousands of sockets; the default soft
    # limit (often 1024) would make accept() fail long before the hard limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def announce(host: str, port: int) -> None:
    # The harness waits for exactly this line on stdout before connecting.
    print(f"listening on ws://{host}:{port}/", flush=True)


def room_of(path: str) -> str:
    # The room is the request path without the query string.
    return path.split("?", 1)[0]


def stop_on_signal() -> asyncio.Future[None]:
    """A future that SIGINT or SIGTERM completes: the harness stops a peer
    with SIGTERM and expects it to close its listener and exit."""
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    return stop
