"""Fixtures: real fastrelay processes on 127.0.0.1, port 0, started and
stopped by the one helper in relay_process.py."""

from __future__ import annotations

import pytest
from redis_server import RedisServer

from relay_process import RelayGroup, RelayProcess, start_relay

# Test modules that import these from conftest keep working.
__all__ = ["RelayProcess", "start_relay"]


@pytest.fixture
def relay_factory(tmp_path):
    """relay_factory(overrides=None, name="relay", *, ready=True) starts a
    relay for this test; at the end each one still running gets SIGTERM and
    must exit 0, and none may have written a traceback."""
    group = RelayGroup(tmp_path)
    yield group.start
    group.stop_all()


@pytest.fixture(scope="module")
def module_relay_factory(tmp_path_factory):
    """relay_factory for a relay shared by the tests of one module."""
    group = RelayGroup(tmp_path_factory.mktemp("relays"))
    yield group.start
    group.stop_all()


@pytest.fixture
def relay(relay_factory) -> RelayProcess:
    return relay_factory()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> RedisServer:
    """A real redis-server on a free loopback port for one test module,
    stopped by PID at its end."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()
