"""TLS for the wss workloads: a throwaway certificate made at run time, and
a non-blocking TLS client socket that the load generator's members can use
in place of a plain one.

The certificate authority and the server certificate (for 127.0.0.1 and
localhost) are generated once per harness process with `trustme`, written to
a temporary directory removed at exit, and trusted by the load generator and
the websockets spot check only.
"""

from __future__ import annotations

import atexit
import os
import select
import shutil
import socket
import ssl
import tempfile
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Certs:
    cert_file: str  # server certificate chain (PEM)
    key_file: str  # its private key (PEM)
    ca_file: str  # the authority the clients trust (PEM)

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        # TLS 1.3 everywhere: the servers and the clients then agree on one
        # cipher (AES-GCM with AES-NI), whatever each library prefers.
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        return ctx


_certs: Optional[Certs] = None


def certs() -> Certs:
    """This process's throwaway certificate (made on first use)."""
    global _certs
    if _certs is None:
        import trustme  # only the wss workloads need it (bench/requirements.txt)

        where = tempfile.mkdtemp(prefix="fastrelay-bench-tls-")
        atexit.register(shutil.rmtree, where, True)
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        paths = Certs(
            os.path.join(where, "cert.pem"),
            os.path.join(where, "key.pem"),
            os.path.join(where, "ca.pem"),
        )
        cert.cert_chain_pems[0].write_to_path(paths.cert_file)
        for pem in cert.cert_chain_pems[1:]:
            pem.write_to_path(paths.cert_file, append=True)
        cert.private_key_pem.write_to_path(paths.key_file)
        ca.cert_pem.write_to_path(paths.ca_file)
        _certs = paths
    return _certs


class TLSStream:
    """A connected non-blocking TLS socket with the plain socket's manners,
    as far as loadgen.Member uses them: recv_into() and send() raise
    BlockingIOError when nothing can be done, never SSLWant*Error.

    recv_into() keeps reading records until the kernel has nothing more or
    the buffer is full. One SSL read returns at most one record; stopping
    after it could leave decrypted bytes inside the TLS object while the
    socket itself is no longer readable, and epoll would never report them.
    """

    def __init__(self, ssock: ssl.SSLSocket) -> None:
        self.ssock = ssock
        self.fd = ssock.fileno()

    @classmethod
    def wrap(cls, ctx: ssl.SSLContext, sock: socket.socket, host: str) -> "TLSStream":
        """Start a client TLS session on a connected socket (same fd)."""
        return cls(ctx.wrap_socket(sock, do_handshake_on_connect=False, server_hostname=host))

    def handshake_step(self) -> int:
        """Advance the TLS handshake: 0 once done, else the epoll event
        (EPOLLIN or EPOLLOUT) to wait for before calling again."""
        try:
            self.ssock.do_handshake()
        except ssl.SSLWantReadError:
            return select.EPOLLIN
        except ssl.SSLWantWriteError:
            return select.EPOLLOUT
        return 0

    def fileno(self) -> int:
        return self.fd

    def recv_into(self, view, nbytes: int = 0) -> int:
        nbytes = nbytes or len(view)
        got = 0
        while got < nbytes:
            try:
                n = self.ssock.recv_into(view[got:], nbytes - got)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            if n == 0:  # EOF: report what came before it; the next call says 0
                return got
            got += n
        if got == 0:
            raise BlockingIOError(11, "TLS: no complete record")
        return got

    def recv(self, nbytes: int) -> bytes:
        buf = bytearray(nbytes)
        n = self.recv_into(memoryview(buf), nbytes)
        return bytes(buf[:n])

    def send(self, data) -> int:
        """Write whole records while the socket takes them. A record the
        kernel refused stays inside the TLS object and is not counted, so
        the caller's retry starts with the same bytes (what OpenSSL needs)."""
        view = memoryview(data)
        sent = 0
        while sent < len(view):
            try:
                sent += self.ssock.send(view[sent:])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                break
        if sent == 0 and len(view):
            raise BlockingIOError(11, "TLS: socket buffer full")
        return sent

    def close(self) -> None:
        self.ssock.close()
