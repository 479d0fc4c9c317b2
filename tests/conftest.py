"""Fixtures: real fastrelay server processes on 127.0.0.1, port 0."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

READY_TIMEOUT = 20.0


@dataclass
class RelayProcess:
    proc: subprocess.Popen
    port: int
    url: str
    metrics_url: str | None
    config_path: Path
    log_path: Path

    def ws(self, path: str = "/") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_startup(proc: subprocess.Popen, want_metrics: bool,
                 timeout: float = READY_TIMEOUT) -> tuple[str, str | None]:
    """Read stdout until the 'listening on' line (and the 'metrics on' line
    when metrics are on); no sleeps, bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    url = metrics = None
    buffered = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(deadline - time.monotonic()):
                break
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buffered += chunk
            for line in buffered.decode(errors="replace").splitlines():
                if "listening on" in line:
                    url = line.split("listening on", 1)[1].strip()
                elif line.startswith("metrics on"):
                    metrics = line.split("metrics on", 1)[1].strip()
            if url and (metrics or not want_metrics):
                return url, metrics
    raise RuntimeError(f"relay did not report its URL; stdout so far: {buffered!r}")


def start_relay(tmp_path: Path, overrides: dict | None = None, *, name: str = "relay") -> RelayProcess:
    config = _merge({
        "server": {"host": "127.0.0.1", "port": 0},
        "metrics": {"enabled": False},
        "logging": {"level": "info"},
    }, overrides or {})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "ab") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastrelay", "--config-file", str(path)],
            stdout=subprocess.PIPE, stderr=stderr, cwd=tmp_path,
        )
    try:
        url, metrics = read_startup(proc, bool(config["metrics"].get("enabled")))
    except RuntimeError:
        proc.kill()
        proc.wait(5)
        raise RuntimeError(log_path.read_text()) from None
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    return RelayProcess(proc, port, url, metrics, path, log_path)


@pytest.fixture
def relay_factory(tmp_path):
    started: list[RelayProcess] = []

    def factory(overrides: dict | None = None, name: str = "relay") -> RelayProcess:
        relay = start_relay(tmp_path, overrides, name=f"{name}{len(started)}")
        started.append(relay)
        return relay

    yield factory
    for relay in started:
        relay.stop()


@pytest.fixture
def relay(relay_factory) -> RelayProcess:
    return relay_factory()
