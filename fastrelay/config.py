"""Configuration schema and the YAML loader that checks a file against it.

The frozen dataclasses below are the single table of the configuration: each
leaf key is declared with `_option(default, OptionMeta(...))`, which keeps its
help text and allowed values on the dataclass field next to its type and
default. The loader, the README table (docs/gen_config_table.py) and the
tests all read that table through iter_options(), so a key cannot be
loadable but undocumented, or documented with the wrong default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypeVar, get_type_hints
from urllib.parse import urlsplit

import yaml

from .auth import ALGORITHMS, verification_key
from .keys import SecretError, SecretSource, read_secret
from .tls import TLSFileError, server_context

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

DEFAULT_PATH = "config.yaml"

# Values of logging.output that name a stream rather than a file.
STREAM_OUTPUTS = ("stdout", "stderr")

# What a leaf key may hold once loaded.
OptionValue: TypeAlias = "bool | int | float | str | tuple[str, ...]"

# The name users read for each type a leaf key can have.
Kind = Literal["boolean", "integer", "number", "string", "list of strings", "integer or auto"]
_KINDS: dict[object, Kind] = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    tuple[str, ...]: "list of strings",
    # A count the program can also work out itself (`auto`).
    int | Literal["auto"]: "integer or auto",
}

_V = TypeVar("_V")
_Section = TypeVar("_Section", bound="DataclassInstance")


class ConfigError(Exception):
    """A mistake in the user's configuration.

    The message is a single line naming the file, the key and the problem;
    the CLI prints it as is, without a traceback.
    """

    def __init__(self, message: str) -> None:
        # YAML and OS error texts sometimes span lines; the contract is one.
        super().__init__(" ".join(message.splitlines()))


@dataclass(frozen=True)
class OptionMeta:
    """What one leaf key documents and accepts beyond its type.

    min/max are inclusive bounds, `above` an exclusive lower bound. `path`
    marks file names that are resolved against the config file's directory.
    `lower` normalises strings (and list items) to lower case; `item_check`
    then says why one is wrong, or returns None. `secret` keeps the value
    out of error messages (they end up in logs and terminals).
    """

    help: str
    min: float | None = None
    max: float | None = None
    above: float | None = None
    choices: tuple[str, ...] = ()
    nonempty: bool = False
    path: bool = False
    lower: bool = False
    item_check: Callable[[str], str | None] | None = None
    # How a value is quoted in error messages (hides a password in a URL).
    shown: Callable[[str], str] = str
    secret: bool = False  # never quote the value in an error message

    def allowed(self) -> str:
        """The allowed values in words ('' when any value of the type is)."""
        if self.choices:
            return ", ".join(self.choices)
        parts = []
        if self.min is not None and self.max is not None:
            parts.append(f"{self.min}..{self.max}")
        elif self.min is not None:
            parts.append(f">= {self.min}")
        if self.above is not None:
            parts.append(f"> {self.above}")
        if self.nonempty:
            parts.append("not empty")
        return ", ".join(parts)


@dataclass(frozen=True)
class Option:
    """One leaf key of the schema, as the loader, the docs and the tests see it."""

    key: str  # dotted, e.g. "server.tls.cert_file"
    kind: Kind
    default: OptionValue
    meta: OptionMeta


# The field-metadata key under which _option() stores an OptionMeta.
_META = "fastrelay.option"


def _option(default: _V, meta: OptionMeta) -> _V:
    """Declare a leaf key: its default and its OptionMeta."""
    return field(default=default, metadata={_META: meta})


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***`, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


REDIS_SCHEMES = ("redis", "rediss", "unix")


def check_redis_url(value: str) -> str | None:
    """Return why `value` is not a usable Redis URL, or None ('' is: no backplane).

    The problem never quotes the password; the loader quotes the value, so
    the messages for a URL name only what is wrong.
    """
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in REDIS_SCHEMES:
        return "expected a redis://, rediss:// or unix:// URL"
    try:
        port = parts.port
    except ValueError:
        return "the port must be a number from 1 to 65535"
    if parts.scheme == "unix":
        if not parts.path:
            return "a unix:// URL needs the socket's path, e.g. unix:///run/redis.sock"
        db = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p).get("db", "0")
    else:
        if not parts.hostname:
            return "the URL names no host"
        if port == 0:
            return "the port must be a number from 1 to 65535"
        db = parts.path.strip("/") or "0"
    if not db.isdigit():
        return "the database must be a number, e.g. redis://host:6379/0"
    return None


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


@dataclass(frozen=True)
class TLSConfig:
    enabled: bool = _option(
        False, OptionMeta("Serve `wss://` using the certificate and key below.")
    )
    cert_file: str = _option(
        "cert.pem",
        OptionMeta(
            "PEM certificate chain, server certificate first. A relative path is "
            "relative to the config file's directory.",
            nonempty=True,
            path=True,
        ),
    )
    key_file: str = _option(
        "key.pem",
        OptionMeta(
            "PEM private key of `cert_file`, unencrypted. A relative path is "
            "relative to the config file's directory.",
            nonempty=True,
            path=True,
        ),
    )


@dataclass(frozen=True)
class ServerConfig:
    host: str = _option(
        "0.0.0.0",
        OptionMeta("Address the relay listens on (`::` for all IPv6 addresses).", nonempty=True),
    )
    port: int = _option(
        8443,
        OptionMeta(
            "TCP port of the relay; 0 picks a free port (the URL printed at start names it).",
            min=0,
            max=65535,
        ),
    )
    tls: TLSConfig = field(default_factory=TLSConfig)
    workers: int | Literal["auto"] = _option(
        1,
        OptionMeta(
            "Worker processes sharing the port (SO_REUSEPORT) under a supervisor; `auto` = "
            "one per CPU. Above 1 needs `backplane.url`, which joins the workers' rooms.",
            min=1,
            max=1024,
        ),
    )


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = _option(
        True, OptionMeta("Serve `/metrics`, `/healthz` and `/readyz` on a separate port.")
    )
    host: str = _option("0.0.0.0", OptionMeta("Address of the metrics listener.", nonempty=True))
    port: int = _option(
        9090,
        OptionMeta("TCP port of the metrics listener; 0 picks a free port.", min=0, max=65535),
    )


@dataclass(frozen=True)
class LoggingConfig:
    output: str = _option(
        "stderr",
        OptionMeta(
            "`stdout`, `stderr`, or a file path (appended to, created if missing; a "
            "relative path is relative to the config file's directory).",
            nonempty=True,
            path=True,
        ),
    )
    level: str = _option(
        "info",
        OptionMeta(
            "Lowest level written: `debug`, `info`, `warn` or `error`.",
            choices=("debug", "info", "warn", "error"),
        ),
    )


@dataclass(frozen=True)
class RelayConfig:
    echo: bool = _option(
        True,
        OptionMeta("Deliver each message to its sender too (`false`: everyone else in the room)."),
    )
    max_message_size: int = _option(
        1048576,
        OptionMeta(
            "Largest message accepted, in bytes, after reassembling fragments; a "
            "larger one closes the connection with 1009.",
            min=125,
        ),
    )
    serve_demo: bool = _option(
        False,
        OptionMeta(
            "A plain `GET` on the relay port serves the browser chat demo `example/index.html`."
        ),
    )
    compression: bool = _option(
        False,
        OptionMeta(
            "Negotiate permessage-deflate (RFC 7692) with clients that offer it, without "
            "context takeover: each message of 128 bytes or more is compressed once for all "
            "such members of its room."
        ),
    )


@dataclass(frozen=True)
class LimitsConfig:
    max_connections: int = _option(
        0,
        OptionMeta(
            "Most clients connected at once; 0 = unlimited. Further upgrades get 503.", min=0
        ),
    )
    max_request_head: int = _option(
        8192,
        OptionMeta("Largest HTTP upgrade request head, in bytes; above it 431.", min=256),
    )
    max_headers: int = _option(
        64, OptionMeta("Most header lines in the upgrade request; above it 431.", min=8)
    )
    max_backlog: int = _option(
        1048576,
        OptionMeta(
            "Bytes queued for one client that is not reading; above it "
            "`slow_client_policy` applies.",
            min=1024,
        ),
    )
    slow_client_policy: str = _option(
        "backpressure",
        OptionMeta(
            "`backpressure`: when a member's backlog passes a quarter of `max_backlog`, "
            "the room's senders are read no faster than it reads (nothing is lost); a "
            "member that makes no progress for `timeouts.slow_client` seconds, or whose "
            "backlog reaches `max_backlog` plus four times `relay.max_message_size` (room "
            "for a burst of big messages), is closed with 1008. `disconnect`: no slowing "
            "down, close at "
            "`max_backlog`. `drop`: no slowing down, skip messages for it until its backlog "
            "drains. All are counted in the metrics.",
            choices=("backpressure", "disconnect", "drop"),
        ),
    )
    max_messages_per_second: int = _option(
        0, OptionMeta("Messages one connection may send per second; 0 = unlimited.", min=0)
    )
    allowed_origins: tuple[str, ...] = _option(
        (),
        OptionMeta(
            'Browser origins allowed to connect, e.g. `["https://chat.example.com"]`; '
            "empty = any. Other origins get 403. Lower-cased when loaded, to match "
            "what browsers send.",
            lower=True,
            item_check=_check_origin,
        ),
    )


@dataclass(frozen=True)
class TimeoutsConfig:
    handshake: float = _option(
        10.0, OptionMeta("Seconds a client has to complete the HTTP upgrade.", above=0)
    )
    shutdown: float = _option(
        10.0,
        OptionMeta(
            "Seconds to wait on SIGINT/SIGTERM for clients to answer the 1001 close.", above=0
        ),
    )
    close: float = _option(
        5.0,
        OptionMeta(
            "Seconds to wait for the peer's close frame before dropping the connection.",
            above=0,
        ),
    )
    slow_client: float = _option(
        5.0,
        OptionMeta(
            "Seconds a member may hold its room back (slow_client_policy `backpressure`) "
            "without reading anything before it is closed with 1008.",
            above=0,
        ),
    )
    ping_interval: float = _option(
        20.0,
        OptionMeta("Seconds between keepalive pings to an idle client; 0 disables pings.", min=0),
    )
    ping_timeout: float = _option(
        20.0,
        OptionMeta("Seconds to wait for the pong before closing the connection.", above=0),
    )


@dataclass(frozen=True)
class BackplaneConfig:
    url: str = _option(
        "",
        OptionMeta(
            "Redis (or Valkey) joining processes and hosts through pub/sub, one channel per "
            "room: `redis://[:password@]host:port/db`, `rediss://...` (TLS) or "
            "`unix:///path/redis.sock?db=0`. Empty: no backplane, one process on its own.",
            item_check=check_redis_url,
            shown=redact_url,
        ),
    )
    password_env: str = _option(
        "",
        OptionMeta(
            "Name of an environment variable holding the Redis password, instead of one "
            "in `url`; empty = none."
        ),
    )
    channel_prefix: str = _option(
        "fastrelay:",
        OptionMeta("A room's channel is this prefix followed by the room, in UTF-8."),
    )
    ca_file: str = _option(
        "",
        OptionMeta(
            "For `rediss://`: PEM file of the CA certificates that verify Redis; empty = "
            "the system's. A relative path is relative to the config file's directory.",
            path=True,
        ),
    )
    max_queue_bytes: int = _option(
        16777216,
        OptionMeta(
            "Bytes of messages waiting to be published; beyond it a message is not sent to "
            "other processes (local members still get it) and is counted as dropped.",
            min=65536,
        ),
    )
    reconnect_max_delay: float = _option(
        5.0,
        OptionMeta(
            "Longest wait, in seconds, between attempts to reach Redis again (exponential "
            "backoff from 0.1 s, with jitter).",
            min=0.1,
        ),
    )


@dataclass(frozen=True)
class AuthConfig:
    enabled: bool = _option(
        False,
        OptionMeta(
            "Every upgrade needs a signed token (JWT) allowing its room: `?token=` or "
            "`Authorization: Bearer`. Without a valid one 401, for another room 403."
        ),
    )
    algorithms: tuple[str, ...] = _option(
        ("HS256",),
        OptionMeta(
            "Signature algorithms accepted, all verified with the one key below: HS256/384/512 "
            "with `secret`; RS*, PS*, ES256/384/512 or EdDSA with `public_key_file`. Never "
            "taken from the token.",
            choices=ALGORITHMS,
        ),
    )
    secret: str = _option(
        "",
        OptionMeta(
            "HMAC secret, at least as many bytes as the hash (32 for HS256). Set one of "
            "`secret`, `secret_file`, `secret_env`.",
            secret=True,
        ),
    )
    secret_file: str = _option(
        "",
        OptionMeta(
            "File holding the HMAC secret (one trailing newline is ignored). A relative path "
            "is relative to the config file's directory.",
            path=True,
        ),
    )
    secret_env: str = _option(
        "", OptionMeta("Name of the environment variable holding the HMAC secret.")
    )
    public_key_file: str = _option(
        "",
        OptionMeta(
            "PEM public key (`BEGIN PUBLIC KEY`) for the RS, PS, ES and EdDSA algorithms. A "
            "relative path is relative to the config file's directory.",
            path=True,
        ),
    )
    audience: str = _option(
        "",
        OptionMeta(
            "When set, tokens must carry this `aud`; when empty, a token carrying an `aud` is "
            "refused (RFC 7519 §4.1.3)."
        ),
    )
    issuer: str = _option("", OptionMeta("When set, tokens must carry this `iss`."))
    leeway: float = _option(
        0.0,
        OptionMeta(
            "Seconds of clock skew allowed on `exp` and `nbf` between the token's issuer and "
            "this host.",
            min=0,
            max=300,
        ),
    )
    enforce_expiry: bool = _option(
        False,
        OptionMeta(
            "Close a connection with 1008 'token expired' when its token expires (else the "
            "token is only checked on the upgrade)."
        ),
    )


@dataclass(frozen=True)
class ApiConfig:
    enabled: bool = _option(
        False,
        OptionMeta(
            "Serve the publish API on the metrics listener: `POST /publish/<room>`, "
            "`GET /rooms`, `GET /rooms/<room>`, with `Authorization: Bearer <key>`. With "
            "`server.workers` above 1 it covers every worker of the host."
        ),
    )
    key: str = _option(
        "",
        OptionMeta(
            "API key, at least 16 bytes. Set one of `key`, `key_file`, `key_env`.", secret=True
        ),
    )
    key_file: str = _option(
        "",
        OptionMeta(
            "File holding the API key (one trailing newline is ignored). A relative path is "
            "relative to the config file's directory.",
            path=True,
        ),
    )
    key_env: str = _option("", OptionMeta("Name of the environment variable holding the API key."))


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    backplane: BackplaneConfig = field(default_factory=BackplaneConfig)


def worker_count(cfg: Config) -> int:
    """server.workers as a number (`auto`: the CPUs this process may run on)."""
    workers = cfg.server.workers
    if workers == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    return workers


# --- schema introspection (shared by the loader, the docs and the tests) ---


def _fields(cls: type[DataclassInstance]) -> list[tuple[dataclasses.Field[Any], Any]]:
    """Each field of a section with its resolved annotation."""
    hints = get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _is_section(annotation: Any) -> bool:
    return dataclasses.is_dataclass(annotation)


def _option_of(f: dataclasses.Field[Any], annotation: Any, prefix: str) -> Option:
    meta = f.metadata.get(_META)
    if not isinstance(meta, OptionMeta) or f.default is dataclasses.MISSING:
        # A mistake in the schema above, not in the user's file.
        raise TypeError(f"{prefix}{f.name}: declare leaf keys with _option()")
    return Option(f"{prefix}{f.name}", _KINDS[annotation], f.default, meta)


def iter_options(cls: type[DataclassInstance] = Config, prefix: str = "") -> Iterator[Option]:
    """Every leaf key of the schema, in declaration order."""
    for f, annotation in _fields(cls):
        if _is_section(annotation):
            yield from iter_options(annotation, f"{prefix}{f.name}.")
        else:
            yield _option_of(f, annotation, prefix)


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
        sections = ", ".join(f.name for f in dataclasses.fields(Config))
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections ({sections}), "
            f"got {_describe(data)}"
        )
    cfg = loader.build(Config, data, "")
    loader.check_cross_fields(cfg)
    return cfg


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}': {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None


class _StrictYAMLLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of keeping the last one.

    A key given twice is almost always an editing mistake, and silently
    taking the second value hides it.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
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


def _parse(path: str, text: str) -> tuple[object, dict[str, int]]:
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


def _index_lines(node: yaml.Node | None, prefix: str, out: dict[str, int]) -> None:
    # Error messages name the line of the offending key; the composed node
    # tree is the only place PyYAML keeps positions.
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            key = f"{prefix}{key_node.value}"
            out.setdefault(key, key_node.start_mark.line + 1)
            _index_lines(value_node, f"{key}.", out)


def _describe(value: object) -> str:
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

    def build(self, cls: type[_Section], data: Mapping[Any, object], prefix: str) -> _Section:
        fields = {f.name: (f, annotation) for f, annotation in _fields(cls)}
        for key in data:
            if key not in fields:
                raise self.unknown_key(prefix, key, list(fields))
        values: dict[str, object] = {}
        for name, (f, annotation) in fields.items():
            key = f"{prefix}{name}"
            if _is_section(annotation):
                # Absent or empty (every key commented out): all defaults,
                # still built here so default file paths get resolved too.
                section = data.get(name)
                if section is None:
                    section = {}
                if not isinstance(section, dict):
                    raise self.error(key, f"expected a mapping of keys, got {_describe(section)}")
                values[name] = self.build(annotation, section, f"{key}.")
                continue
            option = _option_of(f, annotation, prefix)
            if name in data:
                values[name] = self.leaf(option, data[name])
            elif option.meta.path and isinstance(option.default, str):
                values[name] = self.resolve_path(option.default)
        return cls(**values)

    def unknown_key(self, prefix: str, key: object, known: list[str]) -> ConfigError:
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

    def leaf(self, option: Option, value: object) -> OptionValue:
        checked = self.check_type(option, value)
        if isinstance(checked, float) and not math.isfinite(checked):
            raise self.error(option.key, f"expected a finite number, got {checked}")
        if isinstance(checked, (int, float)) and not isinstance(checked, bool):
            self.check_range(option, checked)
        if isinstance(checked, str):
            return self.check_string(option, checked)
        if isinstance(checked, tuple):
            return tuple(self.check_string(option, item) for item in checked)
        return checked

    def check_type(self, option: Option, value: object) -> OptionValue:
        kind = option.kind
        if kind == "boolean" and isinstance(value, bool):
            return value
        # bool is a subclass of int in Python; `port: true` is still a mistake.
        if not isinstance(value, bool):
            if kind == "integer" and isinstance(value, int):
                return value
            if kind == "number" and isinstance(value, (int, float)):
                return float(value)
        if kind == "string" and isinstance(value, str):
            return value
        if kind == "integer or auto":
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() == "auto":
                return "auto"
            raise self.error(option.key, f"expected an integer or auto, got {_describe(value)}")
        if kind == "list of strings" and isinstance(value, list):
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    raise self.error(
                        option.key, f"item {i + 1}: expected a string, got {_describe(item)}"
                    )
            return tuple(value)
        got = _describe(value)
        if option.meta.secret:
            got = got.split(" ", 1)[0]  # the type, not the value
        raise self.error(option.key, f"expected {_article(kind)}, got {got}")

    def check_range(self, option: Option, value: float) -> None:
        meta = option.meta
        if (
            (meta.min is not None and value < meta.min)
            or (meta.max is not None and value > meta.max)
            or (meta.above is not None and value <= meta.above)
        ):
            raise self.error(option.key, f"{value} is out of range (allowed: {meta.allowed()})")

    def check_string(self, option: Option, value: str) -> str:
        meta = option.meta
        if meta.lower:
            value = value.lower()
        if meta.nonempty and not value.strip():
            raise self.error(option.key, "must not be empty")
        if meta.choices and value not in meta.choices:
            close = difflib.get_close_matches(value, meta.choices, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise self.error(
                option.key,
                f"unknown value '{value}' (expected one of: {', '.join(meta.choices)}{hint})",
            )
        if meta.item_check:
            problem = meta.item_check(value)
            if problem:
                raise self.error(option.key, f"'{meta.shown(value)}': {problem}")
        if meta.path:
            value = self.resolve_path(value)
        return value

    def resolve_path(self, value: str) -> str:
        # Relative to the config file, so a service started from another
        # working directory still finds its files.
        if value in STREAM_OUTPUTS or not value:  # "": an optional file left unset
            return value
        return os.path.join(self.base_dir, os.path.expanduser(value))

    def check_cross_fields(self, cfg: Config) -> None:
        self.check_backplane(cfg)
        if cfg.metrics.enabled and _same_listener(
            cfg.server.host, cfg.server.port, cfg.metrics.host, cfg.metrics.port
        ):
            raise self.error(
                "metrics.port",
                f"{cfg.metrics.port} is also server.port; the two listeners need different ports",
            )
        if cfg.server.tls.enabled:
            # The context is built again by the server; loading it here makes
            # a bad certificate or key a config error, reported before listening.
            try:
                server_context(cfg.server.tls)
            except TLSFileError as e:
                raise self.error(f"server.tls.{e.option}", e.problem) from None
        if cfg.auth.enabled:
            if not cfg.auth.algorithms:
                raise self.error("auth.algorithms", "list at least one algorithm")
            # Read now, and again by the server: a missing file or variable,
            # or a key of the wrong kind, is reported before listening.
            try:
                verification_key(cfg.auth)
            except SecretError as e:
                raise self.error(f"auth.{e.option}", e.problem) from None
        if cfg.api.enabled:
            if not cfg.metrics.enabled:
                raise self.error(
                    "api.enabled",
                    "the publish API is served on the metrics listener: set metrics.enabled: true",
                )
            try:
                api_key(cfg.api)
            except SecretError as e:
                raise self.error(f"api.{e.option}", e.problem) from None

    def check_backplane(self, cfg: Config) -> None:
        backplane = cfg.backplane
        workers = worker_count(cfg)
        if workers > 1 and not backplane.url:
            raise self.error(
                "server.workers",
                f"{workers} workers without backplane.url: rooms would be split across "
                "workers (members on different workers would not see each other's messages)",
            )
        if not backplane.url:
            return
        if backplane.password_env:
            if urlsplit(backplane.url).password is not None:
                raise self.error(
                    "backplane.password_env",
                    "backplane.url has a password too; give it in one place only",
                )
            if backplane.password_env not in os.environ:
                raise self.error(
                    "backplane.password_env",
                    f"the environment variable {backplane.password_env} is not set",
                )
        if backplane.ca_file:
            if urlsplit(backplane.url).scheme != "rediss":
                raise self.error("backplane.ca_file", "only used with a rediss:// URL")
            try:
                with open(backplane.ca_file, "rb"):
                    pass
            except OSError as e:
                raise self.error(
                    "backplane.ca_file", f"cannot read '{backplane.ca_file}': {e.strerror or e}"
                ) from None


# Guessing a random key of this length is hopeless; shorter ones are refused.
API_KEY_MIN_BYTES = 16


def api_key(api: ApiConfig) -> bytes:
    """The publish API's key from its one configured source (SecretError if none)."""
    return read_secret(SecretSource("key", api.key, api.key_file, api.key_env), API_KEY_MIN_BYTES)


_WILDCARDS = ("0.0.0.0", "::", "")


def _same_listener(host_a: str, port_a: int, host_b: str, port_b: int) -> bool:
    """Would two listeners collide? Port 0 never does: each gets a free port."""
    if port_a != port_b or port_a == 0:
        return False
    return host_a == host_b or host_a in _WILDCARDS or host_b in _WILDCARDS
