"""A real redis-server for the backplane tests: 127.0.0.1, a free port,
no persistence, started and stopped by PID.

The port comes from binding port 0 and closing it just before redis-server
binds it; redis-server refuses to start on a taken port (and says so), so a
lost race fails loudly instead of talking to another server. Readiness is
read from redis-server's own log line, never waited for with a sleep.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import redis

START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
READY_LINE = "Ready to accept connections"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process; stop() and start() again keep its port, so
    a relay configured with its URL finds it back after an outage."""

    def __init__(self, workdir: Path, port: int | None = None, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed: bash .ci/install-redis.sh"
        self.binary = binary
        self.workdir = workdir
        self.port = port or free_port()
        self.password = password
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[str] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> RedisServer:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
            + ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
            + (["--requirepass", self.password] if self.password else []),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        ready = threading.Event()
        threading.Thread(target=self._pump, args=(self.proc, ready), daemon=True).start()
        if not ready.wait(START_TIMEOUT) or self.proc.poll() is not None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)
            raise AssertionError("redis-server did not start:\n" + "\n".join(self.log[-20:]))
        return self

    def _pump(self, proc: subprocess.Popen[str], ready: threading.Event) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.log.append(line.rstrip("\n"))
            if READY_LINE in line:
                ready.set()
        ready.set()  # ended: start() sees the exit status

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal by PID and wait for the exit."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)
            raise

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, socket_timeout=10)

    def channels(self) -> set[bytes]:
        """PUBSUB CHANNELS: the channels with at least one subscriber now."""
        with self.client() as c:
            return set(c.pubsub_channels())

    def wait_subscribers(self, channel: bytes, count: int, timeout: float = 20.0) -> None:
        """Until `channel` has exactly `count` subscribers (PUBSUB NUMSUB).

        Subscribing is asynchronous in each relay; this asks Redis, the one
        place that knows, until it says so or the deadline passes.
        """
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while True:
                (_, now), *_ = c.pubsub_numsub(channel)
                if now == count:
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"{channel[:80]!r}: {now} subscribers, expected {count}")
                time.sleep(0.01)  # a poll interval on Redis's answer, not a wait for an event
