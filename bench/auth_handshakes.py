"""Handshakes/s with access control off and on (HS256, ES256, ...): what
checking a token on every upgrade costs.

The load is bench's connection workload: N clients in rooms of 10, opened
with at most 100 handshakes in flight by bench's own connector (loadgen),
each run against a fresh fastrelay started and stopped by bench's server
harness, with the same CPU pinning as `bench/run.py`. Tokens go in the
query (`?token=`), with rooms `["/idle/*"]`. Two cases per algorithm:

- `a token each`: every client has its own token, so every handshake is a
  full signature check by PyJWT (the worst case: a crowd arriving at once);
- `one token`: all clients share one token: the first handshake checks it,
  the others find it among the tokens already verified (a reconnect, more
  tabs of one user).

Configurations are interleaved and their order rotates each repetition.

    python bench/auth_handshakes.py [--clients 5000] [--reps 5] [--algorithms HS256,ES256]

Prints the median handshakes/s and the server's CPU time per handshake of
each configuration, each relative to tokens off. No timing is asserted;
exit 1 only if a run failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a script: import bench as a package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from bench.loadgen import SMALL_BUF, Member, Room, close_members, connect_members
from bench.meter import Meter
from bench.run import pin, raise_nofile
from bench.servers import ServerProcess, ServerSpec

HOST = "127.0.0.1"
ROOM_SIZE = 10
CONCURRENCY = 100  # as bench's connection workload
SECRET = os.urandom(32).hex()  # 64 bytes: enough for any HS algorithm

PRIVATE_KEYS = {
    "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "EdDSA": lambda: ed25519.Ed25519PrivateKey.generate(),
}


@dataclass
class Setup:
    name: str  # "off", or the algorithm and how tokens are shared
    config: str  # YAML
    tokens: list[str]  # none when off; one shared by all clients; or one per client


def setups(algorithms: list[str], clients: int, workdir: str) -> list[Setup]:
    base = (
        f"server: {{host: {HOST}, port: 0}}\nmetrics: {{enabled: false}}\n"
        "logging: {level: warn}\n"
    )
    out = [Setup("off", base, [])]
    exp = int(time.time()) + 86400
    for algorithm in algorithms:
        key: object
        if algorithm.startswith("HS"):
            auth = f"auth: {{enabled: true, algorithms: [{algorithm}], secret: {SECRET}}}\n"
            key = SECRET
        else:
            private = PRIVATE_KEYS[algorithm]()
            key_file = os.path.join(workdir, f"{algorithm}.pem")
            with open(key_file, "wb") as f:
                f.write(
                    private.public_key().public_bytes(
                        serialization.Encoding.PEM,
                        serialization.PublicFormat.SubjectPublicKeyInfo,
                    )
                )
            auth = (
                f"auth: {{enabled: true, algorithms: [{algorithm}], public_key_file: {key_file}}}\n"
            )
            key = private
        tokens = [
            jwt.encode(
                {"rooms": ["/idle/*"], "publish": True, "exp": exp, "sub": f"client-{i}"},
                key,  # type: ignore[arg-type]
                algorithm=algorithm,
            )
            for i in range(clients)
        ]
        out.append(Setup(f"{algorithm}, a token each", base + auth, tokens))
        out.append(Setup(f"{algorithm}, one token", base + auth, tokens[:1]))
    return out


async def one_run(
    setup: Setup, clients: int, cpu: int | None, workdir: str
) -> tuple[float, float, float]:
    """(handshakes/s, server CPU µs per handshake, the load generator's
    share of its core) for one fresh relay."""
    path = os.path.join(workdir, "relay.yaml")
    with open(path, "w") as f:
        f.write(setup.config)
    spec = ServerSpec(setup.name, "command", f"{sys.executable} -m fastrelay --config-file {path}")
    server = ServerProcess(spec, cpu).start()
    members: list[Member] = []
    try:
        for i in range(clients):
            # The request path is the loadgen room's: one per client, so each
            # can carry its own token; ten clients share each relay room.
            query = f"?token={setup.tokens[i % len(setup.tokens)]}" if setup.tokens else ""
            members.append(
                Member(Room(f"/idle/{i // ROOM_SIZE}{query}", 1 << 40), [1], buf_size=SMALL_BUF)
            )
        meter = Meter(server)
        cpu0, own0 = meter.server_cpu(), time.process_time()
        t0, t1 = await connect_members(HOST, server.port, members, CONCURRENCY, 120.0)
        cpu1, own1 = meter.server_cpu(), time.process_time()
        return clients / (t1 - t0), (cpu1 - cpu0) / clients * 1e6, (own1 - own0) / (t1 - t0)
    finally:
        await close_members(members)
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--algorithms", default="HS256,ES256")
    args = parser.parse_args()
    algorithms = [a for a in args.algorithms.split(",") if a]
    raise_nofile()
    server_cpu, _, pinning = pin()
    print(pinning, flush=True)
    results: dict[str, list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="fastrelay-auth-bench-") as workdir:
        configs = setups(algorithms, args.clients, workdir)
        for rep in range(args.reps):
            shift = rep % len(configs)
            for setup in configs[shift:] + configs[:shift]:
                try:
                    run = asyncio.run(one_run(setup, args.clients, server_cpu, workdir))
                except Exception as e:  # a failed handshake, a relay that did not start
                    print(f"{setup.name}: run failed: {e}", file=sys.stderr)
                    return 1
                results.setdefault(setup.name, []).append(run)
                print(
                    f"rep {rep + 1} {setup.name:>20}: {run[0]:8.0f} handshakes/s, "
                    f"server {run[1]:6.1f} µs CPU per handshake, load generator {run[2]:.0%}",
                    flush=True,
                )

    def median(name: str, column: int) -> float:
        return statistics.median(run[column] for run in results[name])

    base_rate, base_cpu = median("off", 0), median("off", 1)
    print(f"\nmedian of {args.reps} runs, {args.clients} clients each:")
    print(
        "| tokens | handshakes/s | vs off | server CPU per handshake | vs off "
        "| load generator CPU |"
    )
    print("|---|---|---|---|---|---|")
    for setup in configs:
        rate, cpu_us = median(setup.name, 0), median(setup.name, 1)
        print(
            f"| {setup.name} | {rate:.0f} | {rate / base_rate - 1:+.1%} | "
            f"{cpu_us:.1f} µs | {cpu_us / base_cpu - 1:+.1%} | {median(setup.name, 2):.0%} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
