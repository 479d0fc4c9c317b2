"""A worker process, started by the supervisor: `python -m fastrelay.worker FD`.

FD is the worker's end of its control channel (control.py). The worker
reads its configuration and index from it, logs to the same output as the
supervisor with a `worker N:` prefix, and runs the relay on the shared port
(cli.serve). Not meant to be started by hand.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import socket
import sys

import uvloop

from .cli import EXIT_USAGE, StartupError, serve
from .control import ControlChannel
from .logs import setup_logging

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class _WorkerPrefix(logging.Filter):
    """Marks each line with the worker it comes from."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.prefix = f"worker {index}: "

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


def _die_with_the_supervisor() -> None:
    """Linux: SIGTERM when the supervisor dies, whatever the worker is doing
    (the control channel's end-of-file covers the rest, once serving)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux


async def _work(fd: int) -> int:
    control = await ControlChannel.open(socket.socket(fileno=fd))
    kind, cfg, index = await control.receive()
    assert kind == "start"
    try:
        sink = setup_logging(cfg.logging.output, cfg.logging.level)
    except OSError as e:
        control.send("failed", f"logging.output: cannot open '{cfg.logging.output}': {e}")
        return EXIT_USAGE
    sink.handler.addFilter(_WorkerPrefix(index))
    try:
        return await serve(cfg, sink, None, control)
    except StartupError as e:
        control.send("failed", str(e))
        await control.writer.drain()
        return EXIT_USAGE
    finally:
        sink.close()


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("fastrelay.worker: started by the supervisor only", file=sys.stderr)
        return EXIT_USAGE
    _die_with_the_supervisor()
    return uvloop.run(_work(int(argv[0])))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
