"""The scale-out keys: server.workers and the backplane section.

Bad values are user errors: one line naming the key, exit 2 from the
process, and a password in the URL never appears in what is printed.
"""

from __future__ import annotations

import os

import pytest
from test_config import assert_one_error_line, error_of, fastrelay_process, write

from fastrelay.config import Config, load_config, redact_url, worker_count


def test_defaults_change_nothing():
    cfg = Config()
    assert cfg.server.workers == 1
    assert cfg.backplane.url == ""  # no backplane: one process on its own
    assert worker_count(cfg) == 1


def test_workers_auto_is_the_number_of_usable_cpus(tmp_path):
    cfg = load_config(write(tmp_path, "server: {workers: auto}\nbackplane: {url: redis://h}\n"))
    assert cfg.server.workers == "auto"
    assert worker_count(cfg) == len(os.sched_getaffinity(0))


def test_workers_and_backplane_load(tmp_path):
    cfg = load_config(
        write(
            tmp_path,
            "server: {workers: 3}\n"
            "backplane: {url: 'redis://:pw@redis.internal:6380/2', channel_prefix: 'chat:',"
            " max_queue_bytes: 65536, reconnect_max_delay: 1}\n",
        )
    )
    assert worker_count(cfg) == 3
    assert cfg.backplane.channel_prefix == "chat:"
    assert cfg.backplane.reconnect_max_delay == 1.0


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost",
        "redis://localhost:6379/0",
        "rediss://user:secret@cache.example:6380/1",
        "unix:///run/redis/redis.sock",
        "unix:///run/redis/redis.sock?db=3",
    ],
)
def test_good_urls(tmp_path, url):
    assert load_config(write(tmp_path, f"backplane: {{url: '{url}'}}\n")).backplane.url == url


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("server: {workers: 0}", "server.workers: 0 is out of range (allowed: 1..1024)"),
        ("server: {workers: many}", "server.workers: expected an integer or auto, got string"),
        ("server: {workers: true}", "server.workers: expected an integer or auto, got boolean"),
        ("backplane: {url: 'http://h'}", "expected a redis://, rediss:// or unix:// URL"),
        ("backplane: {url: 'redis://'}", "the URL names no host"),
        ("backplane: {url: 'redis://h:99999'}", "the port must be a number"),
        ("backplane: {url: 'redis://h/x'}", "the database must be a number"),
        ("backplane: {url: 'unix://'}", "a unix:// URL needs the socket's path"),
        ("backplane: {max_queue_bytes: 10}", "backplane.max_queue_bytes: 10 is out of range"),
        ("backplane: {reconnect_max_delay: 0}", "backplane.reconnect_max_delay: 0.0 is out"),
        (
            "backplane: {url: 'redis://h', ca_file: ca.pem}",
            "backplane.ca_file: only used with a rediss:// URL",
        ),
        (
            "backplane: {url: 'rediss://h', ca_file: nope.pem}",
            "backplane.ca_file: cannot read",
        ),
        (
            "backplane: {url: 'redis://h', password_env: FASTRELAY_TEST_UNSET_VARIABLE}",
            "the environment variable FASTRELAY_TEST_UNSET_VARIABLE is not set",
        ),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text + "\n")


def test_password_in_url_and_env_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRELAY_TEST_REDIS_PASSWORD", "x")
    assert "give it in one place only" in error_of(
        tmp_path,
        "backplane: {url: 'redis://:pw@h', password_env: FASTRELAY_TEST_REDIS_PASSWORD}\n",
    )


def test_a_password_never_appears_in_an_error(tmp_path):
    message = error_of(tmp_path, "backplane: {url: 'redis://:hunter2@h:6379/db0'}\n")
    assert "hunter2" not in message
    assert "redis://:***@h:6379/db0" in message


def test_redact_url():
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("rediss://me:pw@h/0") == "rediss://me:***@h/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


def test_workers_without_a_backplane_exit_2_saying_rooms_would_be_split(tmp_path):
    write(tmp_path, "server: {workers: 2}\n", "bad.yaml")
    result = fastrelay_process("--config-file", "bad.yaml", cwd=tmp_path)
    assert_one_error_line(result, "server.workers: 2 workers without backplane.url: rooms would")


def test_process_bad_url_exits_2_without_the_password(tmp_path):
    write(tmp_path, "backplane: {url: 'redis://:hunter2@h:notaport'}\n", "bad.yaml")
    result = fastrelay_process("--config-file", "bad.yaml", cwd=tmp_path)
    assert_one_error_line(result, "backplane.url: 'redis://:***@h:notaport': the port")
    assert "hunter2" not in result.stderr


def test_the_publish_api_with_workers_is_accepted(tmp_path):
    cfg = load_config(
        write(
            tmp_path,
            "server: {workers: 2}\nbackplane: {url: 'redis://h'}\n"
            "metrics: {enabled: true}\napi: {enabled: true, key: 0123456789abcdef0123}\n",
        )
    )
    assert worker_count(cfg) == 2
    assert cfg.api.enabled


def test_the_publish_api_with_workers_still_needs_the_metrics_listener(tmp_path):
    message = error_of(
        tmp_path,
        "server: {workers: 2}\nbackplane: {url: 'redis://h'}\n"
        "metrics: {enabled: false}\napi: {enabled: true, key: 0123456789abcdef0123}\n",
    )
    assert "api.enabled: the publish API is served on the metrics listener" in message
