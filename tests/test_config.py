"""Config loading: the shipped files, defaults, and one test per kind of user error.

Errors are checked twice: in-process (the ConfigError message) and through
the real `python -m fastrelay` process (exit code 2, one stderr line naming
the key, no traceback), because the latter is what a user sees.
"""

from __future__ import annotations

import importlib.util
import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trustme
import yaml
from cryptography.hazmat.primitives import serialization

import fastrelay.config as config_module
from fastrelay.config import Config, ConfigError, OptionMeta, TLSConfig, iter_options, load_config
from fastrelay.tls import TLSFileError, server_context

# The directory holding the imported fastrelay package: the checkout, or
# site-packages when testing an installed wheel. Not resolved, so the
# subprocess imports the very same package as this test.
PACKAGE_ROOT = Path(os.path.abspath(config_module.__file__)).parent.parent
REPO = Path(__file__).resolve().parent.parent


def fastrelay_process(
    *args: str, cwd: Path, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "fastrelay", *args],
        check=False,  # the exit code is what is being tested
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --- the shipped files ---


def test_config_yaml_has_the_predecessor_keys_and_the_demo():
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    assert flatten(raw) == {
        "server.port": 8443,
        "server.tls.enabled": False,
        "server.tls.cert_file": "cert.pem",
        "server.tls.key_file": "key.pem",
        "metrics.enabled": True,
        "metrics.port": 9090,
        "logging.output": "stderr",
        "logging.level": "info",
        "relay.serve_demo": True,
    }


def test_config_yaml_loads():
    cfg = load_config(str(REPO / "config.yaml"))
    assert cfg.server.port == 8443
    assert cfg.server.tls.enabled is False
    assert cfg.metrics.enabled is True and cfg.metrics.port == 9090
    assert cfg.logging.output == "stderr" and cfg.logging.level == "info"
    assert cfg.relay.serve_demo is True


def test_config_example_lists_every_key_with_its_default():
    raw = flatten(yaml.safe_load((REPO / "config.example.yaml").read_text()))
    expected = {
        f.key: list(f.default) if isinstance(f.default, tuple) else f.default
        for f in iter_options()
    }
    assert raw == expected


def test_config_example_loads_to_the_defaults():
    cfg = load_config(str(REPO / "config.example.yaml"))
    # Only the file paths differ: they are resolved against the file's directory.
    assert cfg.server.tls.cert_file == str(REPO / "cert.pem")
    defaults = Config()
    assert cfg.metrics == defaults.metrics
    assert cfg.logging == defaults.logging
    assert cfg.relay == defaults.relay
    assert cfg.limits == defaults.limits
    assert cfg.timeouts == defaults.timeouts
    # Optional files left empty stay empty (not resolved to the directory).
    assert cfg.auth == defaults.auth
    assert cfg.api == defaults.api
    assert (cfg.server.host, cfg.server.port) == (
        defaults.server.host,
        defaults.server.port,
    )


def test_readme_config_table_matches_the_schema():
    # docs/gen_config_table.py renders the key and metric tables from the
    # schema; every document carrying the markers must hold the current
    # rendering (run the script to refresh them).
    spec = importlib.util.spec_from_file_location(
        "gen_config_table", REPO / "docs" / "gen_config_table.py"
    )
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    docs = [p for p in (REPO / "README.md",) if p.exists() and gen.START in p.read_text()]
    assert docs, "no document carries the generated config table"
    for doc in docs:
        assert gen.update(doc.read_text()) == doc.read_text(), (
            f"{doc.name} is stale: run python docs/gen_config_table.py"
        )


# The Python type a loaded value of each kind has; `type(...) is` keeps a
# boolean default from passing for an integer one.
KIND_TYPES = {
    "boolean": bool,
    "integer": int,
    "number": float,
    "string": str,
    "list of strings": tuple,
    "integer or auto": int,
}


def test_every_option_has_help_and_a_default_of_its_kind():
    options = list(iter_options())
    assert len({o.key for o in options}) == len(options)
    for option in options:
        assert isinstance(option.meta, OptionMeta), option.key
        assert option.meta.help.strip(), option.key
        assert type(option.default) is KIND_TYPES[option.kind], option.key


def test_option_metadata_is_frozen():
    option = next(iter_options())
    with pytest.raises(AttributeError):
        option.meta.help = "changed"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        option.default = 1  # type: ignore[misc]


# --- defaults and valid values ---


def test_defaults_match_the_spec():
    cfg = Config()
    assert (cfg.server.host, cfg.server.port) == ("0.0.0.0", 8443)
    assert (
        cfg.server.tls.enabled,
        cfg.server.tls.cert_file,
        cfg.server.tls.key_file,
    ) == (False, "cert.pem", "key.pem")
    assert (cfg.metrics.enabled, cfg.metrics.host, cfg.metrics.port) == (
        True,
        "0.0.0.0",
        9090,
    )
    assert (cfg.logging.output, cfg.logging.level) == ("stderr", "info")
    assert (cfg.relay.echo, cfg.relay.max_message_size, cfg.relay.serve_demo) == (
        True,
        1048576,
        False,
    )
    lim = cfg.limits
    assert (
        lim.max_connections,
        lim.max_request_head,
        lim.max_headers,
        lim.max_backlog,
    ) == (0, 8192, 64, 1048576)
    assert (
        lim.slow_client_policy,
        lim.max_messages_per_second,
        lim.allowed_origins,
    ) == ("backpressure", 0, ())
    t = cfg.timeouts
    assert (t.handshake, t.shutdown, t.close, t.ping_interval, t.ping_timeout) == (
        10.0,
        10.0,
        5.0,
        20.0,
        20.0,
    )


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.server.port = 1  # type: ignore[misc]


def test_without_path_reads_config_yaml_in_the_working_directory(tmp_path, monkeypatch):
    write(tmp_path, "server: {port: 1234}\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(None).server.port == 1234


def test_without_path_or_file_uses_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(None) == Config()


def test_empty_file_and_empty_sections_mean_defaults(tmp_path, monkeypatch):
    # Loaded by a relative name, so default file paths stay as they are.
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "# nothing set\n")
    assert load_config("config.yaml") == Config()
    write(tmp_path, "server:\nlimits:\n")
    assert load_config("config.yaml") == Config()


@pytest.mark.parametrize("value", ["0", "false", "''", "[]"])
def test_falsy_section_is_not_taken_for_empty(tmp_path, value):
    assert "server: expected a mapping of keys" in error_of(tmp_path, f"server: {value}\n")


def test_port_zero_is_allowed(tmp_path):
    cfg = load_config(write(tmp_path, "server: {port: 0}\nmetrics: {port: 0}\n"))
    assert (cfg.server.port, cfg.metrics.port) == (0, 0)


def test_durations_accept_integers_as_floats(tmp_path):
    cfg = load_config(write(tmp_path, "timeouts: {handshake: 3, ping_interval: 0}\n"))
    assert cfg.timeouts.handshake == 3.0 and isinstance(cfg.timeouts.handshake, float)
    assert cfg.timeouts.ping_interval == 0.0


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    sub = tmp_path / "etc"
    sub.mkdir()
    cfg = load_config(
        write(
            sub,
            "logging: {output: relay.log}\nserver: {tls: {cert_file: /abs/c.pem}}\n",
        )
    )
    assert cfg.logging.output == str(sub / "relay.log")
    assert cfg.server.tls.cert_file == "/abs/c.pem"
    assert cfg.server.tls.key_file == str(sub / "key.pem")  # a default is a relative path too
    assert load_config(write(sub, "logging: {output: stdout}\n")).logging.output == "stdout"


def test_allowed_origins_become_a_lowercase_tuple(tmp_path):
    cfg = load_config(
        write(
            tmp_path,
            "limits: {allowed_origins: ['https://Chat.Example.com', 'http://localhost:8000']}\n",
        )
    )
    assert cfg.limits.allowed_origins == (
        "https://chat.example.com",
        "http://localhost:8000",
    )


# --- one test per kind of error (in-process message) ---


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_suggests_the_close_one(tmp_path):
    message = error_of(tmp_path, "server:\n  prot: 8443\n")
    assert (
        message
        == f"{tmp_path / 'config.yaml'}:2: unknown key 'server.prot' (did you mean 'server.port'?)"
    )


def test_unknown_section_suggests_the_close_one(tmp_path):
    assert "unknown key 'metric' (did you mean 'metrics'?)" in error_of(
        tmp_path, "metric: {enabled: true}\n"
    )


def test_unknown_key_without_a_close_one_lists_the_known_keys(tmp_path):
    assert "unknown key 'logging.colour' (known keys here: output, level)" in error_of(
        tmp_path, "logging: {colour: red}\n"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "server: {port: '8443'}",
            "server.port: expected an integer, got string '8443'",
        ),
        (
            "server: {port: true}",
            "server.port: expected an integer, got boolean true",
        ),  # bool is not int
        (
            "server: {port: 8443.5}",
            "server.port: expected an integer, got number 8443.5",
        ),
        ("metrics: {enabled: 1}", "metrics.enabled: expected a boolean, got integer 1"),
        (
            "timeouts: {close: fast}",
            "timeouts.close: expected a number, got string 'fast'",
        ),
        (
            "timeouts: {close: false}",
            "timeouts.close: expected a number, got boolean false",
        ),
        ("logging: {output: 3}", "logging.output: expected a string, got integer 3"),
        ("logging: {level: }", "logging.level: expected a string, got nothing (null)"),
        (
            "limits: {allowed_origins: 'https://a.example'}",
            "limits.allowed_origins: expected a list of strings, got string",
        ),
        (
            "limits: {allowed_origins: [1]}",
            "limits.allowed_origins: item 1: expected a string, got integer 1",
        ),
        ("server: 8443", "server: expected a mapping of keys, got integer 8443"),
    ],
)
def test_wrong_type(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text + "\n")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "server: {port: 65536}",
            "server.port: 65536 is out of range (allowed: 0..65535)",
        ),
        ("server: {port: -1}", "server.port: -1 is out of range (allowed: 0..65535)"),
        ("metrics: {port: 70000}", "metrics.port: 70000 is out of range"),
        (
            "relay: {max_message_size: 124}",
            "relay.max_message_size: 124 is out of range (allowed: >= 125)",
        ),
        (
            "limits: {max_request_head: 255}",
            "limits.max_request_head: 255 is out of range (allowed: >= 256)",
        ),
        ("limits: {max_headers: 7}", "limits.max_headers: 7 is out of range"),
        ("limits: {max_backlog: 1023}", "limits.max_backlog: 1023 is out of range"),
        ("limits: {max_connections: -1}", "limits.max_connections: -1 is out of range"),
        (
            "timeouts: {handshake: 0}",
            "timeouts.handshake: 0.0 is out of range (allowed: > 0)",
        ),
        ("timeouts: {shutdown: -2}", "timeouts.shutdown: -2.0 is out of range"),
        (
            "timeouts: {ping_interval: -0.5}",
            "timeouts.ping_interval: -0.5 is out of range (allowed: >= 0)",
        ),
        (
            "timeouts: {close: .inf}",
            "timeouts.close: expected a finite number, got inf",
        ),
        (
            "timeouts: {close: .nan}",
            "timeouts.close: expected a finite number, got nan",
        ),
        ("server: {host: ''}", "server.host: must not be empty"),
        (
            "limits: {allowed_origins: ['https://a.example/']}",
            "'https://a.example/': an origin has no path",
        ),
        (
            "limits: {allowed_origins: ['a.example']}",
            "'a.example': expected an origin like",
        ),
        (
            "server: {port: 9000}\nmetrics: {port: 9000}",
            "metrics.port: 9000 is also server.port",
        ),
    ],
)
def test_out_of_range(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text + "\n")


def test_unknown_log_level_suggests_the_close_one(tmp_path):
    message = error_of(tmp_path, "logging:\n  level: warning\n")
    assert message.endswith(
        ":2: logging.level: unknown value 'warning' "
        "(expected one of: debug, info, warn, error; did you mean 'warn'?)"
    )


def test_unknown_slow_client_policy(tmp_path):
    assert "limits.slow_client_policy: unknown value 'block'" in error_of(
        tmp_path, "limits: {slow_client_policy: block}\n"
    )


def test_missing_file(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"cannot read config file '.*nope\.yaml': No such file or directory",
    ):
        load_config(str(tmp_path / "nope.yaml"))


def test_unreadable_file(tmp_path):
    # A directory cannot be read as a file, even by root (unlike chmod 000).
    with pytest.raises(ConfigError, match=r"cannot read config file '.*': Is a directory"):
        load_config(str(tmp_path))


def test_not_utf8(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"server: {host: \xff}\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(path))


def test_invalid_yaml_names_line_and_column(tmp_path):
    message = error_of(tmp_path, "server:\n  port: 8443\n tls: x\n")
    assert message.startswith(f"{tmp_path / 'config.yaml'}:3:2: invalid YAML: ")


def test_duplicate_key_is_an_error(tmp_path):
    message = error_of(tmp_path, "server:\n  port: 1\n  port: 2\n")
    assert message == f"{tmp_path / 'config.yaml'}:3:3: invalid YAML: duplicate key 'port'"


@pytest.mark.parametrize(
    ("text", "got"),
    [
        ("- server\n", "a list"),
        ("8443\n", "integer 8443"),
        ("just text\n", "string 'just text'"),
    ],
)
def test_top_level_not_a_mapping(tmp_path, text, got):
    message = error_of(tmp_path, text)
    assert "the top level must be a mapping of sections" in message and message.endswith(
        f"got {got}"
    )


# --- TLS ---


@pytest.fixture(scope="module")
def pems(tmp_path_factory):
    """A matching cert/key pair, a key of another certificate, and an encrypted key."""
    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    other = ca.issue_cert("other.example")
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    other.private_key_pem.write_to_path(str(d / "other-key.pem"))
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), password=None)
    (d / "encrypted-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    (d / "garbage.pem").write_text("not a pem file\n")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    return d


def tls_yaml(cert: str, key: str, enabled: bool = True) -> str:
    return (
        f"server:\n  tls:\n    enabled: {str(enabled).lower()}\n"
        f"    cert_file: {cert}\n    key_file: {key}\n"
    )


def test_tls_with_a_matching_pair_loads(tmp_path, pems):
    cfg = load_config(write(tmp_path, tls_yaml(pems / "cert.pem", pems / "key.pem")))
    assert cfg.server.tls.enabled and cfg.server.tls.cert_file == str(pems / "cert.pem")


def test_tls_disabled_does_not_check_files(tmp_path):
    assert (
        load_config(
            write(tmp_path, tls_yaml("missing.pem", "missing.pem", enabled=False))
        ).server.tls.enabled
        is False
    )


def test_tls_missing_cert(tmp_path, pems):
    message = error_of(tmp_path, tls_yaml(tmp_path / "nope.pem", pems / "key.pem"))
    assert (
        ":4: server.tls.cert_file: cannot read " in message
        and "No such file or directory" in message
    )


def test_tls_missing_key(tmp_path, pems):
    message = error_of(tmp_path, tls_yaml(pems / "cert.pem", tmp_path / "nope.pem"))
    assert ":5: server.tls.key_file: cannot read " in message


def test_tls_unreadable_key(tmp_path, pems):
    assert "server.tls.key_file: cannot read" in error_of(
        tmp_path, tls_yaml(pems / "cert.pem", tmp_path)
    )


def test_tls_cert_and_key_that_do_not_match(tmp_path, pems):
    message = error_of(tmp_path, tls_yaml(pems / "cert.pem", pems / "other-key.pem"))
    assert (
        f"server.tls.key_file: '{pems / 'other-key.pem'}' "
        f"is not the private key of '{pems / 'cert.pem'}'" in message
    )


def test_tls_cert_that_is_not_pem(tmp_path, pems):
    assert "server.tls.cert_file: " in error_of(
        tmp_path, tls_yaml(pems / "garbage.pem", pems / "key.pem")
    )


def test_tls_key_that_is_not_pem(tmp_path, pems):
    assert "server.tls.key_file: " in error_of(
        tmp_path, tls_yaml(pems / "cert.pem", pems / "garbage.pem")
    )


def test_tls_encrypted_key_is_refused_without_prompting(tmp_path, pems):
    # Without a password callback OpenSSL would prompt on the terminal.
    message = error_of(tmp_path, tls_yaml(pems / "cert.pem", pems / "encrypted-key.pem"))
    assert "server.tls.key_file: " in message and "is encrypted" in message


def tls_handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    """Run a real TLS handshake between two contexts through memory buffers;
    return the client's end."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_end = client.wrap_bio(to_client, to_server, server_hostname="localhost")
    server_end = server.wrap_bio(to_server, to_client, server_side=True)
    # Each side's output is the other's input, so writes need no shuttling.
    pending = [client_end, server_end]
    for _ in range(8):  # TLS 1.2 takes 2 round trips; bounded all the same
        for end in list(pending):
            try:
                end.do_handshake()
                pending.remove(end)
            except ssl.SSLWantReadError:
                pass
        if not pending:
            return client_end
    raise AssertionError("the TLS handshake did not finish")


def test_server_context_completes_a_handshake(pems):
    server = server_context(
        TLSConfig(enabled=True, cert_file=str(pems / "cert.pem"), key_file=str(pems / "key.pem"))
    )
    client = ssl.create_default_context(cafile=str(pems / "ca.pem"))
    client_end = tls_handshake(server, client)
    assert client_end.version() in ("TLSv1.2", "TLSv1.3")
    assert ("DNS", "localhost") in client_end.getpeercert()["subjectAltName"]


def test_server_context_names_the_file_at_fault(pems):
    mismatched = TLSConfig(
        enabled=True, cert_file=str(pems / "cert.pem"), key_file=str(pems / "other-key.pem")
    )
    with pytest.raises(TLSFileError) as info:
        server_context(mismatched)
    assert info.value.option == "key_file"
    assert info.value.problem == (
        f"'{pems / 'other-key.pem'}' is not the private key of '{pems / 'cert.pem'}'"
    )


# --- the same errors as the user sees them: the real process ---


PROCESS_CASES = {
    "unknown_key": (
        "server:\n  prot: 8443\n",
        "unknown key 'server.prot' (did you mean 'server.port'?)",
    ),
    "wrong_type": ("server: {port: '8443'}\n", "server.port: expected an integer"),
    "bool_for_int": (
        "metrics: {port: yes}\n",
        "metrics.port: expected an integer, got boolean true",
    ),
    "out_of_range": ("server: {port: 99999}\n", "server.port: 99999 is out of range"),
    "duration": (
        "timeouts: {handshake: 0}\n",
        "timeouts.handshake: 0.0 is out of range",
    ),
    "log_level": (
        "logging: {level: verbose}\n",
        "logging.level: unknown value 'verbose'",
    ),
    "invalid_yaml": ("server: [port\n", "invalid YAML"),
    "not_a_mapping": ("[1, 2]\n", "the top level must be a mapping"),
    "tls_missing_cert": (
        tls_yaml("nope.pem", "key.pem"),
        "server.tls.cert_file: cannot read",
    ),
    "auth_without_secret": (
        "auth: {enabled: true}\n",
        "auth.secret: set one of secret, secret_file or secret_env",
    ),
    "auth_secret_file_missing": (
        "auth: {enabled: true, secret_file: nope.txt}\n",
        "auth.secret_file: cannot read",
    ),
    "api_without_key": ("api: {enabled: true}\n", "api.key: set one of key, key_file or key_env"),
}


def assert_one_error_line(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fastrelay: error: ")
    assert expected in lines[0]
    assert result.stdout == ""  # never got as far as listening


@pytest.mark.parametrize("case", sorted(PROCESS_CASES))
def test_process_exits_2_with_one_line(tmp_path, case):
    text, expected = PROCESS_CASES[case]
    write(tmp_path, text, "bad.yaml")
    assert_one_error_line(fastrelay_process("--config-file", "bad.yaml", cwd=tmp_path), expected)


def test_process_missing_config_file(tmp_path):
    result = fastrelay_process("--config-file", "nope.yaml", cwd=tmp_path)
    assert_one_error_line(result, "cannot read config file 'nope.yaml': No such file or directory")


def test_process_tls_mismatch(tmp_path, pems):
    write(tmp_path, tls_yaml(pems / "cert.pem", pems / "other-key.pem"), "bad.yaml")
    result = fastrelay_process("--config-file", "bad.yaml", cwd=tmp_path)
    assert_one_error_line(result, "server.tls.key_file: ")


def test_process_reads_config_yaml_from_the_working_directory(tmp_path):
    write(tmp_path, "logging: {level: loud}\n")
    assert_one_error_line(
        fastrelay_process(cwd=tmp_path),
        "config.yaml:1: logging.level: unknown value 'loud'",
    )


def test_process_unwritable_log_file(tmp_path):
    write(tmp_path, "logging: {output: no/such/dir/relay.log}\n", "bad.yaml")
    result = fastrelay_process("--config-file", "bad.yaml", cwd=tmp_path)
    assert_one_error_line(
        result,
        "logging.output: cannot open 'no/such/dir/relay.log': No such file or directory",
    )
