"""fastrelay throughput benchmark: fastrelay vs other Python relays.

    python bench/run.py [--quick] [--servers fastrelay,batched,websockets,picows,aiohttp]
                        [--json out.json] [--server-cmd NAME='cmd with {port}']

Every (workload, repetition, server) run starts a fresh server pinned to one
CPU, drives it from this process pinned to another, verifies every delivery
and stops the server. Servers are interleaved within each repetition.
Exit status: 0 if every run ran and verified, 1 otherwise, 2 on bad usage.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import resource
import shlex
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace

if __package__ in (None, ""):
    # `python bench/run.py`: make the `bench` package importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

import uvloop  # noqa: E402

from bench import report, tls, wire  # noqa: E402
from bench.machine import machine  # noqa: E402
from bench.provenance import CodeState, freeze_fastrelay  # noqa: E402
from bench.records import (  # noqa: E402
    Bulk,
    Latency,
    Measured,
    RunMeta,
    RunResult,
    Throughput,
    Verdict,
)
from bench.servers import (  # noqa: E402
    BUILTIN,
    ROOT,
    ServerError,
    ServerProcess,
    ServerSpec,
    fastrelay_available,
)
from bench.workloads import (  # noqa: E402
    OPT_IN,
    RUNNERS,
    Settings,
    Workload,
    connections_workload,
    default_workloads,
    latency_workload,
)

DEFAULT_SERVERS = ["fastrelay", "batched", "websockets", "picows", "aiohttp"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/run.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke mode: tiny counts, 1 repetition, well under a minute",
    )
    p.add_argument(
        "--servers",
        default=None,
        help="comma-separated, from: %s and --server-cmd names (default: all)"
        % ",".join(DEFAULT_SERVERS),
    )
    p.add_argument(
        "--server-cmd",
        action="append",
        default=[],
        metavar="NAME='CMD {port}'",
        help="extra server as a command template; {port} is replaced by a free "
        "port; it must print 'listening on ws://HOST:PORT/' when ready",
    )
    p.add_argument(
        "--workloads",
        default=None,
        help="comma-separated kinds: fanout,latency,rooms,connections (default: all)",
    )
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3, quick 1)")
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="measured seconds per run (default 3, quick 0.5)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds of load before measuring (default 1, quick 0.2)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="most un-echoed messages per sender, fan-out (default 1024; the "
        "window adapts below it, see WindowControl)",
    )
    p.add_argument(
        "--window-rooms",
        type=int,
        default=None,
        help="same for the many-small-rooms workload (default 256)",
    )
    p.add_argument(
        "--queue-ms",
        type=float,
        default=None,
        help="queued work a sender's window allows beyond its round trip "
        "(default 50 for fan-out, 200 for small rooms)",
    )
    p.add_argument(
        "--lag-limit",
        type=int,
        default=0,
        help="max messages the slowest member of a room may trail by "
        "(default: derived from window and senders)",
    )
    p.add_argument(
        "--rate",
        default=None,
        help="latency workload offered msg/s, comma-separated (default 1000,2000)",
    )
    p.add_argument(
        "--connections",
        default=None,
        help="idle connections workload sizes, comma-separated (default 5000); more than "
        "20,000 connect from 127.0.0.1, .2, ... and need an open-files limit above the count",
    )
    p.add_argument(
        "--handshakes-in-flight",
        type=int,
        default=None,
        help="most handshakes the load generator keeps in flight while connecting (default 100)",
    )
    p.add_argument(
        "--no-spot-check",
        action="store_true",
        help="skip the extra websockets client that cross-checks each run",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin server and load generator")
    p.add_argument(
        "--json",
        default=None,
        help="JSON output (default bench/results/latest.json, quick: quick.json)",
    )
    p.add_argument(
        "--markdown",
        default=None,
        help="write the table with machine, command and date here "
        "(default bench/RESULTS.md for full runs, none for --quick)",
    )
    return p.parse_args(argv)


def build_servers(args: argparse.Namespace, fastrelay_dir: str) -> list[ServerSpec]:
    specs = dict(BUILTIN)
    specs["fastrelay"] = replace(BUILTIN["fastrelay"], cwd=fastrelay_dir)
    custom = []
    for item in args.server_cmd:
        name, sep, cmd = item.partition("=")
        name = name.strip()
        if not sep or not name or not cmd.strip():
            raise SystemExit("--server-cmd wants NAME='command with {port}', got %r" % item)
        shlex.split(cmd)  # fail early on bad quoting
        specs[name] = ServerSpec(name, "command", cmd.strip(), port_zero=False)
        custom.append(name)
    if args.servers:
        names = [n.strip() for n in args.servers.split(",") if n.strip()]
        for n in custom:
            if n not in names:
                names.append(n)
        explicit = True
    else:
        names = DEFAULT_SERVERS + custom
        explicit = False
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise SystemExit(
            "unknown server(s): %s (known: %s)" % (", ".join(unknown), ", ".join(specs))
        )
    if "fastrelay" in names:
        why = fastrelay_available(fastrelay_dir)
        if why is not None:
            if explicit:
                raise SystemExit("fastrelay is not runnable here: %s" % why)
            print("note: skipping fastrelay (%s)" % why, flush=True)
            names.remove("fastrelay")
    return [specs[n] for n in names]


def settings(args: argparse.Namespace) -> tuple[Settings, int]:
    q = args.quick
    s = Settings(
        duration=args.duration if args.duration is not None else (0.5 if q else 3.0),
        warmup=args.warmup if args.warmup is not None else (0.2 if q else 1.0),
        window=args.window or 1024,
        window_rooms=args.window_rooms or 256,
        lag_limit=args.lag_limit,
        spot_check=not args.no_spot_check,
        drain_timeout=10.0 if q else 30.0,
    )
    if args.handshakes_in_flight:
        s.concurrency = args.handshakes_in_flight
    if args.queue_ms is not None:
        s.queue_fanout = s.queue_rooms = args.queue_ms / 1000.0
    reps = args.reps if args.reps is not None else (1 if q else 3)
    return s, reps


def pick_workloads(args: argparse.Namespace) -> list[Workload]:
    ws = default_workloads(args.quick)
    if args.rate:
        try:
            rates = [int(r) for r in args.rate.split(",") if r.strip()]
        except ValueError:
            raise SystemExit("--rate wants msg/s, comma-separated, got %r" % args.rate) from None
        lat = [w for w in ws if w.kind == "latency"]
        if lat:
            at = ws.index(lat[0])
            members = lat[0].params["members"]
            ws = [w for w in ws if w.kind != "latency"]
            ws[at:at] = [latency_workload(members, r) for r in rates]
    if args.connections:
        try:
            sizes = [int(n) for n in args.connections.split(",") if n.strip()]
        except ValueError:
            raise SystemExit(
                "--connections wants client counts, comma-separated, got %r" % args.connections
            ) from None
        conn = [w for w in ws if w.kind == "connections"]
        if conn:
            at = ws.index(conn[0])
            ws = [w for w in ws if w.kind != "connections"]
            ws[at:at] = [connections_workload(n, conn[0].params["room_size"]) for n in sizes]
    if args.workloads:
        kinds = {k.strip() for k in args.workloads.split(",") if k.strip()}
        bad = kinds - set(RUNNERS)
        if bad:
            raise SystemExit(
                "unknown workload(s): %s (known: %s)" % (", ".join(sorted(bad)), ", ".join(RUNNERS))
            )
        ws = [w for w in ws if w.kind in kinds]
    elif not args.quick:
        ws = [w for w in ws if w.kind not in OPT_IN]
    return ws


def pin() -> tuple[int | None, int | None, str]:
    if not hasattr(os, "sched_setaffinity"):
        return None, None, "no pinning (os.sched_setaffinity unavailable)"
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None, "no pinning (only CPU %s available)" % cpus
    server_cpu, client_cpu = cpus[0], cpus[1]
    os.sched_setaffinity(0, {client_cpu})
    return (
        server_cpu,
        client_cpu,
        "server pinned to CPU %d, load generator to CPU %d" % (server_cpu, client_cpu),
    )


def raise_nofile(want: int = 0) -> int:
    """Raise the open-files limit to the hard limit, or to `want` when that is
    higher and the process may (root, or CAP_SYS_RESOURCE; up to
    fs.nr_open). The servers inherit the new hard limit. Returns the soft
    limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if want > hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            pass  # not allowed: the hard limit is what we get; run_all says so
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def files_needed(workloads: list[Workload]) -> int:
    """Descriptors the load generator needs: one per client of the largest
    workload, plus room for epoll sets, pipes and the spot check."""
    clients = [w.params.get("clients", w.params.get("members", 0)) for w in workloads]
    return max(clients, default=0) + 1024


def progress_cell(r: RunResult) -> str:
    f, u = r.figures, r.usage
    if f is None or u is None:
        return "FAILED"
    if isinstance(f, Throughput):
        main = "%s deliveries/s, server %s/delivery, %s deliveries/write()" % (
            report.si(f.per_s),
            report.ns(r.server_ns_per_delivery()),
            "%.1f" % (f.deliveries / f.server_writes) if f.server_writes else "-",
        )
    elif isinstance(f, Bulk):
        main = "%sB/s (%s deliveries/s), server %s/delivery, RSS %s/%s/%s MiB" % (
            report.si(f.bytes_per_s),
            report.si(f.per_s),
            report.ns(r.server_ns_per_delivery()),
            *(
                "-" if x is None else "%.0f" % (x / (1 << 20))
                for x in (f.rss_before, f.rss_peak, f.rss_after)
            ),
        )
    elif isinstance(f, Latency):
        main = "p50 %s p99 %s max %s ms" % (
            report.ms(f.p50_ms),
            report.ms(f.p99_ms),
            report.ms(f.max_ms),
        )
    else:
        main = "%s handshakes/s %s/conn, server %s/handshake" % (
            report.si(f.per_s),
            report.kib(f.rss_per_conn),
            report.ns(r.server_ns_per_delivery()),
        )
    return "%s  client %s server %s (waiting for CPU %s)%s" % (
        main,
        report.pct(u.client),
        report.pct(u.server),
        report.pct(u.server_runq),
        "  (other processes %s!)" % report.pct(u.other) if u.other > report.QUIET else "",
    )


async def one_run(
    spec: ServerSpec, w: Workload, s: Settings, server_cpu: int | None, log: Callable[[str], None]
) -> Measured:
    if w.tls:
        certs = tls.certs()
        spec = replace(spec, tls=(certs.cert_file, certs.key_file))
    server = ServerProcess(spec, server_cpu)
    try:
        server.start()
        budget = s.warmup + s.duration + 2 * s.drain_timeout + s.connect_timeout + 60
        # The cyclic GC would pause the load generator at random points of
        # the measurement; runs are short, so collect between runs instead.
        gc.disable()
        return await asyncio.wait_for(RUNNERS[w.kind](server, w, s, log), budget)
    finally:
        gc.enable()
        rc = server.stop()
        if rc not in (0, None, -15):
            log(
                "    note: %s exited with code %s; stderr: %s"
                % (spec.name, rc, " | ".join(server.last_stderr[-3:]))
            )


async def run_or_fail(
    spec: ServerSpec, w: Workload, rep: int, s: Settings, server_cpu: int | None, log
) -> RunResult:
    """One run; a failure to start, a timeout or a crash is a failed verdict."""
    try:
        m = await one_run(spec, w, s, server_cpu, log)
    except Exception as exc:  # noqa: BLE001 - any failure is a finding of this run
        kind = "timeout" if isinstance(exc, asyncio.TimeoutError) else type(exc).__name__
        expected = isinstance(exc, (ServerError, asyncio.TimeoutError))
        return RunResult(
            w.key,
            spec.name,
            rep,
            Verdict.failed("%s: %s" % (kind, exc)),
            traceback=None if expected else traceback.format_exc(),
        )
    return RunResult(w.key, spec.name, rep, m.verdict, m.usage, m.figures)


async def main_async(args: argparse.Namespace) -> int:
    # SIGTERM (e.g. a CI timeout) cancels the run like Ctrl-C does, so every
    # run's `finally` stops its server before the harness exits.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    with tempfile.TemporaryDirectory(prefix="fastrelay-bench-code-") as fastrelay_dir:
        code = freeze_fastrelay(fastrelay_dir)
        return await run_all(args, build_servers(args, fastrelay_dir), code)


async def run_all(args: argparse.Namespace, specs: list[ServerSpec], code: CodeState) -> int:
    if not specs:
        print("no server to benchmark", file=sys.stderr)
        return 2
    s, reps = settings(args)
    workloads = pick_workloads(args)
    server_cpu, client_cpu, pin_note = (
        (None, None, "no pinning (--no-pin)") if args.no_pin else pin()
    )
    command = "python bench/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    meta = RunMeta(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=command.strip(),
        quick=args.quick,
        servers=[sp.name for sp in specs],
        reps=reps,
        pinning=pin_note,
        nofile=raise_nofile(files_needed(workloads)),
        numpy=wire.HAVE_NUMPY,
        settings=s,
        machine=machine(),
        workloads=workloads,
        code=code,
    )

    def log(msg: str) -> None:
        print(msg, flush=True)

    log("fastrelay bench: %s" % meta.command)
    log("machine: %s" % meta.machine.describe())
    log(code.describe())
    log(
        "%s; RLIMIT_NOFILE %d; servers: %s; %d repetition(s); %.1fs warmup + %.1fs measured"
        % (pin_note, meta.nofile, ", ".join(meta.servers), reps, s.warmup, s.duration)
    )
    if meta.nofile < files_needed(workloads):
        log(
            "warning: RLIMIT_NOFILE %d is below the %d descriptors the largest workload needs "
            "(the hard limit cannot be raised without root or CAP_SYS_RESOURCE): expect "
            "'Too many open files'" % (meta.nofile, files_needed(workloads))
        )
    if not wire.HAVE_NUMPY:
        log(
            "warning: numpy not installed; verification runs per frame in Python "
            "and the load generator will saturate early"
        )

    runs: list[RunResult] = []
    total = len(workloads) * reps * len(specs)
    t_start = time.perf_counter()
    for w in workloads:
        for rep in range(reps):
            # Rotate the server order each repetition: no server always runs
            # first (cold caches) or right after the same neighbour.
            order = specs[rep % len(specs) :] + specs[: rep % len(specs)]
            for spec in order:
                gc.collect()
                head = "[%*d/%d] %-26s rep %d/%d  %-10s" % (
                    len(str(total)),
                    len(runs) + 1,
                    total,
                    w.label,
                    rep + 1,
                    reps,
                    spec.name,
                )
                r = await run_or_fail(spec, w, rep, s, server_cpu, log)
                runs.append(r)
                verdict = "ok" if r.verdict.ok else "FAIL: " + "; ".join(r.verdict.errors)[:300]
                log("%s %s  %s" % (head, progress_cell(r), verdict))

    summary = report.summarise(runs, workloads, meta.servers)
    meta.elapsed_s = round(time.perf_counter() - t_start, 1)
    log("")
    log(report.table(summary))
    log("")
    bound = report.client_bound(summary)
    if bound:
        log(
            "caveat: load generator CPU > %s in: %s (figures there are a lower bound)"
            % (report.pct(report.CLIENT_BOUND), report.names(bound))
        )
    noisy = report.noisy(summary)
    if noisy:
        log(
            "caveat: the machine was not quiet: other processes used up to %s of a CPU in %d of "
            "%d rows (see 'other CPU'); rerun on an idle machine for figures to quote"
            % (
                report.pct(max(r.other_cpu.max for r in noisy if r.other_cpu)),
                len(noisy),
                len(summary),
            )
        )

    out = args.json or os.path.join(
        ROOT, "bench", "results", "quick.json" if args.quick else "latest.json"
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        record = dict(meta=asdict(meta), summary=[asdict(r) for r in summary])
        record["runs"] = [asdict(r) for r in runs]
        json.dump(record, f, indent=1)
    log("wrote %s" % os.path.relpath(out))
    md = args.markdown or (None if args.quick else os.path.join(ROOT, "bench", "RESULTS.md"))
    if md:
        with open(md, "w") as f:
            f.write(report.markdown(meta, summary, runs))
        log("wrote %s" % os.path.relpath(md))
    failed = [r for r in runs if not r.verdict.ok]
    if failed:
        log(
            "%d of %d runs did not verify (loss, errors or failures): exit 1"
            % (len(failed), len(runs))
        )
        return 1
    log("all %d runs verified: every message delivered intact and in order per sender" % len(runs))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return uvloop.run(main_async(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except asyncio.CancelledError:
        print("terminated", file=sys.stderr)
        return 143
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
