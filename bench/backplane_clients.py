"""Which Redis client library for the backplane: measured on its workload.

The backplane publishes a loop turn's messages as one pipeline (PUBLISH x
batch, one write) and reads pub/sub messages one by one into the hub. This
script does exactly that with each candidate against a private
redis-server on 127.0.0.1 (a free port, stopped by PID at the end):

- publisher (this process): N messages of SIZE bytes in pipelines of BATCH,
  one pipeline in flight at a time, as the backplane's writer does;
- subscriber (a child process, its own core when there are two): reads
  the N messages.

Reported per candidate: publisher and subscriber CPU per message (us),
end-to-end messages/s (first publish to last receipt). CPU figures are what
the relay would spend; redis-server's own CPU is the same for every client.

    python bench/backplane_clients.py [--messages 100000] [--batch 64] [--size 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop

CHANNEL = b"bench:room"

# name -> (publisher, subscriber); each returns when its N messages are done.
Publisher = Callable[[int, int, list[bytes]], Awaitable[None]]
Subscriber = Callable[[int, int, Callable[[], None]], Awaitable[None]]


async def redispy_publish(port: int, batch: int, messages: list[bytes]) -> None:
    import redis.asyncio as redis

    client = redis.Redis(port=port)
    for start in range(0, len(messages), batch):
        pipe = client.pipeline(transaction=False)
        for message in messages[start : start + batch]:
            pipe.publish(CHANNEL, message)
        await pipe.execute()
    await client.aclose()


async def _redispy_subscribe(port: int, count: int, ready: Callable[[], None], raw: bool) -> None:
    import redis.asyncio as redis

    client = redis.Redis(port=port)
    pubsub = client.pubsub()
    await pubsub.subscribe(CHANNEL)
    await pubsub.get_message(timeout=None)  # the subscribe confirmation
    ready()
    got = 0
    while got < count:
        if raw:
            # The reply as parsed: [b"message", channel, data], no dict.
            reply = await pubsub.parse_response(block=True)
            got += reply[0] == b"message"
        else:
            message = await pubsub.get_message(timeout=None)
            got += message is not None and message["type"] == "message"
    await client.aclose()


async def redispy_subscribe(port: int, count: int, ready: Callable[[], None]) -> None:
    await _redispy_subscribe(port, count, ready, raw=False)


async def redispy_subscribe_raw(port: int, count: int, ready: Callable[[], None]) -> None:
    await _redispy_subscribe(port, count, ready, raw=True)


async def coredis_publish(port: int, batch: int, messages: list[bytes]) -> None:
    import coredis

    async with coredis.Redis(port=port) as client:
        for start in range(0, len(messages), batch):
            async with client.pipeline(transaction=False) as pipe:
                for message in messages[start : start + batch]:
                    pipe.publish(CHANNEL, message)


async def coredis_subscribe(port: int, count: int, ready: Callable[[], None]) -> None:
    import coredis

    async with coredis.Redis(port=port) as client:
        async with client.pubsub(channels=[CHANNEL], ignore_subscribe_messages=True) as pubsub:
            ready()
            got = 0
            async for message in pubsub:
                got += message["type"] == "message"
                if got >= count:
                    break


CANDIDATES: dict[str, tuple[Publisher, Subscriber]] = {
    "redis-py+hiredis": (redispy_publish, redispy_subscribe),
    "redis-py+hiredis raw": (redispy_publish, redispy_subscribe_raw),
    "redis-py (pure python parser)": (redispy_publish, redispy_subscribe),
    "coredis": (coredis_publish, coredis_subscribe),
}


def _pure_python_parser() -> None:
    # redis-py picks hiredis when importable; hide it to measure its own parser.
    sys.modules["hiredis"] = None  # type: ignore[assignment]


def subscriber_main(name: str, port: int, count: int) -> None:
    """Child: subscribe, say READY, read `count` messages, print CPU used."""
    if "pure python" in name:
        _pure_python_parser()
    subscribe = CANDIDATES[name][1]
    cpu0 = time.process_time()

    def ready() -> None:
        print("READY", flush=True)

    uvloop.run(subscribe(port, count, ready))
    print(json.dumps({"cpu": time.process_time() - cpu0, "end": time.time()}), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found (bash .ci/install-redis.sh)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        + ["--dir", str(workdir), "--client-output-buffer-limit", "pubsub 0 0 0"],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 10
    for line in proc.stdout:  # bounded by redis-server's own startup
        if b"Ready to accept connections" in line:
            return proc, port
        if time.monotonic() > deadline:
            break
    proc.kill()
    sys.exit("redis-server did not start")


def measure(name: str, port: int, count: int, batch: int, size: int) -> dict[str, float]:
    child = subprocess.Popen(
        [sys.executable, __file__, "--subscriber", name, "--port", str(port)]
        + ["--messages", str(count)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    if child.stdout.readline().strip() != "READY":
        child.kill()
        raise RuntimeError(f"{name}: subscriber did not start")
    if "pure python" in name:
        _pure_python_parser()
    messages = [i.to_bytes(8, "big") + b"x" * (size - 8) for i in range(count)]
    publish = CANDIDATES[name][0]
    cpu0 = time.process_time()
    start = time.time()
    uvloop.run(publish(port, batch, messages))
    publisher_cpu = time.process_time() - cpu0
    result = json.loads(child.stdout.readline())
    child.wait(60)
    return {
        "publisher_us_per_msg": publisher_cpu / count * 1e6,
        "subscriber_us_per_msg": result["cpu"] / count * 1e6,
        "msgs_per_s": count / (result["end"] - start),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--subscriber", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.subscriber:
        subscriber_main(args.subscriber, args.port, args.messages)
        return
    workdir = Path(os.environ.get("TMPDIR", "/tmp"))
    redis_proc, port = start_redis(workdir)
    try:
        print(f"{args.messages} messages of {args.size} B, pipelines of {args.batch}")
        print(f"{'candidate':32} {'pub us/msg':>10} {'sub us/msg':>10} {'msgs/s':>10}")
        for rep in range(args.reps):
            for name in args.candidates.split(","):
                # Each candidate in a fresh interpreter, so one's imports
                # (and the hidden hiredis) do not leak into the next.
                out = subprocess.run(
                    [sys.executable, "-c", _ONE_RUN, name, str(port)]
                    + [str(args.messages), str(args.batch), str(args.size)],
                    capture_output=True,
                    text=True,
                    timeout=300,
                    cwd=os.path.dirname(os.path.abspath(__file__)),
                )
                if out.returncode != 0:
                    print(f"{name}: failed\n{out.stderr}")
                    continue
                r = json.loads(out.stdout)
                print(
                    f"{name:32} {r['publisher_us_per_msg']:10.2f} "
                    f"{r['subscriber_us_per_msg']:10.2f} {r['msgs_per_s']:10.0f}"
                    f"   (rep {rep + 1})",
                    flush=True,
                )
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)


_ONE_RUN = """
import json, sys
import backplane_clients as b
name, port, count, batch, size = sys.argv[1], *map(int, sys.argv[2:])
print(json.dumps(b.measure(name, port, count, batch, size)))
"""

if __name__ == "__main__":
    main()
