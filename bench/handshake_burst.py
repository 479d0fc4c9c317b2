"""Handshake bursts from one or more load-generator processes: is the load
generator what limits bench's connections workload?

    python bench/handshake_burst.py --clients 19000 --procs 1,2 --in-flight 100,500 \\
        --reps 3 [--server-cmd NAME='cmd'] [--servers fastrelay,NAME]

For each (procs, in-flight) setting and repetition, every server is started
fresh (interleaved, order rotating), pinned to the first CPU; P child
processes each open clients/P connections (rooms of 10) with the given
handshakes in flight, started together, unpinned so they may use any CPU
the server leaves. Reported: handshakes/s over the whole burst (first
start to last finish, CLOCK_MONOTONIC is system-wide), the server's CPU per
handshake and its run-queue wait, and each load generator's CPU. The
connections are verified as the connections workload does (101 and
Sec-WebSocket-Accept); no message is sent. No timing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

import uvloop  # noqa: E402

from bench.loadgen import Connector, Member, Room, source_addresses  # noqa: E402
from bench.meter import Meter, runq_wait  # noqa: E402
from bench.run import build_servers, pin, raise_nofile  # noqa: E402
from bench.servers import ServerProcess  # noqa: E402


async def child(
    port: int, clients: int, first_room: int, in_flight: int, start_at: float
) -> tuple[dict, list[Member]]:
    rooms = [Room("/burst-%d" % (first_room + r), 1 << 40) for r in range((clients + 9) // 10)]
    members = [Member(rooms[i // 10], [1], buf_size=1024) for i in range(clients)]
    conn = Connector("127.0.0.1", port, in_flight, source_addresses(clients))
    delay = start_at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)  # all children start together
    cpu0, q0 = time.process_time(), runq_wait("self")
    t0, t1 = await asyncio.wait_for(conn.run(members), 120)
    out = dict(
        t0=time.monotonic() - (time.perf_counter() - t0),
        t1=time.monotonic() - (time.perf_counter() - t1),
        cpu=time.process_time() - cpu0,
        runq=runq_wait("self") - q0,
    )
    conn.close()
    return out, members


def run_child(argv: list[str]) -> None:
    port, clients, first_room, in_flight, start_at = argv
    raise_nofile(int(clients) + 256)
    res, members = uvloop.run(
        child(int(port), int(clients), int(first_room), int(in_flight), float(start_at))
    )
    print(json.dumps(res), flush=True)
    # Hold the connections until the parent has read the server's CPU: their
    # closing would otherwise be counted as handshake work.
    sys.stdin.readline()
    for m in members:
        if m.sock is not None:
            m.sock.close()


def burst(server: ServerProcess, clients: int, procs: int, in_flight: int) -> dict:
    meter = Meter(server)
    start_at = time.monotonic() + 1.0  # time for the children to import and build
    per = clients // procs
    kids = [
        subprocess.Popen(
            [sys.executable, __file__, "--child", str(server.port), str(per), str(i * per),
             str(max(1, in_flight // procs)), repr(start_at)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(procs)
    ]  # fmt: skip
    time.sleep(max(0.0, start_at - time.monotonic() - 0.05))
    cpu0, q0 = meter.server_cpu(), meter.server_runq()
    results = []
    try:
        for k in kids:
            line = k.stdout.readline()  # bounded: each child's connect times out at 120 s
            if not line:
                raise RuntimeError("load generator exited with %s" % k.wait(10))
            results.append(json.loads(line))
        cpu1, q1 = meter.server_cpu(), meter.server_runq()
    finally:
        for k in kids:
            try:
                k.communicate("close\n", timeout=60)
            except subprocess.TimeoutExpired:
                k.kill()
                k.wait(10)
    t0, t1 = min(r["t0"] for r in results), max(r["t1"] for r in results)
    wall = t1 - t0
    return dict(
        per_s=per * procs / wall,
        server_us=(cpu1 - cpu0) / (per * procs) * 1e6,
        # The server's CPU and wait over the burst (the children's start-up
        # second is idle for it and left out by dividing by the burst only).
        server_cpu=(cpu1 - cpu0) / wall,
        server_runq=(q1 - q0) / wall,
        client_cpu=[r["cpu"] / (r["t1"] - r["t0"]) for r in results],
        client_runq=[r["runq"] / (r["t1"] - r["t0"]) for r in results],
    )


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        run_child(sys.argv[2:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=19000)
    p.add_argument("--procs", default="1,2")
    p.add_argument("--in-flight", default="100,500")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--servers", default="fastrelay")
    p.add_argument("--server-cmd", action="append", default=[])
    args = p.parse_args()
    raise_nofile(args.clients + 1024)
    with __import__("tempfile").TemporaryDirectory() as tmp:
        from bench.provenance import freeze_fastrelay

        freeze_fastrelay(tmp)
        specs = build_servers(
            argparse.Namespace(servers=args.servers, server_cmd=args.server_cmd), tmp
        )
        server_cpu, _, note = pin()
        os.sched_setaffinity(0, os.sched_getaffinity(0) | {server_cpu})  # children unpinned
        print("%s; load generators unpinned" % note.split(",")[0], flush=True)
        rows: dict = {}
        for procs in [int(x) for x in args.procs.split(",")]:
            for fl in [int(x) for x in args.in_flight.split(",")]:
                for rep in range(args.reps):
                    for spec in specs[rep % len(specs) :] + specs[: rep % len(specs)]:
                        server = ServerProcess(spec, server_cpu).start()
                        try:
                            r = burst(server, args.clients, procs, fl)
                        finally:
                            server.stop()
                        rows.setdefault((procs, fl, spec.name), []).append(r)
                        print(
                            "procs %d in-flight %d rep %d %-10s %7.0f handshakes/s  "
                            "server %.1f µs/hs CPU %.0f%% waiting %.0f%%  clients CPU %s"
                            % (procs, fl, rep + 1, spec.name, r["per_s"], r["server_us"],
                               100 * r["server_cpu"], 100 * r["server_runq"],
                               "+".join("%.0f%%" % (100 * c) for c in r["client_cpu"])),
                            flush=True,
                        )  # fmt: skip
    print(
        "\n| load generators | in flight | server | handshakes/s (median) | server CPU per "
        "handshake | server CPU | server waiting for CPU | load generator CPU (each) |"
    )
    print("|---|---|---|---|---|---|---|---|")  # fmt: skip
    for (procs, fl, name), rs in rows.items():

        def med(key, rs=rs):
            return statistics.median(r[key] for r in rs)

        cl = [statistics.median(r["client_cpu"][i] for r in rs) for i in range(procs)]
        print(
            "| %d | %d | %s | %.1f k | %.1f µs | %.0f%% | %.0f%% | %s |"
            % (procs, fl, name, med("per_s") / 1e3, med("server_us"), 100 * med("server_cpu"),
               100 * med("server_runq"), " + ".join("%.0f%%" % (100 * c) for c in cl))
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
