"""Coverage-guided fuzzing of fastrelay's parsers with atheris, for long
runs outside CI (the test suite runs the hypothesis fuzzers; CI runs this
harness for a minute against the sanitizer build).

Against the AddressSanitizer + UBSan build of the compiled modules, which
is what finds memory errors in them:

    bash .ci/sanitizers.sh fuzz -max_total_time=3600       # any libFuzzer arguments

That builds the modules with FASTRELAY_SANITIZE=fuzz in a temp copy of the
tree, preloads atheris' own runtime (clang's ASan + UBSan with libFuzzer,
asan_with_fuzzer.so) and runs this file with -use_value_profile=1, so the
compiled code's comparisons guide the search as well as the Python lines;
crashes are written to artifacts/fuzz/. Replay one with
`bash .ci/sanitizers.sh fuzz artifacts/fuzz/crash-<hash>`. Without the
script (no sanitizer, Python coverage only):

    pip install atheris
    python fuzz/fuzz_relay.py -atheris_runs=2000000        # or -max_total_time=3600

Each input is split in two by its first byte: a handshake request and a
stream of client frames. The request goes through `handshake.parse_request`
fed in pieces; the frames go through a real `Connection` (the Cython parser,
message rules and fan-out) on a real event loop, with a transport that
records what the relay writes. Any exception, or output that is not valid
server frames ending in a valid close, is a crash.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import atheris

# The same output check as the test suite's fuzzers.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from wsraw import check_server_output  # noqa: E402

with atheris.instrument_imports():
    from fastrelay import handshake
    from fastrelay._frames import Connection, Hub
    from fastrelay.upgrade import Gate, GateSettings

LIMITS = handshake.Limits(max_head=1024, max_headers=16)
REQUEST = (
    b"GET /fuzz HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class RecordingTransport:
    """Just enough of a plain TCP transport: the relay writes through it (no
    socket, so never the direct path), may pause and resume reading, may
    half-close it (write_eof) and close or abort it."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.eof_written = False
        self.closed = False

    def get_extra_info(self, name, default=None):
        return default

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def write(self, data: bytes) -> None:
        assert not (self.closed or self.eof_written), "write after the end"
        self.out += data

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def check_output(out: bytes) -> None:
    assert out.startswith(b"HTTP/1.1 101 ")
    check_server_output(out[out.index(b"\r\n\r\n") + 4 :])


loop = asyncio.new_event_loop()
gate = Gate(
    GateSettings(limits=LIMITS, max_connections=0, demo_page=None), logging.getLogger("fuzz")
)
hub = Hub(loop, gate, max_message_size=4096)


def feed(conn: Connection, data: bytes, step: int) -> None:
    for start in range(0, len(data), step):
        piece = data[start : start + step]
        view = conn.get_buffer(-1)
        view[: len(piece)] = piece
        conn.buffer_updated(len(piece))


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    step = fdp.ConsumeIntInRange(1, 64)
    request = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 256))
    frames = fdp.ConsumeBytes(fdp.remaining_bytes())

    scan_from, got = 0, b""
    for start in range(0, len(request), step):
        got += request[start : start + step]
        result = handshake.parse_request(memoryview(got), scan_from, LIMITS)
        if not isinstance(result, handshake.Incomplete):
            break
        scan_from = result.scan_from

    conn = Connection(hub)
    transport = RecordingTransport()
    conn.connection_made(transport)
    feed(conn, REQUEST + frames, step)
    loop.run_until_complete(asyncio.sleep(0))  # let the hub flush
    conn.connection_lost(None)
    check_output(bytes(transport.out))


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
