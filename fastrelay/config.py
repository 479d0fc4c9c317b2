"""Configuration schema and the YAML loader that checks a file against it.

The frozen dataclasses below are the single table of the configuration: each
leaf field carries its type (the annotation), its default, its constraints
and its documentation (the field metadata). The loader, the README table
(docs/gen_config_table.py) and the tests all walk this one table, so a key
cannot be loadable but undocumented, or documented with the wrong default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, get_type_hints
from urllib.parse import urlsplit

import yaml

DEFAULT_PATH = "config.yaml"

# Values of logging.output that name a stream rather than a file.
STREAM_OUTPUTS = ("stdout", "stderr")

_Origins = tuple[str, ...]


class ConfigError(Exception):
    """A mistake in the user's configuration.

    The message is a single line naming the file, the key and the problem;
    the CLI prints it as is, without a traceback.
    """

    def __init__(self, message: str) -> None:
        # YAML and OS error texts sometimes span lines; the contract is one.
        super().__init__(" ".join(message.splitlines()))


def _check_origin(value: str) -> str | None:
    """Return why `value` cannot match a browser Origin header, or None."""
    parts = urlsplit(value)
    if not parts.scheme or not parts.netloc:
        return "expected an origin like 'https://example.com'"
    if parts.path or parts.query or parts.fragment:
        # A browser never sends a path, so 'https://a.example/' would
        # silently match nothing.
        return "an origin has no path, query or trailing '/'"
    return None


def _opt(
    doc: str,
    *,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    choices: tuple[str, ...] | None = None,
    nonempty: bool = False,
    path: bool = False,
    item_check: Callable[[str], str | None] | None = None,
    lower: bool = False,
) -> dict[str, Any]:
    """Field metadata of one leaf key: its documentation and constraints.

    min/max are inclusive bounds, `above` an exclusive lower bound. `path`
    marks file names that are resolved against the config file's directory.
    `item_check` validates each string of a list; `lower` normalises strings
    (and list items) to lower case.
    """
    return {
        "doc": doc,
        "min": min,
        "max": max,
        "above": above,
        "choices": choices,
        "nonempty": nonempty,
        "path": path,
        "item_check": item_check,
        "lower": lower,
    }


@dataclass(frozen=True)
class TLSConfig:
    enabled: bool = field(
        default=False,
        metadata=_opt("Serve `wss://` using the certificate and key below."),
    )
    cert_file: str = field(
        default="cert.pem",
        metadata=_opt(
            "PEM certificate chain, server certificate first. A relative path is "
            "relative to the config file's directory.",
            nonempty=True,
            path=True,
        ),
    )
    key_file: str = field(
        default="key.pem",
        metadata=_opt(
            "PEM private key of `cert_file`, unencrypted. A relative path is "
            "relative to the config file's directory.",
            nonempty=True,
            path=True,
        ),
    )


@dataclass(frozen=True)
class ServerConfig:
    host: str = field(
        default="0.0.0.0",
        metadata=_opt(
            "Address the relay listens on (`::` for all IPv6 addresses).", nonempty=True
        ),
    )
    port: int = field(
        default=8443,
        metadata=_opt(
            "TCP port of the relay; 0 picks a free port (the URL printed at start names it).",
            min=0,
            max=65535,
        ),
    )
    tls: TLSConfig = field(default_factory=TLSConfig)


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = field(
        default=True,
        metadata=_opt("Serve `/metrics`, `/healthz` and `/readyz` on a separate port."),
    )
    host: str = field(
        default="0.0.0.0",
        metadata=_opt("Address of the metrics listener.", nonempty=True),
    )
    port: int = field(
        default=9090,
        metadata=_opt(
            "TCP port of the metrics listener; 0 picks a free port.", min=0, max=65535
        ),
    )


@dataclass(frozen=True)
class LoggingConfig:
    output: str = field(
        default="stderr",
        metadata=_opt(
            "`stdout`, `stderr`, or a file path (appended to, created if missing; a "
            "relative path is relative to the config file's directory).",
            nonempty=True,
            path=True,
        ),
    )
    level: str = field(
        default="info",
        metadata=_opt(
            "Lowest level written: `debug`, `info`, `warn` or `error`.",
            choices=("debug", "info", "warn", "error"),
        ),
    )


@dataclass(frozen=True)
class RelayConfig:
    echo: bool = field(
        default=True,
        metadata=_opt(
            "Deliver each message to its sender too (`false`: everyone else in the room)."
        ),
    )
    max_message_size: int = field(
        default=1048576,
        metadata=_opt(
            "Largest message accepted, in bytes, after reassembling fragments; a "
            "larger one closes the connection with 1009.",
            min=125,
        ),
    )
    serve_demo: bool = field(
        default=False,
        metadata=_opt(
            "A plain `GET` on the relay port serves the browser chat demo `example/index.html`."
        ),
    )
    compression: bool = field(
        default=False,
        metadata=_opt(
            "Negotiate permessage-deflate (RFC 7692) with clients that offer it, without context takeover: "
            "each message of 128 bytes or more is compressed once for all such members of its room."
        ),
    )


@dataclass(frozen=True)
class LimitsConfig:
    max_connections: int = field(
        default=0,
        metadata=_opt(
            "Most clients connected at once; 0 = unlimited. Further upgrades get 503.",
            min=0,
        ),
    )
    max_request_head: int = field(
        default=8192,
        metadata=_opt(
            "Largest HTTP upgrade request head, in bytes; above it 431.", min=256
        ),
    )
    max_headers: int = field(
        default=64,
        metadata=_opt("Most header lines in the upgrade request; above it 431.", min=8),
    )
    max_backlog: int = field(
        default=1048576,
        metadata=_opt(
            "Bytes queued for one client that is not reading; above it `slow_client_policy` applies.",
            min=1024,
        ),
    )
    slow_client_policy: str = field(
        default="disconnect",
        metadata=_opt(
            "`disconnect`: close the slow client; `drop`: skip messages for it until its backlog drains. "
            "Both are counted in the metrics.",
            choices=("disconnect", "drop"),
        ),
    )
    max_messages_per_second: int = field(
        default=0,
        metadata=_opt(
            "Messages one connection may send per second; 0 = unlimited.", min=0
        ),
    )
    allowed_origins: _Origins = field(
        default=(),
        metadata=_opt(
            'Browser origins allowed to connect, e.g. `["https://chat.example.com"]`; '
            "empty = any. Other origins get 403. Lower-cased when loaded, to match "
            "what browsers send.",
            item_check=_check_origin,
            lower=True,
        ),
    )


@dataclass(frozen=True)
class TimeoutsConfig:
    handshake: float = field(
        default=10.0,
        metadata=_opt("Seconds a client has to complete the HTTP upgrade.", above=0),
    )
    shutdown: float = field(
        default=10.0,
        metadata=_opt(
            "Seconds to wait on SIGINT/SIGTERM for clients to answer the 1001 close.",
            above=0,
        ),
    )
    close: float = field(
        default=5.0,
        metadata=_opt(
            "Seconds to wait for the peer's close frame before dropping the connection.",
            above=0,
        ),
    )
    ping_interval: float = field(
        default=20.0,
        metadata=_opt(
            "Seconds between keepalive pings to an idle client; 0 disables pings.",
            min=0,
        ),
    )
    ping_timeout: float = field(
        default=20.0,
        metadata=_opt(
            "Seconds to wait for the pong before closing the connection.", above=0
        ),
    )


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)


# --- schema introspection (shared by the loader, the docs and the tests) ---


class FieldInfo(NamedTuple):
    key: str  # dotted, e.g. "server.tls.cert_file"
    type: Any  # bool, int, float, str or tuple[str, ...]
    default: Any
    meta: dict[str, Any]


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def _fields(cls: type) -> list[tuple[str, Any, dataclasses.Field[Any]]]:
    hints = get_type_hints(cls)
    return [(f.name, hints[f.name], f) for f in dataclasses.fields(cls)]


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    factory: Callable[[], Any] = f.default_factory  # type: ignore[assignment]
    return factory()


def iter_fields(cls: type = Config, prefix: str = "") -> Iterator[FieldInfo]:
    """Every leaf key of the schema, in declaration order."""
    for name, tp, f in _fields(cls):
        if _is_section(tp):
            yield from iter_fields(tp, f"{prefix}{name}.")
        else:
            yield FieldInfo(f"{prefix}{name}", tp, _default(f), dict(f.metadata))


def type_name(tp: Any) -> str:
    """How a schema type is named to users."""
    if tp == _Origins:
        return "list of strings"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}[tp]


def constraint_text(info: FieldInfo) -> str:
    """The allowed values of a key, in words ('' when any value of its type is)."""
    m = info.meta
    if m["choices"]:
        return ", ".join(m["choices"])
    parts = []
    if m["min"] is not None and m["max"] is not None:
        parts.append(f"{m['min']}..{m['max']}")
    elif m["min"] is not None:
        parts.append(f">= {m['min']}")
    if m["above"] is not None:
        parts.append(f"> {m['above']}")
    if m["nonempty"]:
        parts.append("not empty")
    return ", ".join(parts)


# --- loading ---


def resolve_config_path(path: str | None) -> str | None:
    """The file `load_config(path)` reads, or None when defaults are used."""
    if path is not None:
        return path
    return DEFAULT_PATH if os.path.exists(DEFAULT_PATH) else None


def load_config(path: str | None = None) -> Config:
    """Load and validate the configuration.

    With no path, ./config.yaml is read when it exists, else the defaults
    are returned. Every user mistake raises ConfigError.
    """
    source = resolve_config_path(path)
    if source is None:
        return Config()
    text = _read(source)
    data, lines = _parse(source, text)
    loader = _Loader(source, lines, os.path.dirname(source))
    if data is None:  # an empty or comments-only file means "all defaults"
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections "
            f"({', '.join(n for n, _, _ in _fields(Config))}), got {_describe(data)}"
        )
    cfg: Config = loader.build(Config, data, "")
    loader.check_cross_fields(cfg)
    return cfg


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(
            f"cannot read config file '{path}': {e.strerror or e}"
        ) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None


class _StrictYAMLLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of keeping the last one.

    A key given twice is almost always an editing mistake, and silently
    taking the second value hides it.
    """

    def construct_mapping(
        self, node: yaml.MappingNode, deep: bool = False
    ) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: SafeLoader reports it below
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def _parse(path: str, text: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML; return the data and the line of every dotted key."""
    loader = _StrictYAMLLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "syntax error"
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    finally:
        loader.dispose()
    lines: dict[str, int] = {}
    _index_lines(node, "", lines)
    return data, lines


def _index_lines(node: Any, prefix: str, out: dict[str, int]) -> None:
    # Error messages name the line of the offending key; the composed node
    # tree is the only place PyYAML keeps positions.
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            key = f"{prefix}{key_node.value}"
            out.setdefault(key, key_node.start_mark.line + 1)
            _index_lines(value_node, f"{key}.", out)


def _describe(value: Any) -> str:
    """Name a YAML value's type (and value) for an error message."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        return f"string '{value}'"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"{type(value).__name__} {value}"


def _article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


class _Loader:
    """Turns a parsed mapping into a Config, one key at a time."""

    def __init__(self, source: str, lines: dict[str, int], base_dir: str) -> None:
        self.source = source
        self.lines = lines
        self.base_dir = base_dir

    def error(self, key: str, problem: str) -> ConfigError:
        line = self.lines.get(key)
        where = f"{self.source}:{line}" if line else self.source
        return ConfigError(f"{where}: {key}: {problem}")

    def build(self, cls: type, data: dict[Any, Any], prefix: str) -> Any:
        fields = {name: (tp, f) for name, tp, f in _fields(cls)}
        for key in data:
            if key not in fields:
                raise self.unknown_key(prefix, key, list(fields))
        kwargs = {}
        for name, (tp, f) in fields.items():
            key = f"{prefix}{name}"
            if _is_section(tp):
                # Absent or empty (every key commented out): all defaults,
                # still built here so default file paths get resolved too.
                value = data.get(name)
                if value is None:
                    value = {}
                if not isinstance(value, dict):
                    raise self.error(
                        key, f"expected a mapping of keys, got {_describe(value)}"
                    )
                kwargs[name] = self.build(tp, value, f"{key}.")
            elif name in data:
                kwargs[name] = self.leaf(
                    FieldInfo(key, tp, _default(f), dict(f.metadata)), data[name]
                )
            elif f.metadata["path"]:
                kwargs[name] = self.resolve_path(_default(f))
        return cls(**kwargs)

    def unknown_key(self, prefix: str, key: Any, known: list[str]) -> ConfigError:
        dotted = f"{prefix}{key}"
        hint = ""
        if isinstance(key, str):
            close = difflib.get_close_matches(key, known, n=1)
            if close:
                hint = f" (did you mean '{prefix}{close[0]}'?)"
        if not hint:
            hint = f" (known keys here: {', '.join(known)})"
        line = self.lines.get(dotted)
        where = f"{self.source}:{line}" if line else self.source
        return ConfigError(f"{where}: unknown key '{dotted}'{hint}")

    def leaf(self, info: FieldInfo, value: Any) -> Any:
        value = self.check_type(info, value)
        if isinstance(value, float) and not math.isfinite(value):
            raise self.error(info.key, f"expected a finite number, got {value}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            self.check_range(info, value)
        if isinstance(value, str):
            value = self.check_string(info, value)
        if isinstance(value, tuple):
            value = tuple(self.check_string(info, item) for item in value)
        return value

    def check_type(self, info: FieldInfo, value: Any) -> Any:
        tp = info.type
        # bool is a subclass of int in Python; `port: true` is still a mistake.
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if tp is bool and isinstance(value, bool):
            return value
        if tp is int and is_number and isinstance(value, int):
            return value
        if tp is float and is_number:
            return float(value)
        if tp is str and isinstance(value, str):
            return value
        if tp == _Origins and isinstance(value, list):
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    raise self.error(
                        info.key,
                        f"item {i + 1}: expected a string, got {_describe(item)}",
                    )
            return tuple(value)
        raise self.error(
            info.key, f"expected {_article(type_name(tp))}, got {_describe(value)}"
        )

    def check_range(self, info: FieldInfo, value: float) -> None:
        m = info.meta
        low, high, above = m["min"], m["max"], m["above"]
        if (
            (low is not None and value < low)
            or (high is not None and value > high)
            or (above is not None and value <= above)
        ):
            raise self.error(
                info.key, f"{value} is out of range (allowed: {constraint_text(info)})"
            )

    def check_string(self, info: FieldInfo, value: str) -> str:
        m = info.meta
        if m["lower"]:
            value = value.lower()
        if m["nonempty"] and not value.strip():
            raise self.error(info.key, "must not be empty")
        if m["choices"] and value not in m["choices"]:
            close = difflib.get_close_matches(value, m["choices"], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise self.error(
                info.key,
                f"unknown value '{value}' (expected one of: {', '.join(m['choices'])}{hint})",
            )
        if m["item_check"]:
            problem = m["item_check"](value)
            if problem:
                raise self.error(info.key, f"'{value}': {problem}")
        if m["path"]:
            value = self.resolve_path(value)
        return value

    def resolve_path(self, value: str) -> str:
        # Relative to the config file, so a service started from another
        # working directory still finds its files.
        if value in STREAM_OUTPUTS:
            return value
        return os.path.join(self.base_dir, os.path.expanduser(value))

    def check_cross_fields(self, cfg: Config) -> None:
        if cfg.metrics.enabled and _same_listener(
            cfg.server.host, cfg.server.port, cfg.metrics.host, cfg.metrics.port
        ):
            raise self.error(
                "metrics.port",
                f"{cfg.metrics.port} is also server.port; the two listeners need different ports",
            )
        if cfg.server.tls.enabled:
            self.check_tls(cfg.server.tls)

    def check_tls(self, tls: TLSConfig) -> None:
        # Open both files first so a missing one is reported by its key name
        # rather than as an opaque SSL error.
        for key, path in (
            ("server.tls.cert_file", tls.cert_file),
            ("server.tls.key_file", tls.key_file),
        ):
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise self.error(
                    key, f"cannot read '{path}': {e.strerror or e}"
                ) from None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            # Without a password callback OpenSSL would prompt on the
            # terminal for an encrypted key and hang a service.
            ctx.load_cert_chain(tls.cert_file, tls.key_file, password=_no_password)
        except _EncryptedKey:
            raise self.error(
                "server.tls.key_file",
                f"'{tls.key_file}' is encrypted; fastrelay needs an unencrypted key",
            ) from None
        except ssl.SSLError as e:
            raise self.tls_error(tls, e) from None

    def tls_error(self, tls: TLSConfig, e: ssl.SSLError) -> ConfigError:
        if "KEY_VALUES_MISMATCH" in str(e):
            return self.error(
                "server.tls.key_file",
                f"'{tls.key_file}' is not the private key of '{tls.cert_file}'",
            )
        # Tell which file is bad: the certificate parses on its own or not.
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(
                cafile=tls.cert_file
            )
        except ssl.SSLError:
            return self.error(
                "server.tls.cert_file",
                f"'{tls.cert_file}' is not a PEM certificate ({e.reason or e})",
            )
        return self.error(
            "server.tls.key_file",
            f"'{tls.key_file}' is not a PEM private key ({e.reason or e})",
        )


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    raise _EncryptedKey


_WILDCARDS = ("0.0.0.0", "::", "")


def _same_listener(host_a: str, port_a: int, host_b: str, port_b: int) -> bool:
    """Would two listeners collide? Port 0 never does: each gets a free port."""
    if port_a != port_b or port_a == 0:
        return False
    return host_a == host_b or host_a in _WILDCARDS or host_b in _WILDCARDS
