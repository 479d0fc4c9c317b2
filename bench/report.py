"""Summaries, the results table, and machine facts for the report."""

from __future__ import annotations

import math
import os
import platform
import statistics
from typing import Optional


def si(x: Optional[float], unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return "%.2f %s%s" % (x / div, suffix, unit)
    return "%.0f %s" % (x, unit) if unit else "%.0f" % x


def pct(x: Optional[float]) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return "%.0f%%" % (100 * x)


def ms(x: Optional[float]) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return "%.2f" % x if x < 10 else "%.1f" % x


def _stats(values: list) -> Optional[dict]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    return dict(median=statistics.median(vals), min=min(vals), max=max(vals), n=len(vals))


def summarise(runs: list[dict], workloads: list, servers: list[str]) -> list[dict]:
    out = []
    for w in workloads:
        for name in servers:
            rs = [r for r in runs if r["workload"] == w.key and r["server"] == name]
            if not rs:
                continue
            done = [r for r in rs if "value" in r]
            row = dict(
                workload=w.key,
                kind=w.kind,
                label=w.label,
                server=name,
                reps=len(rs),
                ok=all(r.get("ok") for r in rs),
                loss=sum(r.get("loss", 0) for r in rs),
                errors=[e for r in rs for e in r.get("errors", [])][:5],
            )
            for key in (
                "value",
                "client_cpu",
                "server_cpu",
                "other_cpu",
                "p50_ms",
                "p99_ms",
                "max_ms",
                "rss_per_conn",
            ):
                st = _stats([r.get(key) for r in done])
                if st is not None:
                    row[key] = st
            out.append(row)
    base = {r["workload"]: r for r in out if r["server"] == "fastrelay" and "value" in r}
    for row in out:
        ref = base.get(row["workload"])
        if ref is None or "value" not in row or ref["value"]["median"] == 0:
            continue
        row["vs_fastrelay"] = row["value"]["median"] / ref["value"]["median"]
        if (
            row["kind"] == "connections"
            and "rss_per_conn" in row
            and "rss_per_conn" in ref
            and ref["rss_per_conn"]["median"]
        ):
            row["rss_vs_fastrelay"] = row["rss_per_conn"]["median"] / ref["rss_per_conn"]["median"]
    return out


def _result_cells(row: dict) -> tuple[str, str, str]:
    """(result, min-max, vs fastrelay) for one summary row."""
    v = row.get("value")
    if v is None:
        return "failed", "-", "-"
    ratio = row.get("vs_fastrelay")
    kind = row["kind"]
    if kind in ("fanout", "rooms"):
        return (
            si(v["median"], "/s"),
            "%s – %s" % (si(v["min"]), si(v["max"])),
            "-" if ratio is None else times(ratio),
        )
    if kind == "latency":
        p50, mx = row.get("p50_ms", {}), row.get("max_ms", {})
        res = "p50 %s / p99 %s / max %s ms" % (
            ms(p50.get("median")),
            ms(v["median"]),
            ms(mx.get("median")),
        )
        # For latency the ratio is of p99: below 1 means lower (better).
        return (
            res,
            "p99 %s – %s" % (ms(v["min"]), ms(v["max"])),
            "-" if ratio is None else "p99 " + times(ratio),
        )
    rss = row.get("rss_per_conn")
    res = "%s handshakes/s, %s/conn" % (si(v["median"]), kib(rss and rss["median"]))
    rr = row.get("rss_vs_fastrelay")
    vs = (
        "-"
        if ratio is None
        else "%s%s" % (times(ratio), "" if rr is None else ", RSS " + times(rr))
    )
    return res, "%s – %s" % (si(v["min"]), si(v["max"])), vs


def times(r: float) -> str:
    """A ratio to fastrelay with two significant digits: 0.0031x, 0.52x, 380x."""
    if r >= 100:
        return "%.0fx" % r
    return "%sx" % ("%.2g" % r if r < 1 else "%.3g" % r)


def kib(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return "%.1f KiB" % (x / 1024)


def table(summary: list[dict]) -> str:
    head = [
        "workload",
        "server",
        "result (median)",
        "min – max",
        "vs fastrelay",
        "client CPU",
        "server CPU",
        "other CPU",
        "verified",
    ]
    rows = []
    for row in summary:
        res, rng, vs = _result_cells(row)
        verified = "ok" if row["ok"] else ("LOSS %d" % row["loss"] if row["loss"] else "FAILED")
        rows.append(
            [
                row["label"],
                row["server"],
                res,
                rng,
                vs,
                pct(row.get("client_cpu", {}).get("median")),
                pct(row.get("server_cpu", {}).get("median")),
                pct(row.get("other_cpu", {}).get("max")),
                verified,
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]

    def line(cells: list) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for mod in ("websockets", "picows", "aiohttp", "uvloop", "numpy", "psutil"):
        try:
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", "?")
        except Exception:  # noqa: BLE001 - absent or broken: report as such
            versions[mod] = None
    try:
        from fastrelay._version import __version__ as frv

        versions["fastrelay"] = frv
    except Exception:  # noqa: BLE001
        versions["fastrelay"] = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = None
    return dict(
        cpu=cpu,
        cores=os.cpu_count(),
        memory_bytes=mem,
        kernel=platform.release(),
        system=platform.system(),
        python=platform.python_version(),
        versions=versions,
    )
