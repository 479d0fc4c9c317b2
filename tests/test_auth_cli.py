"""`fastrelay token`: the command a person uses to try access control out,
run as a process; the token it prints is used against a real relay."""

from __future__ import annotations

import subprocess
import sys

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.sync.client import connect

SECRET = "cli-test-secret-0123456789-abcdefghijk"
AUTH = {"enabled": True, "secret": SECRET, "audience": "aud-1", "issuer": "iss-1"}


def fastrelay(*args: str, cwd=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastrelay", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"auth": AUTH}))
    return path


def decode(token: str) -> dict:
    return jwt.decode(token, SECRET, algorithms=["HS256"], audience="aud-1", issuer="iss-1")


def test_token_carries_the_rooms_ttl_and_configured_claims(config_file):
    result = fastrelay(
        "token", "--config-file", str(config_file), "--room", "/lobby", "--room", "/team/*",
        "--ttl", "15m", "--sub", "alice",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 1  # just the token: TOKEN=$(fastrelay token ...) works
    claims = decode(lines[0])
    assert claims["rooms"] == ["/lobby", "/team/*"]
    assert claims["publish"] is True and claims["sub"] == "alice"
    assert claims["exp"] - claims["iat"] == 900


@pytest.mark.parametrize("ttl, seconds", [("90", 90), ("90s", 90), ("1h", 3600), ("7d", 604800)])
def test_ttl_units(config_file, ttl, seconds):
    result = fastrelay("token", "--config-file", str(config_file), "--room", "/r", "--ttl", ttl)
    claims = decode(result.stdout.strip())
    assert claims["exp"] - claims["iat"] == seconds


def test_read_only_and_config_file_before_the_command(config_file):
    result = fastrelay("--config-file", str(config_file), "token", "--room", "/r", "--read-only")
    assert result.returncode == 0, result.stderr
    assert decode(result.stdout.strip())["publish"] is False


def test_default_ttl_is_an_hour_and_config_yaml_is_read_from_the_working_directory(config_file):
    result = fastrelay("token", "--room", "/r", cwd=config_file.parent)
    claims = decode(result.stdout.strip())
    assert claims["exp"] - claims["iat"] == 3600


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ttl", "1y"], "'1y' is not a duration"),
        (["--ttl", "0"], "'0' is not a duration"),
        (["--ttl=-5m"], "'-5m' is not a duration"),
        ([], "the following arguments are required: --room"),
    ],
)
def test_usage_errors(config_file, args, message):
    room = [] if not args else ["--room", "/r"]
    result = fastrelay("token", "--config-file", str(config_file), *room, *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_asymmetric_config_is_refused_in_one_line(tmp_path):
    public = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "ec.pem").write_bytes(public)
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {"auth": {"enabled": True, "algorithms": ["ES256"], "public_key_file": "ec.pem"}}
        )
    )
    result = fastrelay("token", "--config-file", str(config), "--room", "/r")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "fastrelay: error: auth.algorithms: fastrelay token signs with the HMAC secret, and "
        "ES256 tokens need your private key: mint them in your application"
    ]


def test_without_a_secret_one_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("auth: {enabled: false}\n")
    result = fastrelay("token", "--config-file", str(config), "--room", "/r")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "fastrelay: error: auth.secret: set one of secret, secret_file or secret_env"
    ]


def test_a_note_when_the_config_does_not_enable_auth(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"auth": {**AUTH, "enabled": False}}))
    result = fastrelay("token", "--config-file", str(config), "--room", "/r")
    assert result.returncode == 0
    assert decode(result.stdout.strip())["rooms"] == ["/r"]
    assert "auth.enabled is false" in result.stderr


def test_the_printed_token_opens_its_room_on_a_relay(relay_factory, config_file):
    relay = relay_factory({"auth": AUTH})
    token = fastrelay("token", "--config-file", str(config_file), "--room", "/lobby").stdout.strip()
    with connect(f"{relay.ws('/lobby')}?token={token}", open_timeout=10, close_timeout=10) as ws:
        ws.send("minted")
        assert ws.recv(timeout=10) == "minted"


def test_config_file_with_equals_before_the_command(config_file):
    result = fastrelay(f"--config-file={config_file}", "token", "--room", "/r")
    assert result.returncode == 0, result.stderr
    assert decode(result.stdout.strip())["rooms"] == ["/r"]


def test_the_relay_command_line_is_unchanged(tmp_path):
    # Without the word `token`, the relay's own parser answers as before:
    # an unknown option is not taken for a command.
    result = fastrelay("--confg-file", "token.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "unrecognized arguments: --confg-file token.yaml" in result.stderr
