"""The life of a peer relay, shared by all of them: command line, listen,
announce the port, serve until SIGTERM, close.

A peer only supplies `listen(args)`, which starts its library's server and
returns a Listening; run_peer() does the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import uvloop


@dataclass
class Listening:
    port: int  # the port the kernel chose (peers listen on port 0)
    close: Callable[[], Awaitable[None]]  # stops listening; called once, at exit


def run_peer(
    description: str,
    listen: Callable[[argparse.Namespace], Awaitable[Listening]],
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    # Port 0 lets the kernel choose; the real port is printed in the ready
    # line, which is what the harness reads (no pre-picked ports, no races).
    parser.add_argument("--port", type=int, default=0)
    # wss workloads: serve TLS with this certificate (PEM files); every peer
    # hands args.ssl (None without TLS) to its library's server.
    parser.add_argument("--tls-cert", default=None)
    parser.add_argument("--tls-key", default=None)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    args.ssl = None
    if args.tls_cert:
        args.ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        args.ssl.load_cert_chain(args.tls_cert, args.tls_key)
    _raise_nofile_limit()
    uvloop.run(_serve(args, listen))


async def _serve(
    args: argparse.Namespace, listen: Callable[[argparse.Namespace], Awaitable[Listening]]
) -> None:
    stop = _stop_on_signal()
    listening = await listen(args)
    # The harness waits for exactly this line on stdout before connecting.
    scheme = "wss" if args.ssl is not None else "ws"
    print(f"listening on {scheme}://{args.host}:{listening.port}/", flush=True)
    try:
        await stop
    finally:
        await listening.close()


def _raise_nofile_limit() -> None:
    # The connections workload opens thousands of sockets; the default soft
    # limit (often 1024) would make accept() fail long before the hard limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def room_of(path: str) -> str:
    # The room is the request path without the query string.
    return path.split("?", 1)[0]


def _stop_on_signal() -> asyncio.Future[None]:
    """A future that SIGINT or SIGTERM completes: the harness stops a peer
    with SIGTERM and expects it to close its listener and exit."""
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    return stop
