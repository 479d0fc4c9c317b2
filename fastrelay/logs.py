"""Logging setup: one "fastrelay" logger, one line per record.

Line format: `2026-11-29T05:30:00.123Z [INFO] message` (UTC, milliseconds),
with the four level names of the predecessor: DEBUG, INFO, WARN, ERROR.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

LOGGER_NAME = "fastrelay"

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}

# The stdlib names WARNING and CRITICAL do not exist in the predecessor's
# vocabulary; operators grep for these four.
_LABELS = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARN",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "ERROR",
}


class LineFormatter(logging.Formatter):
    """ISO-8601 UTC timestamp with milliseconds, then `[LEVEL] message`."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        millis = int(record.created * 1000) % 1000
        label = _LABELS.get(record.levelno) or _nearest_label(record.levelno)
        message = record.getMessage()
        if "\n" in message or "\r" in message:
            # Messages can carry peer-supplied text (close reasons, paths);
            # a raw newline there would let a client forge log lines.
            message = message.replace("\r", "\\r").replace("\n", "\\n")
        line = f"{stamp}.{millis:03d}Z [{label}] {message}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


def _nearest_label(levelno: int) -> str:
    # Custom numeric levels take the label of the standard level below them.
    best = logging.DEBUG
    for known in _LABELS:
        if best < known <= levelno:
            best = known
    return _LABELS[best]


class ReopenableFileHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Appends to a file; reopen() switches to a fresh file of the same name.

    logrotate's "create" mode renames the file and expects the program to
    open a new one on SIGHUP; until then lines keep going to the renamed file,
    so none are lost.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(self._open())

    def _open(self) -> TextIO:
        # StreamHandler.emit() flushes after every record, so a crash loses
        # nothing that was logged.
        return open(self.path, "a", encoding="utf-8")

    def reopen(self) -> None:
        # Open first: if the new file cannot be created, keep logging to
        # the old one rather than to nothing.
        new = self._open()
        old = self.setStream(new)  # takes the handler lock and flushes old
        if old is not None:
            old.close()

    def close(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            try:
                self.flush()
                self.stream.close()
            finally:
                super().close()


class LogSink:
    """What setup_logging() installed: the logger and its output."""

    def __init__(self, logger: logging.Logger, handler: logging.Handler, output: str) -> None:
        self.logger = logger
        self.handler = handler
        self.output = output

    @property
    def is_file(self) -> bool:
        return isinstance(self.handler, ReopenableFileHandler)

    def reopen(self) -> None:
        """Reopen the log file (SIGHUP after rotation); no-op for streams."""
        if isinstance(self.handler, ReopenableFileHandler):
            self.handler.reopen()

    def flush(self) -> None:
        self.handler.flush()

    def close(self) -> None:
        self.logger.removeHandler(self.handler)
        self.handler.close()


def setup_logging(output: str, level: str) -> LogSink:
    """Configure the "fastrelay" logger and return its sink.

    output: "stdout", "stderr" or a file path (created if missing, appended
    to). level: debug, info, warn or error. Raises OSError when the file
    cannot be opened and ValueError for an unknown level. Calling it again
    replaces the previous setup.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    handler: logging.Handler
    if output == "stdout":
        handler = logging.StreamHandler(sys.stdout)
    elif output == "stderr":
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = ReopenableFileHandler(output)
    handler.setFormatter(LineFormatter())

    logger = logging.getLogger(LOGGER_NAME)
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    logger.addHandler(handler)
    logger.setLevel(LEVELS[level])
    # The root logger may have its own handlers (pytest, embedding apps);
    # our lines must appear once, in our format.
    logger.propagate = False
    return LogSink(logger, handler, output)
