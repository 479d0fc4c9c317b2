"""The one way the tests (and .ci/wheel-test.sh) run a fastrelay process.

`python -m fastrelay --config-file <yaml>` listening on 127.0.0.1 port 0: the
real ports come back from the lines it prints on stdout. Every wait is
bounded and waits on the process's output or exit, never a fixed sleep.
Stopping is by PID with a signal, and the exit status is returned for the
caller to check. Threads read stdout and stderr to the end, so the relay
never blocks on a full pipe, and keep them as lines for assertions.

FASTRELAY_CMD (optional) replaces `python -m fastrelay` as the command, e.g.
to run the tests against another build; it gets `--config-file FILE`.

The relay imports the same fastrelay package as the tests: the directory
holding it leads PYTHONPATH (the checkout the tests run from, or
site-packages when testing an installed wheel), since the relay runs in its
own directory where an editable install elsewhere would otherwise win.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import yaml

READY_TIMEOUT = 20.0  # start -> the URL lines are printed
STOP_TIMEOUT = 20.0  # signal -> exit (the graceful shutdown waits up to 10 s by default)
OUTPUT_TAIL = 80  # lines of each stream quoted in a failure message

LISTENING = re.compile(r"^fastrelay listening on (wss?://\S+/)$")
METRICS_LISTENING = re.compile(r"^metrics on (http://\S+/metrics)$")

# What every test relay starts from: loopback, a free port, no metrics
# endpoint unless a test asks for one (METRICS_ON).
BASE_CONFIG: dict[str, Any] = {
    "server": {"host": "127.0.0.1", "port": 0},
    "metrics": {"enabled": False},
    "logging": {"level": "info"},
}
METRICS_ON: dict[str, Any] = {"metrics": {"enabled": True, "host": "127.0.0.1", "port": 0}}


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` laid over it, section by section (nested dicts merge)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def package_root() -> str | None:
    """The directory holding the fastrelay package the tests import (not
    resolved: the very same path), or None when there is none."""
    spec = importlib.util.find_spec("fastrelay")
    if spec is None or spec.origin is None:
        return None
    return os.path.dirname(os.path.dirname(os.path.abspath(spec.origin)))


def relay_environment() -> dict[str, str]:
    env = dict(os.environ)
    root = package_root()
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def default_command() -> list[str]:
    return shlex.split(os.environ.get("FASTRELAY_CMD", "")) or [sys.executable, "-m", "fastrelay"]


class OutputLines:
    """One output stream of the process, read to EOF by a thread, as lines."""

    def __init__(self, name: str, stream: IO[str]) -> None:
        self.name = name
        self._lines: list[str] = []
        self._ended = False
        self._consumed = 0  # lines before this one were handed out by next_line()
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._reader.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self._lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def next_line(self, deadline: float) -> str | None:
        """The next line not handed out yet; None once the stream has ended.
        Raises TimeoutError when `deadline` (time.monotonic()) passes first."""
        with self._changed:
            while self._consumed == len(self._lines):
                if self._ended:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self._changed.wait(left)
            self._consumed += 1
            return self._lines[self._consumed - 1]

    def all(self) -> list[str]:
        """Every line so far (complete once the process has been waited for)."""
        with self._changed:
            return list(self._lines)

    def text(self) -> str:
        return "\n".join(self.all())

    def wait_ended(self, timeout: float) -> bool:
        self._reader.join(timeout)
        return not self._reader.is_alive()


class RelayProcess:
    """A started relay. `url` and `metrics_url` are set once wait_ready() has
    read them from stdout (start_relay() does that unless told not to)."""

    def __init__(self, config: dict[str, Any], config_path: Path, command: list[str]) -> None:
        self.name = config_path.stem
        self.config_path = config_path
        self._wants_metrics = bool(config.get("metrics", {}).get("enabled", True))
        self.proc = subprocess.Popen(
            [*command, "--config-file", str(config_path)],
            cwd=config_path.parent,  # relative paths in the config (log file, TLS files)
            env=relay_environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        self.stdout = OutputLines("stdout", self.proc.stdout)  # type: ignore[arg-type]
        self.stderr = OutputLines("stderr", self.proc.stderr)  # type: ignore[arg-type]
        self.url = ""
        self.metrics_url: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        assert self.url, "the relay has not reported its URL yet (wait_ready)"
        return int(self.url.rstrip("/").rsplit(":", 1)[1])

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def ws(self, path: str = "/") -> str:
        """The relay's URL (ws:// or wss://) for the room `path`."""
        return self.url.rstrip("/") + path

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> RelayProcess:
        self.url = self.expect("stdout", LISTENING, timeout).group(1)
        if self._wants_metrics:
            self.metrics_url = self.expect("stdout", METRICS_LISTENING, timeout).group(1)
        return self

    def expect(
        self, stream: str, pattern: str | re.Pattern[str], timeout: float = READY_TIMEOUT
    ) -> re.Match[str]:
        """Consume lines of `stream` ("stdout" or "stderr") up to the first
        one matching `pattern`; fail if the stream ends or `timeout` passes first."""
        lines: OutputLines = getattr(self, stream)
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.next_line(deadline)
            except TimeoutError:
                raise AssertionError(
                    f"{self.name}: no line matching {regex.pattern!r} on {stream} within "
                    f"{timeout}s\n{self.output()}"
                ) from None
            if line is None:
                raise AssertionError(
                    f"{self.name}: {stream} ended ({self._ended_how()}) before a line "
                    f"matching {regex.pattern!r}\n{self.output()}"
                )
            match = regex.search(line)
            if match:
                return match

    def _ended_how(self) -> str:
        # A closed stream usually means the process is exiting: give it a
        # bounded moment so the message can name the exit status.
        try:
            return f"exit status {self.proc.wait(STOP_TIMEOUT)}"
        except subprocess.TimeoutExpired:
            return "the process is still running"

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)  # by PID; nothing is sent once it has been reaped

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """The exit status, once the process has exited and both streams are read."""
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} (pid {self.pid}) still running after {timeout}s\n{self.output()}"
            ) from None
        for lines in (self.stdout, self.stderr):
            if not lines.wait_ended(timeout):
                raise AssertionError(
                    f"{self.name} exited {status} but its {lines.name} is still open: "
                    "a child process holds it"
                )
        return status

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Signal by PID and return the exit status; a relay that does not
        exit within `timeout` is killed and the stop fails."""
        self.send_signal(sig)
        try:
            return self.wait(timeout)
        except AssertionError:
            self.kill()
            raise

    def kill(self) -> None:
        if self.running:
            self.proc.kill()
        self.proc.wait(STOP_TIMEOUT)

    def output(self) -> str:
        """Both streams so far, for failure messages."""
        parts = []
        for lines in (self.stdout, self.stderr):
            tail = lines.all()[-OUTPUT_TAIL:]
            parts.append(f"--- {self.name} {lines.name} ---\n" + "\n".join(tail))
        return "\n".join(parts)


def start_relay(
    workdir: Path,
    overrides: dict[str, Any] | None = None,
    *,
    name: str = "relay",
    command: list[str] | None = None,
    ready: bool = True,
) -> RelayProcess:
    """Write BASE_CONFIG + `overrides` to workdir/<name>.yaml and start the
    relay with it in `workdir`; with `ready`, return once it has printed its
    URL (and the metrics URL when metrics are on)."""
    config = merged(BASE_CONFIG, overrides or {})
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    relay = RelayProcess(config, config_path, command or default_command())
    if ready:
        try:
            relay.wait_ready()
        except AssertionError:
            relay.kill()
            raise
    return relay


class RelayGroup:
    """The relays one test (or one module) starts, all in one directory;
    stop_all() at its end checks how each one ended."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[RelayProcess] = []

    def start(
        self, overrides: dict[str, Any] | None = None, name: str = "relay", *, ready: bool = True
    ) -> RelayProcess:
        relay = start_relay(self.workdir, overrides, name=f"{name}{len(self.started)}", ready=ready)
        self.started.append(relay)
        return relay

    def stop_all(self) -> None:
        """SIGTERM to every relay still running. Fails if one of those does
        not exit 0, or if any relay of the group wrote a traceback."""
        problems = []
        for relay in self.started:
            try:
                if relay.running:
                    status = relay.stop()
                    if status != 0:
                        problems.append(
                            f"{relay.name} exited {status} on SIGTERM\n{relay.output()}"
                        )
                else:
                    relay.wait()  # the test ended it; only its output is checked
            except AssertionError as failure:
                problems.append(str(failure))
            if "Traceback" in relay.stderr.text():
                problems.append(f"{relay.name} wrote a traceback\n{relay.output()}")
        assert not problems, "\n\n".join(problems)
