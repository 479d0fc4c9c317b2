"""The benchmark, seconds-long: it runs end to end against fastrelay, the
batched control peer and a library peer, and every delivery verifies. No
timing is asserted (figures live in bench/RESULTS.md with the command that
made them)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

REPO = Path(__file__).resolve().parent.parent
SERVERS = ("fastrelay", "batched", "websockets")


@pytest.mark.checkout  # bench/ is not part of the installed package
@pytest.mark.timeout(300)
def test_quick_benchmark_runs_and_verifies(tmp_path):
    out = tmp_path / "quick.json"
    done = subprocess.run(
        [
            sys.executable,
            "bench/run.py",
            "--quick",
            "--servers",
            ",".join(SERVERS),
            "--json",
            str(out),
            "--markdown",
            str(tmp_path / "quick.md"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(out.read_text())
    runs = record["runs"]
    assert {run["server"] for run in runs} == set(SERVERS)
    for run in runs:
        verdict = run["verdict"]
        assert verdict["ok"] and verdict["loss"] == 0 and not verdict["errors"], run
        assert verdict["deliveries_verified"] == verdict["deliveries_expected"] > 0, run
    # Every throughput row reports the server's CPU per delivery.
    throughput = [row for row in record["summary"] if row["kind"] in ("fanout", "rooms")]
    assert len(throughput) == 3 * len(SERVERS)
    assert all(row["server_ns_per_delivery"]["median"] > 0 for row in throughput)


async def _start_batched_relay() -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(REPO / "bench" / "peers" / "batched_relay.py"),
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    found = re.search(rb"listening on ws://127\.0\.0\.1:(\d+)/", line)
    assert found, line
    return proc, int(found.group(1))


async def _batched_relay_semantics() -> None:
    proc, port = await _start_batched_relay()
    try:
        url = "ws://127.0.0.1:%d/room-a?client=%%d" % port
        async with (
            connect(url % 1, compression=None) as alice,
            connect(url % 2, compression=None) as bob,
            connect("ws://127.0.0.1:%d/room-b" % port, compression=None) as carol,
        ):
            await alice.send("hello")
            await bob.send(b"\x00\xffbinary")
            # A fragmented message: the relay must send it on whole.
            await alice.send(["frag", "mented ", "text"])
            await carol.send("only room b")
            for member in (alice, bob):
                got = [await asyncio.wait_for(member.recv(), 10) for _ in range(3)]
                # Per-sender order holds; alice's two messages and bob's
                # one may interleave either way between senders.
                assert [m for m in got if isinstance(m, str)] == ["hello", "fragmented text"]
                assert [m for m in got if isinstance(m, bytes)] == [b"\x00\xffbinary"]
            assert await asyncio.wait_for(carol.recv(), 10) == "only room b"
            # The query string is not part of the room: a client joining
            # room-a with another query gets what is sent to room-a.
            async with connect("ws://127.0.0.1:%d/room-a" % port, compression=None) as dave:
                await dave.send("to room a")
                for member in (alice, bob, dave):
                    assert await asyncio.wait_for(member.recv(), 10) == "to room a"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0


@pytest.mark.checkout
@pytest.mark.timeout(60)
def test_batched_control_peer_relays_whole_messages_per_room():
    """The control peer has the relay's semantics (echo to the sender, the
    room is the path without the query, fragments reassembled, opcode kept),
    which the load generator alone does not exercise (it never fragments)."""
    asyncio.run(_batched_relay_semantics())
