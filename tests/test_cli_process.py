"""The `fastrelay` command as a user runs it: a real process, real signals.

Every relay listens on 127.0.0.1 port 0 and the test reads the real ports
back from the lines the process prints. Waits are on the process's output or
exit, each bounded, never a fixed sleep.
"""

from __future__ import annotations

import base64
import os
import queue
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
import yaml
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import fastrelay.config as config_module
from fastrelay._version import __version__

PACKAGE_ROOT = Path(os.path.abspath(config_module.__file__)).parent.parent
BOUND = 20.0  # upper bound of every wait; generous for slow CI machines

pytestmark = pytest.mark.skipif(os.name != "posix", reason="signals")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(PACKAGE_ROOT), e.get("PYTHONPATH")])
    )
    return e


def config_text(**sections: dict) -> str:
    """YAML for a relay on 127.0.0.1 with free ports, plus `sections` overrides."""
    base: dict[str, dict] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "metrics": {"host": "127.0.0.1", "port": 0},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return yaml.safe_dump(base)


class RelayProcess:
    """`python -m fastrelay` with its stdout and stderr read line by line."""

    def __init__(self, workdir: Path, config: str) -> None:
        (workdir / "config.yaml").write_text(config)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastrelay", "--config-file", "config.yaml"],
            cwd=workdir,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: dict[str, queue.Queue[str | None]] = {
            "stdout": queue.Queue(),
            "stderr": queue.Queue(),
        }
        self.seen: dict[str, list[str]] = {"stdout": [], "stderr": []}
        for name in self.lines:
            threading.Thread(target=self._pump, args=(name,), daemon=True).start()
        self.ws_url = ""
        self.metrics_url = ""

    def _pump(self, name: str) -> None:
        for line in getattr(self.proc, name):
            self.lines[name].put(line.rstrip("\n"))
        self.lines[name].put(None)  # EOF

    def expect(self, name: str, pattern: str) -> re.Match[str]:
        """Consume lines of `name` until one matches `pattern`."""
        deadline = time.monotonic() + BOUND
        while True:
            try:
                line = self.lines[name].get(
                    timeout=max(0.0, deadline - time.monotonic())
                )
            except queue.Empty:
                raise AssertionError(
                    f"no {pattern!r} on {name} within {BOUND}s; saw {self.seen[name]}"
                ) from None
            if line is None:
                raise AssertionError(
                    f"{name} closed before {pattern!r}; saw {self.seen[name]}"
                )
            self.seen[name].append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def rest(self, name: str) -> list[str]:
        """Every remaining line of `name` (call after the process exited)."""
        while (line := self.lines[name].get(timeout=BOUND)) is not None:
            self.seen[name].append(line)
        return self.seen[name]

    def started(self, metrics: bool = True) -> RelayProcess:
        self.ws_url = self.expect(
            "stdout", r"^fastrelay listening on (wss?://127\.0\.0\.1:\d+/)$"
        ).group(1)
        if metrics:
            self.metrics_url = self.expect(
                "stdout", r"^metrics on (http://127\.0\.0\.1:\d+/metrics)$"
            ).group(1)
        return self

    @property
    def port(self) -> int:
        return int(self.ws_url.rsplit(":", 1)[1].rstrip("/"))

    def http(self, path: str) -> tuple[int, str]:
        url = self.metrics_url.replace("/metrics", path)
        try:
            with urllib.request.urlopen(url, timeout=BOUND) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self) -> int:
        return self.proc.wait(timeout=BOUND)


@pytest.fixture
def relay(tmp_path) -> Iterator[Callable[..., RelayProcess]]:
    started: list[RelayProcess] = []

    def start(config: str | None = None, workdir: Path | None = None) -> RelayProcess:
        process = RelayProcess(
            workdir or tmp_path, config if config is not None else config_text()
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait(timeout=BOUND)


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not scraped"
    return float(match.group(1))


def raw_client(port: int) -> socket.socket:
    """A client that completes the upgrade and then never reads or answers."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=BOUND)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        assert chunk, "connection closed during the upgrade"
        response += chunk
    assert response.startswith(b"HTTP/1.1 101 "), response
    return sock


# --- command line ---


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastrelay", *args],
        check=False,  # the exit code is what is being tested
        cwd=cwd,
        env=env(),
        capture_output=True,
        text=True,
        timeout=BOUND,
    )


def test_version(tmp_path):
    result = run_cli("--version", cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"fastrelay {__version__}\n",
        "",
    )


def test_help(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert (
        result.returncode == 0
        and "--config-file PATH" in result.stdout
        and "SIGHUP" in result.stdout
    )


def test_unknown_option_is_a_usage_error(tmp_path):
    result = run_cli("--confg-file", "x.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unrecognized arguments: --confg-file" in result.stderr


# --- start, serve, stop ---


def test_prints_and_logs_the_urls_then_stops_on_sigterm(relay):
    r = relay().started()
    assert r.port > 0 and r.metrics_url
    r.expect(
        "stderr",
        r"^\d{4}-\d\d-\d\dT[\d:.]+Z \[INFO\] fastrelay listening on "
        + re.escape(r.ws_url)
        + "$",
    )
    r.expect("stderr", r"\[INFO\] metrics on " + re.escape(r.metrics_url) + "$")
    r.send_signal(signal.SIGTERM)
    assert r.wait() == 0
    stderr = "\n".join(r.rest("stderr"))
    assert (
        "[INFO] SIGTERM received: shutting down" in stderr
        and "[INFO] shutdown complete" in stderr
    )
    assert r.rest("stdout") == [
        f"fastrelay listening on {r.ws_url}",
        f"metrics on {r.metrics_url}",
    ]


def test_sigint_stops_cleanly(relay):
    r = relay().started()
    r.send_signal(signal.SIGINT)
    assert r.wait() == 0
    assert "Traceback" not in "\n".join(r.rest("stderr"))


def test_metrics_disabled_prints_only_the_relay_url(relay):
    r = relay(config_text(metrics={"enabled": False})).started(metrics=False)
    r.send_signal(signal.SIGTERM)
    assert r.wait() == 0
    assert r.rest("stdout") == [f"fastrelay listening on {r.ws_url}"]


def test_level_warn_hides_info_lines(relay):
    r = relay(config_text(logging={"level": "warn"})).started()
    r.send_signal(signal.SIGTERM)
    assert r.wait() == 0
    assert r.rest("stderr") == []


def test_metrics_and_health_after_traffic(relay):
    r = relay().started()
    with connect(r.ws_url, open_timeout=BOUND, close_timeout=BOUND) as ws:
        ws.send("hello")
        assert ws.recv(timeout=BOUND) == "hello"  # echo: the sender gets it too
        status, text = r.http("/metrics")
        assert status == 200
        assert metric(text, "websocket_connected_clients") == 1
        assert metric(text, "websocket_connections_total") == 1
        assert metric(text, "websocket_messages_total") == 1
        assert metric(text, "websocket_disconnections_total") == 0
        assert r.http("/healthz") == (200, "ok")
        assert r.http("/readyz") == (200, "ready")
    r.send_signal(signal.SIGTERM)
    assert r.wait() == 0


def test_graceful_shutdown_closes_clients_with_1001(relay):
    r = relay().started()
    with connect(r.ws_url, open_timeout=BOUND, close_timeout=BOUND) as ws:
        r.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=BOUND)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    assert r.wait() == 0


def test_second_signal_during_shutdown_exits_at_once_with_130(relay):
    # The raw client never answers the 1001 close, so the graceful shutdown
    # would wait the whole minute; the second signal must cut it short.
    r = relay(config_text(timeouts={"shutdown": 60, "close": 60})).started()
    client = raw_client(r.port)
    try:
        r.send_signal(signal.SIGTERM)
        r.expect("stderr", r"\[INFO\] closing clients with 1001")
        assert r.http("/readyz") == (
            503,
            "not ready",
        )  # draining: take us out of rotation
        assert r.http("/healthz") == (200, "ok")  # but alive
        r.send_signal(signal.SIGTERM)
        assert r.wait() == 130
    finally:
        client.close()
    assert "[WARN] SIGTERM during shutdown: exiting now" in "\n".join(r.rest("stderr"))


def test_log_file_is_appended_across_runs(relay, tmp_path):
    config = config_text(logging={"output": "relay.log"})
    for _ in range(2):
        r = relay(config).started()
        r.send_signal(signal.SIGTERM)
        assert r.wait() == 0
    log = (tmp_path / "relay.log").read_text()
    assert log.count(f"[INFO] fastrelay {__version__} starting") == 2
    assert log.count("[INFO] shutdown complete") == 2


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    # For state with no event to wait on (a file another process writes):
    # poll with a deadline.
    deadline = time.monotonic() + BOUND
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_sighup_reopens_the_log_file(relay, tmp_path):
    log, rotated = tmp_path / "relay.log", tmp_path / "relay.log.1"
    r = relay(config_text(logging={"output": "relay.log"})).started()
    log.rename(rotated)  # logrotate "create" mode
    r.send_signal(signal.SIGHUP)
    wait_until(
        lambda: log.exists() and "SIGHUP: log output reopened" in log.read_text(),
        "the reopened log file",
    )
    r.send_signal(signal.SIGTERM)
    assert r.wait() == 0
    assert (
        "starting" in rotated.read_text()
        and "shutdown complete" not in rotated.read_text()
    )
    assert "shutdown complete" in log.read_text() and "starting" not in log.read_text()


def test_tls_serves_wss(relay, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    r = relay(config_text(server={"tls": {"enabled": True}})).started()
    assert r.ws_url.startswith("wss://127.0.0.1:")
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(client_ctx)
    with connect(
        r.ws_url, ssl=client_ctx, open_timeout=BOUND, close_timeout=BOUND
    ) as ws:
        ws.send("secret")
        assert ws.recv(timeout=BOUND) == "secret"
    r.send_signal(signal.SIGTERM)
    assert r.wait() == 0


# --- ports that cannot be used ---


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def assert_cannot_listen(r: RelayProcess, port: int) -> None:
    assert r.wait() == 2
    stderr = r.rest("stderr")
    assert "Traceback" not in "\n".join(stderr)
    errors = [line for line in stderr if line.startswith("fastrelay: error: ")]
    assert errors == [
        f"fastrelay: error: cannot listen on 127.0.0.1:{port}: address already in use"
    ]
    assert stderr[-1] == errors[0]
    assert r.rest("stdout") == []  # nothing announced, nothing served


def test_relay_port_in_use(relay, taken_port):
    assert_cannot_listen(relay(config_text(server={"port": taken_port})), taken_port)


def test_metrics_port_in_use(relay, taken_port):
    assert_cannot_listen(relay(config_text(metrics={"port": taken_port})), taken_port)


def test_port_in_use_is_logged_to_a_log_file(relay, taken_port, tmp_path):
    r = relay(config_text(server={"port": taken_port}, logging={"output": "relay.log"}))
    assert r.wait() == 2
    assert (
        f"[ERROR] cannot listen on 127.0.0.1:{taken_port} (relay): address already in use"
        in (tmp_path / "relay.log").read_text()
    )
