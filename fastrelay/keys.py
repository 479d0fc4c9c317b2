"""Where secrets and keys come from: the config itself, a file, or an
environment variable named in the config.

The config loader calls these when access control or the publish API is
enabled, so a missing file, an unset variable or a key of the wrong kind
stops the program before it listens; the server calls them again to build
what it checks with. Both see the same checks and the same messages, and no
message ever contains the secret itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)


class SecretError(Exception):
    """A secret or key cannot be used.

    `option` is the config field at fault (e.g. "secret_file") and
    `problem` says what is wrong with it in one line, without its value.
    """

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(f"{option}: {problem}")
        self.option = option
        self.problem = problem


@dataclass(frozen=True)
class SecretSource:
    """The three ways of giving one secret, as named in the config.

    `prefix` is the option name before `""`, `"_file"` or `"_env"` (e.g.
    "secret" gives secret, secret_file and secret_env).
    """

    prefix: str
    literal: str
    file: str
    env: str


def read_secret(source: SecretSource, min_bytes: int) -> bytes:
    """The secret given by exactly one of the three options.

    A file's content loses one trailing newline (editors add it; a secret
    never ends with one). Raises SecretError naming the option when none or
    several are set, the file or variable is missing or empty, or the secret
    is shorter than `min_bytes`.
    """
    given = [
        (name, value)
        for name, value in (
            (source.prefix, source.literal),
            (f"{source.prefix}_file", source.file),
            (f"{source.prefix}_env", source.env),
        )
        if value
    ]
    if len(given) != 1:
        names = f"{source.prefix}, {source.prefix}_file or {source.prefix}_env"
        if not given:
            raise SecretError(source.prefix, f"set one of {names}")
        raise SecretError(given[1][0], f"set only one of {names}")
    option, value = given[0]
    if option.endswith("_file"):
        try:
            with open(value, "rb") as f:
                secret = f.read()
        except OSError as e:
            raise SecretError(option, f"cannot read '{value}': {e.strerror or e}") from None
        secret = secret.removesuffix(b"\n").removesuffix(b"\r")
        where = f"'{value}'"
    elif option.endswith("_env"):
        if value not in os.environ:
            raise SecretError(option, f"the environment variable {value} is not set")
        secret = os.environ[value].encode()
        where = f"the environment variable {value}"
    else:
        secret = value.encode()
        where = "it"
    if not secret:
        raise SecretError(option, f"{where} holds an empty secret")
    if len(secret) < min_bytes:
        # Said without the value or its exact length.
        raise SecretError(option, f"{where} holds a secret shorter than {min_bytes} bytes")
    return secret


def read_public_key(option: str, path: str) -> PublicKey:
    """The PEM public key (SubjectPublicKeyInfo) in `path`."""
    if not path:
        raise SecretError(option, "set the PEM file of the public key that verifies tokens")
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise SecretError(option, f"cannot read '{path}': {e.strerror or e}") from None
    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise SecretError(
            option, f"'{path}' is not a PEM public key (-----BEGIN PUBLIC KEY-----)"
        ) from None
    if not isinstance(
        key,
        (
            rsa.RSAPublicKey,
            ec.EllipticCurvePublicKey,
            ed25519.Ed25519PublicKey,
            ed448.Ed448PublicKey,
        ),
    ):
        raise SecretError(option, f"'{path}' holds a key of a kind tokens are not signed with")
    return key
