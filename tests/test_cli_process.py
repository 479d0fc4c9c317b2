"""The `fastrelay` command as a user runs it: a real process, real signals.

Every relay listens on 127.0.0.1 port 0 and the test reads the real ports
back from the lines the process prints (relay_process.py). Waits are on the
process's output or exit, each bounded, never a fixed sleep.
"""

from __future__ import annotations

import re
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from fastrelay._frames import CloseCode
from fastrelay._version import __version__
from relay_process import METRICS_ON, RelayProcess, default_command, merged
from wsraw import RawClient

BOUND = 20.0  # upper bound of every wait; generous for slow CI machines


def config(**sections: dict[str, Any]) -> dict[str, Any]:
    """Overrides for a relay with its metrics endpoint on, plus `sections`."""
    return merged(METRICS_ON, sections)


def http(r: RelayProcess, path: str) -> tuple[int, str]:
    """GET `path` on the relay's metrics port."""
    assert r.metrics_url
    url = r.metrics_url.replace("/metrics", path)
    try:
        with urllib.request.urlopen(url, timeout=BOUND) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not scraped"
    return float(match.group(1))


# --- command line ---


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*default_command(), *args],
        check=False,  # the exit code is what is being tested
        cwd=cwd,
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


def test_prints_and_logs_the_urls_then_stops_on_sigterm(relay_factory):
    r = relay_factory(config())
    assert re.fullmatch(r"ws://127\.0\.0\.1:\d+/", r.url) and r.port > 0
    assert r.metrics_url and re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", r.metrics_url)
    r.expect(
        "stderr",
        r"^\d{4}-\d\d-\d\dT[\d:.]+Z \[INFO\] fastrelay listening on " + re.escape(r.url) + "$",
    )
    r.expect("stderr", r"\[INFO\] metrics on " + re.escape(r.metrics_url) + "$")
    assert r.stop(signal.SIGTERM) == 0
    stderr = r.stderr.text()
    assert (
        "[INFO] SIGTERM received: shutting down" in stderr and "[INFO] shutdown complete" in stderr
    )
    assert r.stdout.all() == [
        f"fastrelay listening on {r.url}",
        f"metrics on {r.metrics_url}",
    ]


def test_sigint_stops_cleanly(relay_factory):
    r = relay_factory(config())
    assert r.stop(signal.SIGINT) == 0
    assert "[INFO] SIGINT received: shutting down" in r.stderr.text()
    assert "Traceback" not in r.stderr.text()


def test_metrics_disabled_prints_only_the_relay_url(relay_factory):
    r = relay_factory(config(metrics={"enabled": False}))
    assert r.stop() == 0
    assert r.stdout.all() == [f"fastrelay listening on {r.url}"]


def test_level_warn_hides_info_lines(relay_factory):
    r = relay_factory(config(logging={"level": "warn"}))
    assert r.stop() == 0
    assert r.stderr.all() == []


def test_metrics_and_health_after_traffic(relay_factory):
    r = relay_factory(config())
    with connect(r.url, open_timeout=BOUND, close_timeout=BOUND) as ws:
        ws.send("hello")
        assert ws.recv(timeout=BOUND) == "hello"  # echo: the sender gets it too
        status, text = http(r, "/metrics")
        assert status == 200
        assert metric(text, "websocket_connected_clients") == 1
        assert metric(text, "websocket_connections_total") == 1
        assert metric(text, "websocket_messages_total") == 1
        assert metric(text, "websocket_disconnections_total") == 0
        assert http(r, "/healthz") == (200, "ok")
        assert http(r, "/readyz") == (200, "ready")
    assert r.stop() == 0


def test_graceful_shutdown_closes_clients_with_1001(relay_factory):
    r = relay_factory(config())
    with connect(r.url, open_timeout=BOUND, close_timeout=BOUND) as ws:
        r.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=BOUND)
        assert info.value.rcvd is not None and info.value.rcvd.code == CloseCode.GOING_AWAY
    assert r.wait() == 0


def test_second_signal_during_shutdown_exits_at_once_with_130(relay_factory):
    # The raw client never answers the 1001 close, so the graceful shutdown
    # would wait the whole minute; the second signal must cut it short.
    r = relay_factory(config(timeouts={"shutdown": 60, "close": 60}))
    client = RawClient(r.port)
    try:
        r.send_signal(signal.SIGTERM)
        r.expect("stderr", r"\[INFO\] closing clients with 1001")
        assert http(r, "/readyz") == (503, "not ready")  # draining: out of rotation
        assert http(r, "/healthz") == (200, "ok")  # but alive
        assert r.stop(signal.SIGTERM) == 130
    finally:
        client.close()
    assert "[WARN] SIGTERM during shutdown: exiting now" in r.stderr.text()


def test_log_file_is_appended_across_runs(relay_factory, tmp_path):
    for _ in range(2):
        r = relay_factory(config(logging={"output": "relay.log"}))
        assert r.stop() == 0
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


def test_sighup_reopens_the_log_file(relay_factory, tmp_path):
    log, rotated = tmp_path / "relay.log", tmp_path / "relay.log.1"
    r = relay_factory(config(logging={"output": "relay.log"}))
    log.rename(rotated)  # logrotate "create" mode
    r.send_signal(signal.SIGHUP)
    wait_until(
        lambda: log.exists() and "SIGHUP: log output reopened" in log.read_text(),
        "the reopened log file",
    )
    assert r.stop() == 0
    assert "starting" in rotated.read_text() and "shutdown complete" not in rotated.read_text()
    assert "shutdown complete" in log.read_text() and "starting" not in log.read_text()


def test_tls_serves_wss(relay_factory, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    # The default cert_file/key_file, relative to the relay's working directory.
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    r = relay_factory(config(server={"tls": {"enabled": True}}))
    assert r.url.startswith("wss://127.0.0.1:")
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(client_ctx)
    with connect(r.url, ssl=client_ctx, open_timeout=BOUND, close_timeout=BOUND) as ws:
        ws.send("secret")
        assert ws.recv(timeout=BOUND) == "secret"
    assert r.stop() == 0


# --- ports that cannot be used ---


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def assert_cannot_listen(r: RelayProcess, port: int) -> None:
    assert r.wait() == 2
    stderr = r.stderr.all()
    assert "Traceback" not in "\n".join(stderr)
    errors = [line for line in stderr if line.startswith("fastrelay: error: ")]
    assert errors == [
        f"fastrelay: error: cannot listen on 127.0.0.1:{port}: address already in use"
    ]
    assert stderr[-1] == errors[0]
    assert r.stdout.all() == []  # nothing announced, nothing served


def test_relay_port_in_use(relay_factory, taken_port):
    r = relay_factory(config(server={"port": taken_port}), ready=False)
    assert_cannot_listen(r, taken_port)


def test_metrics_port_in_use(relay_factory, taken_port):
    r = relay_factory(config(metrics={"port": taken_port}), ready=False)
    assert_cannot_listen(r, taken_port)


def test_port_in_use_is_logged_to_a_log_file(relay_factory, taken_port, tmp_path):
    overrides = config(server={"port": taken_port}, logging={"output": "relay.log"})
    r = relay_factory(overrides, ready=False)
    assert r.wait() == 2
    assert (
        f"[ERROR] cannot listen on 127.0.0.1:{taken_port} (relay): address already in use"
        in (tmp_path / "relay.log").read_text()
    )
