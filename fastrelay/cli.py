"""The `fastrelay` command: load config, set up logging, run the relay.

`fastrelay token --room /lobby --ttl 1h [--read-only]` instead prints a
token signed with the configured secret, for trying access control out.

Exit codes:
  0    clean shutdown after SIGINT/SIGTERM
  2    user error: bad command line, bad config, log file or port unusable
  130  a second SIGINT/SIGTERM arrived during the graceful shutdown (or
       SIGINT before the event loop started)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Sequence
from typing import Any

import uvloop

from . import auth, fdlimit
from ._version import __version__
from .config import (
    Config,
    ConfigError,
    api_key,
    load_config,
    resolve_config_path,
    worker_count,
)
from .control import ControlChannel
from .keys import SecretError
from .logs import LogSink, setup_logging
from .metrics import MetricsServer, start_metrics_server, url_host
from .publish_api import LocalRooms, PublishApi
from .server import Relay
from .tls import TLSFileError

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class StartupError(Exception):
    """A user-facing reason the relay cannot start (one line)."""


_CONFIG_HELP = "YAML configuration file (default: ./config.yaml if present)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastrelay",
        description=(
            "WebSocket broadcast relay: every message goes to every client in the same room "
            "(the URL path)."
        ),
        epilog="Without --config-file, ./config.yaml is read when it exists, else built-in "
        "defaults are used. "
        "Signals: SIGINT/SIGTERM shut down gracefully (a second one exits at once with code 130); "
        "SIGHUP reopens the log file. "
        "'fastrelay token --help': print a token for trying access control out.",
    )
    parser.add_argument("--config-file", metavar="PATH", help=_CONFIG_HELP)
    parser.add_argument("--version", action="version", version=f"fastrelay {__version__}")
    return parser


def _token_parser() -> argparse.ArgumentParser:
    token = argparse.ArgumentParser(
        prog="fastrelay token",
        description="Print a JWT for the relay, signed with the configured HMAC secret "
        "(auth.secret, auth.secret_file or auth.secret_env) and carrying auth.audience and "
        "auth.issuer when they are set.",
    )
    token.add_argument(
        "--room",
        action="append",
        required=True,
        metavar="ROOM",
        help="a room the token may join: /lobby, /team/* (every room below /team/) or *; "
        "repeat for several",
    )
    token.add_argument(
        "--ttl",
        type=_duration,
        default=3600.0,
        metavar="DURATION",
        help="how long the token is valid: 90, 90s, 15m, 1h or 7d (default 1h)",
    )
    token.add_argument(
        "--read-only", action="store_true", help="the bearer may listen but not send"
    )
    token.add_argument("--sub", metavar="NAME", help="the subject claim (who holds the token)")
    token.add_argument("--config-file", metavar="PATH", help=_CONFIG_HELP)
    return token


def _token_command(argv: Sequence[str]) -> list[str] | None:
    """The arguments of `fastrelay [--config-file PATH] token ...` without
    the word `token`, or None for the relay's own command line (parsed by
    _parser() exactly as before the command existed)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config-file":
            i += 2
        elif arg.startswith("-"):
            i += 1
        else:
            return [*argv[:i], *argv[i + 1 :]] if arg == "token" else None
    return None


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> float:
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        seconds = 0.0
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"'{text}' is not a duration like 90, 15m, 1h or 7d")
    return seconds


def _error(message: str) -> int:
    print(f"fastrelay: error: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def announce(
    cfg: Config, port: int, metrics: MetricsServer | None, api: bool, log: logging.Logger
) -> None:
    """Where the relay listens (the line scripts and tests wait for), and
    its metrics and publish API, on stdout and in the log."""
    scheme = "wss" if cfg.server.tls.enabled else "ws"
    lines = [f"fastrelay listening on {scheme}://{url_host(cfg.server.host)}:{port}/"]
    if metrics is not None:
        lines.append(f"metrics on {metrics.url}")
        if api:
            lines.append(f"publish API on {metrics.url.removesuffix('/metrics')}/publish/<room>")
    for line in lines:
        print(line, flush=True)
        log.info("%s", line)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    token_arguments = _token_command(arguments)
    if token_arguments is not None:
        return _print_token(_token_parser().parse_args(token_arguments))
    args = _parser().parse_args(arguments)
    try:
        cfg = load_config(args.config_file)
    except ConfigError as e:
        return _error(str(e))
    try:
        sink = setup_logging(cfg.logging.output, cfg.logging.level)
    except OSError as e:
        return _error(f"logging.output: cannot open '{cfg.logging.output}': {e.strerror or e}")
    try:
        return _run(cfg, sink, resolve_config_path(args.config_file))
    except StartupError as e:
        return _error(str(e))
    except KeyboardInterrupt:
        # SIGINT before our handlers were installed: nothing is serving yet.
        return EXIT_INTERRUPTED
    finally:
        sink.close()


def _print_token(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config_file)
        secret = auth.signing_secret(cfg.auth)
    except ConfigError as e:
        return _error(str(e))
    except SecretError as e:
        return _error(f"auth.{e.option}: {e.problem}")
    token = auth.mint(
        secret,
        cfg.auth.algorithms[0],
        args.room,
        args.ttl,
        read_only=args.read_only,
        subject=args.sub,
        audience=cfg.auth.audience,
        issuer=cfg.auth.issuer,
    )
    if not cfg.auth.enabled:
        print(
            "fastrelay: note: auth.enabled is false in this config: the relay does not ask "
            "for tokens",
            file=sys.stderr,
        )
    print(token, flush=True)
    return EXIT_OK


def _run(cfg: Config, sink: LogSink, config_path: str | None) -> int:
    # Workers inherit the raised limit.
    warning = fdlimit.shortfall(fdlimit.raise_open_files_limit(), cfg.limits.max_connections)
    if warning:
        sink.logger.warning("%s", warning)
    workers = worker_count(cfg)
    if workers > 1:
        from .supervisor import supervise

        return supervise(cfg, sink, config_path, workers)
    return uvloop.run(serve(cfg, sink, config_path))


def _listen_error(sink: LogSink, what: str, host: str, port: int, exc: OSError) -> StartupError:
    if isinstance(exc, socket.gaierror):
        reason = exc.strerror or str(exc)  # getaddrinfo codes are not errnos
    elif exc.errno:
        reason = os.strerror(exc.errno)
    else:
        reason = str(exc)
    reason = reason[:1].lower() + reason[1:]
    if sink.output != "stderr":
        # A log file should say why the service stopped; on stderr the
        # error line printed by main() already does.
        sink.logger.error("cannot listen on %s:%d (%s): %s", host, port, what, reason)
    return StartupError(f"cannot listen on {url_host(host)}:{port}: {reason}")


async def serve(
    cfg: Config, sink: LogSink, config_path: str | None, control: ControlChannel | None = None
) -> int:
    """Run the relay until SIGINT/SIGTERM. Alone, it prints its URLs and
    serves the metrics; as a worker (`control` set) it shares its port with
    the other workers, reports to the supervisor, answers its snapshot
    requests and stops when the supervisor goes away."""
    log = sink.logger
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    state = {"stopping": False}

    def on_stop_signal(signame: str) -> None:
        if state["stopping"]:
            log.warning("%s during shutdown: exiting now", signame)
            _exit_now(sink, EXIT_INTERRUPTED)
        state["stopping"] = True
        log.info("%s received: shutting down", signame)
        stop.set()

    def on_hup() -> None:
        try:
            sink.reopen()
        except OSError as e:
            log.error(
                "SIGHUP: cannot reopen %s: %s; still writing to the old file",
                sink.output,
                e.strerror or e,
            )
            return
        log.info("SIGHUP: log output reopened")

    # Installed first so a signal during startup is handled like later ones.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop_signal, sig.name)
    loop.add_signal_handler(signal.SIGHUP, on_hup)

    if control is None:
        log.info(
            "fastrelay %s starting (config: %s)",
            __version__,
            config_path or "built-in defaults",
        )
    # Keys were checked at load time; a file or variable may have changed since.
    try:
        relay = Relay(cfg, log, reuse_port=control is not None)
    except SecretError as e:
        raise StartupError(f"auth.{e.option}: {e.problem}") from None
    api = None
    if cfg.api.enabled and control is None:
        try:
            api = PublishApi(api_key(cfg.api), LocalRooms(relay), cfg.relay.max_message_size)
        except SecretError as e:
            raise StartupError(f"api.{e.option}: {e.problem}") from None
    try:
        await relay.start()
    except TLSFileError as e:
        # Checked at load time, so the files changed since; still a user error.
        raise StartupError(f"server.tls.{e.option}: {e.problem}") from None
    except ssl.SSLError as e:
        # An OSError too, so caught before it is taken for a listening error.
        raise StartupError(
            f"server.tls: cannot use the certificate or key: {e.reason or e}"
        ) from None
    except OSError as e:
        raise _listen_error(sink, "relay", cfg.server.host, cfg.server.port, e) from None

    _freeze_startup_objects()
    metrics = None
    if control is not None:
        control.send("ready", relay.port)
        answering = loop.create_task(_answer_supervisor(control, relay, stop, log))
    elif cfg.metrics.enabled:
        try:
            metrics = await start_metrics_server(
                cfg.metrics.host,
                cfg.metrics.port,
                relay.snapshot,
                lambda: relay.accepting,
                api=api,
            )
        except OSError as e:
            # Nobody was told the relay URL yet; close it before exiting.
            await relay.shutdown(cfg.timeouts.shutdown)
            raise _listen_error(sink, "metrics", cfg.metrics.host, cfg.metrics.port, e) from None

    if control is None:
        announce(cfg, relay.port, metrics, api is not None, log)

    await stop.wait()
    log.info("closing clients with 1001, waiting up to %.1fs", cfg.timeouts.shutdown)
    await relay.shutdown(cfg.timeouts.shutdown)
    if metrics is not None:
        # Closed last: during the drain /readyz answers 503, which tells a
        # load balancer to stop sending clients here.
        await metrics.close()
    if control is not None:
        answering.cancel()
        control.close()
    log.info("shutdown complete")
    return EXIT_OK


def _freeze_startup_objects() -> None:
    """Listening: what the process built to get here (modules, config, the
    relay, the hub) lives until exit, so the cyclic GC stops scanning it.
    Every collection of the oldest generation walked all of it again, a
    cost each burst of handshakes paid several times over. Bounded: what
    startup left as garbage is collected first; at worst a frozen object
    that later ends up in a garbage cycle stays, and only this fixed set
    can. Everything created later (transports, exceptions and their
    tracebacks) is collected as before."""
    gc.collect()
    gc.freeze()


async def _answer_supervisor(
    control: ControlChannel, relay: Relay, stop: asyncio.Event, log: logging.Logger
) -> None:
    """A worker's side of the control channel: counters and the publish
    API's questions on request (control.py); the channel's end means the
    supervisor is gone, and so the worker goes."""
    try:
        while True:
            kind, number, *arguments = await control.receive()
            control.send(kind, number, _answer(relay, kind, arguments))
    except (asyncio.IncompleteReadError, ConnectionError):
        if not stop.is_set():
            log.warning("supervisor gone: shutting down")
            stop.set()


def _answer(relay: Relay, kind: str, arguments: list[Any]) -> Any:
    if kind == "snapshot":
        return relay.snapshot()
    if kind == "publish":
        room, text, payload = arguments
        return relay.publish(room, text, payload)
    if kind == "members":
        return relay.members(arguments[0])
    if kind == "rooms":
        return relay.room_sizes()
    raise ValueError(f"unknown control request {kind!r}")


def _exit_now(sink: LogSink, code: int) -> None:
    # os._exit skips interpreter teardown (which would wait on the loop and
    # its tasks); flush what we can first so the last lines are not lost.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    sink.flush()
    os._exit(code)
