"""Summaries over repetitions, the results table and RESULTS.md."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .records import RunMeta, RunResult, Stats, SummaryRow
from .workloads import Workload

CLIENT_BOUND = 0.9  # load generator CPU above which a figure is a lower bound
QUIET = 0.05  # other processes' CPU above which a machine is not quiet


def _missing(x: float | None) -> bool:
    return x is None or math.isnan(x)


def si(x: float | None, unit: str = "") -> str:
    if x is None or _missing(x):
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return "%.2f %s%s" % (x / div, suffix, unit)
    return "%.0f %s" % (x, unit) if unit else "%.0f" % x


def pct(x: float | None) -> str:
    if x is None or _missing(x):
        return "-"
    return "%.0f%%" % (100 * x)


def ms(x: float | None) -> str:
    if x is None or _missing(x):
        return "-"
    return "%.2f" % x if x < 10 else "%.1f" % x


def ns(x: float | None) -> str:
    """A CPU time per delivery: 18 ns, 950 ns, 3.0 µs, 12 µs."""
    if x is None or _missing(x):
        return "-"
    if x < 1000:
        return "%.0f ns" % x
    return "%.1f µs" % (x / 1000) if x < 10_000 else "%.0f µs" % (x / 1000)


def times(r: float) -> str:
    """A ratio to fastrelay with two significant digits: 0.0031x, 0.52x, 380x."""
    if r >= 100:
        return "%.0fx" % r
    return "%sx" % ("%.2g" % r if r < 1 else "%.3g" % r)


def kib(x: float | None) -> str:
    if x is None:
        return "-"
    return "%.1f KiB" % (x / 1024)


def _row(w: Workload, server: str, rs: list[RunResult]) -> SummaryRow:
    measured = [r for r in rs if r.usage is not None]

    def stats(get) -> Stats | None:
        return Stats.of([get(r) for r in measured])

    return SummaryRow(
        workload=w.key,
        kind=w.kind,
        label=w.label,
        server=server,
        reps=len(rs),
        ok=all(r.verdict.ok for r in rs),
        loss=sum(r.verdict.loss for r in rs),
        errors=[e for r in rs for e in r.verdict.errors][:5],
        figure=stats(RunResult.figure),
        server_ns_per_delivery=stats(RunResult.server_ns_per_delivery),
        client_cpu=stats(lambda r: r.usage.client),
        server_cpu=stats(lambda r: r.usage.server),
        other_cpu=stats(lambda r: r.usage.other),
        server_runq=stats(lambda r: r.usage.server_runq),
        p50_ms=stats(lambda r: getattr(r.figures, "p50_ms", None)),
        max_ms=stats(lambda r: getattr(r.figures, "max_ms", None)),
        rss_per_conn=stats(lambda r: getattr(r.figures, "rss_per_conn", None)),
        rss_mib=(
            None
            if w.kind != "large"
            else tuple(
                stats(lambda r, a=attr: _mib(getattr(r.figures, a, None)))
                for attr in ("rss_before", "rss_peak", "rss_after")
            )
        ),
    )


def _mib(x: int | None) -> float | None:
    return None if x is None else x / (1 << 20)


def summarise(
    runs: list[RunResult], workloads: list[Workload], servers: list[str]
) -> list[SummaryRow]:
    out = []
    for w in workloads:
        for name in servers:
            rs = [r for r in runs if r.workload == w.key and r.server == name]
            if rs:
                out.append(_row(w, name, rs))
    base = {r.workload: r for r in out if r.server == "fastrelay" and r.figure is not None}
    for row in out:
        ref = base.get(row.workload)
        if ref is None or ref.figure is None or row.figure is None or ref.figure.median == 0:
            continue
        row.vs_fastrelay = row.figure.median / ref.figure.median
        if row.rss_per_conn is not None and ref.rss_per_conn is not None:
            if ref.rss_per_conn.median:
                row.rss_vs_fastrelay = row.rss_per_conn.median / ref.rss_per_conn.median
    return out


def _result_cells(row: SummaryRow) -> tuple[str, str, str]:
    """(result, min-max, vs fastrelay) for one summary row."""
    v = row.figure
    if v is None:
        return "failed", "-", "-"
    ratio = row.vs_fastrelay
    if row.kind == "large":
        mem = "/".join("%.0f" % s.median if s else "-" for s in row.rss_mib or ())
        return (
            "%sB/s, RSS %s MiB" % (si(v.median, ""), mem),
            "%s – %s" % (si(v.min), si(v.max)),
            "-" if ratio is None else times(ratio),
        )
    if row.kind in ("fanout", "rooms", "wss"):
        return (
            si(v.median, "/s"),
            "%s – %s" % (si(v.min), si(v.max)),
            "-" if ratio is None else times(ratio),
        )
    if row.kind == "latency":
        res = "p50 %s / p99 %s / max %s ms" % (
            ms(_median(row.p50_ms)),
            ms(v.median),
            ms(_median(row.max_ms)),
        )
        # For latency the ratio is of p99: below 1 means lower (better).
        return (
            res,
            "p99 %s – %s" % (ms(v.min), ms(v.max)),
            "-" if ratio is None else "p99 " + times(ratio),
        )
    rss = row.rss_per_conn
    res = "%s handshakes/s, %s/conn" % (si(v.median), kib(_median(rss)))
    rr = row.rss_vs_fastrelay
    vs = "-" if ratio is None else times(ratio) + ("" if rr is None else ", RSS " + times(rr))
    return res, "%s – %s" % (si(v.min), si(v.max)), vs


def _median(st: Stats | None) -> float | None:
    return None if st is None else st.median


def table(summary: list[SummaryRow]) -> str:
    head = [
        "workload",
        "server",
        "result (median)",
        "min – max",
        "server CPU per delivery (per handshake)",
        "vs fastrelay",
        "client CPU",
        "server CPU",
        "server waiting for CPU",
        "other CPU",
        "verified",
    ]
    rows = []
    for row in summary:
        res, rng, vs = _result_cells(row)
        verified = "ok" if row.ok else ("LOSS %d" % row.loss if row.loss else "FAILED")
        rows.append(
            [
                row.label,
                row.server,
                res,
                rng,
                ns(_median(row.server_ns_per_delivery)),
                vs,
                pct(_median(row.client_cpu)),
                pct(_median(row.server_cpu)),
                pct(_median(row.server_runq)),
                pct(None if row.other_cpu is None else row.other_cpu.max),
                verified,
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]

    def line(cells: list) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def client_bound(summary: Sequence[SummaryRow]) -> list[SummaryRow]:
    """Rows where the load generator, not the server, may have been the limit."""
    return [r for r in summary if (_median(r.client_cpu) or 0) > CLIENT_BOUND]


def noisy(summary: Sequence[SummaryRow]) -> list[SummaryRow]:
    """Rows measured while other processes used the machine."""
    return [r for r in summary if r.other_cpu is not None and r.other_cpu.max > QUIET]


def names(rows: Sequence[SummaryRow]) -> str:
    return ", ".join("%s/%s" % (r.label, r.server) for r in rows)


def markdown(meta: RunMeta, summary: list[SummaryRow], runs: list[RunResult]) -> str:
    """RESULTS.md: the table with the machine, command and date."""
    vers = ", ".join("%s %s" % (k, v) for k, v in meta.machine.versions.items() if v)
    lines = [
        "# Benchmark results",
        "",
        "Latest run of the throughput benchmark (see README.md for what each workload does).",
        "",
        "- date: %s" % meta.date,
        "- command: `%s`" % meta.command,
        "- machine: %s" % meta.machine.describe(),
        "- %s" % meta.code.describe(),
        "- libraries: %s" % vers,
        "- %s; %d repetitions, servers interleaved; %.1fs warmup + %.1fs measured per run"
        % (meta.pinning, meta.reps, meta.settings.warmup, meta.settings.duration),
        "- result = median over repetitions, with min – max; server CPU per delivery = the "
        "server's CPU time in the measured window / deliveries in it (median; idle "
        "connections: per connection opened, over the connecting burst); client CPU = "
        "load generator process CPU time / wall time, server CPU likewise for the server's "
        "process tree (medians); server waiting for CPU = time the server was runnable but "
        "queued behind other processes on its CPU (/proc/PID/schedstat) / wall time; "
        "other CPU = everything else on the machine, /proc/stat user+system minus client "
        "and server (highest repetition)",
        "",
        table(summary),
        "",
    ]
    bound = client_bound(summary)
    if bound:
        lines += [
            "Load generator above %s CPU (figures are a lower bound for the server): %s."
            % (pct(CLIENT_BOUND), names(bound)),
            "",
        ]
    busy = noisy(summary)
    if busy:
        lines += [
            "The machine was not quiet: other processes used more than %s of a CPU "
            "during %d of %d rows (column 'other CPU')." % (pct(QUIET), len(busy), len(summary)),
            "",
        ]
    failed = [r for r in runs if not r.verdict.ok]
    if failed:
        lines += ["%d run(s) did not verify; see the JSON for details." % len(failed), ""]
    return "\n".join(lines)
