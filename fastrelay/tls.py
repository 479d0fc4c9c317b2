"""The relay's TLS server context: the one place that loads the certificate and key.

The config loader calls server_context() when TLS is enabled, so a bad file
stops the program before it listens; the server calls it again to build the
context it listens with. Both see the same checks and the same messages.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config.py imports this module; the type is all we need
    from .config import TLSConfig


class TLSFileError(Exception):
    """The certificate or key cannot be used.

    `option` is the TLSConfig field at fault ("cert_file" or "key_file") and
    `problem` says what is wrong with it, in one line naming the file.
    """

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(f"{option}: {problem}")
        self.option = option
        self.problem = problem


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    """A server-side context holding `tls.cert_file` and `tls.key_file`.

    Raises TLSFileError when a file is unreadable, is not PEM, when the key
    is encrypted or when it is not the key of the certificate.
    """
    # Open both files first so a missing one is reported by its option name
    # rather than as an opaque SSL error.
    for option, path in (("cert_file", tls.cert_file), ("key_file", tls.key_file)):
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise TLSFileError(option, f"cannot read '{path}': {e.strerror or e}") from None
    # Server-side defaults of the ssl module: TLS 1.2 or later, no
    # compression, its cipher list; clients are not asked for certificates.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        # Without a password callback OpenSSL would prompt on the terminal
        # for an encrypted key and hang a service.
        context.load_cert_chain(tls.cert_file, tls.key_file, password=_refuse_password)
    except _EncryptedKey:
        raise TLSFileError(
            "key_file", f"'{tls.key_file}' is encrypted; fastrelay needs an unencrypted key"
        ) from None
    except ssl.SSLError as e:
        raise _diagnose(tls, e) from None
    return context


def _diagnose(tls: TLSConfig, error: ssl.SSLError) -> TLSFileError:
    """Which file made load_cert_chain() fail, and why."""
    if "KEY_VALUES_MISMATCH" in str(error):
        return TLSFileError(
            "key_file", f"'{tls.key_file}' is not the private key of '{tls.cert_file}'"
        )
    reason = error.reason or error
    # OpenSSL does not say which of the two files it could not parse; the
    # certificate either parses on its own or it does not.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=tls.cert_file)
    except ssl.SSLError:
        return TLSFileError("cert_file", f"'{tls.cert_file}' is not a PEM certificate ({reason})")
    return TLSFileError("key_file", f"'{tls.key_file}' is not a PEM private key ({reason})")


class _EncryptedKey(Exception):
    pass


def _refuse_password() -> bytes:
    raise _EncryptedKey
