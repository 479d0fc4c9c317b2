"""What the sendmsg fallbacks of fastrelay/_compat.h rely on, checked on a
real relay process: where MSG_NOSIGNAL is missing the relay sends with flag
0, which is safe only because the process ignores SIGPIPE (CPython sets
SIG_IGN at startup). .ci/portability.sh runs this, with the relay round
trips of test_relay_e2e.py and the sendmsg paths of test_memory_safety.py
(partial writes, EPIPE on a vanished peer), against a build that takes the
fallbacks."""

from __future__ import annotations

import signal

from wsraw import RawClient, frame


def test_the_relay_ignores_sigpipe(relay):
    """SIGPIPE's default action would end the process; the fixture's stop
    then also checks that the relay exits 0 on SIGTERM."""
    a = RawClient(relay.port, "/pipe")
    try:
        relay.send_signal(signal.SIGPIPE)
        a.send(frame(0x1, b"still here"))
        assert a.recv_frame() == (True, 0x1, b"still here")
    finally:
        a.close()
    assert relay.running
