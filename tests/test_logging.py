"""Log line format, level filtering, file append and reopen (SIGHUP rotation)."""

from __future__ import annotations

import calendar
import logging
import re
import sys

import pytest

from fastrelay.logs import LOGGER_NAME, LineFormatter, setup_logging

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \[(DEBUG|INFO|WARN|ERROR)\] (.*)$")


@pytest.fixture(autouse=True)
def restore_logger():
    """Leave the "fastrelay" logger as other tests expect to find it."""
    logger = logging.getLogger(LOGGER_NAME)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    for handler in list(logger.handlers):
        if handler not in saved[0]:
            logger.removeHandler(handler)
            handler.close()
    for handler in saved[0]:
        if handler not in logger.handlers:
            logger.addHandler(handler)
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def log_each_level(log: logging.Logger) -> None:
    log.debug("d-line")
    log.info("i-line")
    log.warning("w-line")
    log.error("e-line")


def test_format_is_utc_iso_with_milliseconds_and_level():
    record = logging.LogRecord(
        "fastrelay", logging.WARNING, __file__, 1, "hello %s", ("world",), None
    )
    record.created = calendar.timegm((2026, 11, 29, 5, 30, 0)) + 0.123
    assert LineFormatter().format(record) == "2026-11-29T05:30:00.123Z [WARN] hello world"


@pytest.mark.parametrize(
    ("levelno", "label"),
    [
        (logging.DEBUG, "DEBUG"),
        (logging.INFO, "INFO"),
        (logging.WARNING, "WARN"),
        (logging.ERROR, "ERROR"),
        (logging.CRITICAL, "ERROR"),
        (25, "INFO"),
    ],
)
def test_level_labels(levelno, label):
    record = logging.LogRecord("fastrelay", levelno, __file__, 1, "m", (), None)
    assert LineFormatter().format(record).split(" ", 2)[1] == f"[{label}]"


def test_newlines_in_a_message_cannot_forge_lines():
    forged = "bye\n2026-01-01T00:00:00.000Z [ERROR] forged\r"
    record = logging.LogRecord(
        "fastrelay", logging.INFO, __file__, 1, "closing: %s", (forged,), None
    )
    line = LineFormatter().format(record)
    assert line.endswith("[INFO] closing: bye\\n2026-01-01T00:00:00.000Z [ERROR] forged\\r")
    assert len(line.splitlines()) == 1


def test_exception_is_appended_after_the_line():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "fastrelay", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    first, *rest = LineFormatter().format(record).splitlines()
    assert LINE.match(first) and first.endswith("[ERROR] failed")
    assert rest[-1] == "ValueError: boom"


@pytest.mark.parametrize(
    ("level", "written"),
    [
        ("debug", ["d-line", "i-line", "w-line", "e-line"]),
        ("info", ["i-line", "w-line", "e-line"]),
        ("warn", ["w-line", "e-line"]),
        ("error", ["e-line"]),
    ],
)
def test_lines_below_the_level_are_not_written(capsys, level, written):
    sink = setup_logging("stderr", level)
    log_each_level(sink.logger)
    lines = capsys.readouterr().err.splitlines()
    assert [LINE.match(line).group(2) for line in lines] == written
    labels = [LINE.match(line).group(1) for line in lines]
    assert labels == [{"d": "DEBUG", "i": "INFO", "w": "WARN", "e": "ERROR"}[w[0]] for w in written]


def test_child_loggers_go_through_the_same_sink(capsys):
    setup_logging("stdout", "info")
    logging.getLogger("fastrelay.metrics").info("from a child")
    out = capsys.readouterr()
    assert out.err == ""
    assert LINE.match(out.out.strip()).group(2) == "from a child"


def test_stdout_and_stderr(capsys):
    setup_logging("stdout", "info").logger.info("to stdout")
    setup_logging("stderr", "info").logger.info("to stderr")
    out = capsys.readouterr()
    assert out.out.strip().endswith("[INFO] to stdout")
    assert out.err.strip().endswith("[INFO] to stderr")


def test_setting_up_again_replaces_the_previous_output(capsys):
    setup_logging("stderr", "info")
    setup_logging("stderr", "info").logger.info("once")
    assert capsys.readouterr().err.count("once") == 1


def test_lines_are_not_duplicated_through_the_root_logger(capsys, tmp_path):
    root_handler = logging.StreamHandler(sys.stdout)
    logging.getLogger().addHandler(root_handler)
    try:
        setup_logging("stderr", "info").logger.info("only ours")
    finally:
        logging.getLogger().removeHandler(root_handler)
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("only ours") == 1


def test_file_is_created_then_appended_to(tmp_path):
    path = tmp_path / "relay.log"
    sink = setup_logging(str(path), "info")
    sink.logger.info("first run")
    sink.close()
    sink = setup_logging(str(path), "info")
    sink.logger.info("second run")
    sink.close()
    messages = [LINE.match(line).group(2) for line in path.read_text().splitlines()]
    assert messages == ["first run", "second run"]


def test_each_line_reaches_the_file_at_once(tmp_path):
    # Another process (tail -f, a test) must see a line as soon as it is logged.
    path = tmp_path / "relay.log"
    sink = setup_logging(str(path), "info")
    sink.logger.info("visible")
    assert "visible" in path.read_text()
    sink.close()


def test_reopen_after_rotation_writes_to_a_new_file(tmp_path):
    path = tmp_path / "relay.log"
    rotated = tmp_path / "relay.log.1"
    sink = setup_logging(str(path), "info")
    assert sink.is_file
    sink.logger.info("before rotation")
    path.rename(rotated)  # logrotate "create" mode
    sink.logger.info("after rename, before reopen")
    sink.reopen()
    sink.logger.info("after reopen")
    sink.close()
    assert [LINE.match(line).group(2) for line in rotated.read_text().splitlines()] == [
        "before rotation",
        "after rename, before reopen",
    ]
    assert [LINE.match(line).group(2) for line in path.read_text().splitlines()] == ["after reopen"]


def test_reopen_that_fails_keeps_the_old_file(tmp_path):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    path = logdir / "relay.log"
    sink = setup_logging(str(path), "info")
    path.rename(tmp_path / "relay.log.1")
    logdir.rmdir()
    with pytest.raises(OSError):
        sink.reopen()
    sink.logger.info("still logged")
    sink.close()
    assert "still logged" in (tmp_path / "relay.log.1").read_text()


def test_reopen_on_a_stream_is_a_no_op(capsys):
    sink = setup_logging("stderr", "info")
    assert not sink.is_file
    sink.reopen()
    sink.logger.info("still here")
    assert "still here" in capsys.readouterr().err


def test_file_in_a_missing_directory_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        setup_logging(str(tmp_path / "missing" / "relay.log"), "info")


def test_unknown_level_raises_valueerror():
    with pytest.raises(ValueError, match="warning"):
        setup_logging("stderr", "warning")
