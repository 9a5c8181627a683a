"""The table and target lines ``bench.serve`` prints."""

from __future__ import annotations

import os
import platform
from datetime import date
from importlib.metadata import version

from bench import wrk

NAMES = {
    "a": "stock Serve, unbatched",
    "b": "stock Serve, @serve.batch",
    "c": "LitServe, batched",
    "d": "scaledl graph",
    "e": "scaledl monolith",
    "d+t": "scaledl graph + transport",
    "e+t": "scaledl monolith + transport",
}


def report(results: dict, plan: dict, note: str, skipped: list[str], seconds: float) -> str:
    conc = plan["concurrency"]
    top = max(conc)
    lines = [
        f"serving digits, one instance per request, wrk -t1, {plan['seconds']:g} s per run; "
        f"{date.today()}, {platform.platform()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, Ray {version('ray')}"
        + (f", LitServe {version('litserve')}" if "c" in results else ""),
        note,
        "| setup | concurrency | req/s | p50 ms | p99 ms | errors | d/a | d/c | d/e |",
        "|-------|------------:|------:|-------:|-------:|-------:|----:|----:|----:|",
    ]

    def rate(setup: str, c: int) -> float | None:
        run = results.get(setup, {}).get("runs", {}).get(str(c))
        return wrk.Result(**run).rate if run else None

    def ratio(setup: str, other: str, c: int) -> str:
        ours, theirs = rate(setup, c), rate(other, c)
        return f"{ours / theirs:.2f}x" if ours and theirs else "-"

    for setup in NAMES:
        if setup not in results:
            continue
        for c in conc:
            r = wrk.Result(**results[setup]["runs"][str(c)])
            ratios = ["", "", ""]
            if setup.startswith("d"):
                e = "e+t" if setup == "d+t" else "e"
                ratios = [ratio(setup, "a", c), ratio(setup, "c", c), ratio(setup, e, c)]
            lines.append(
                f"| {setup} {NAMES[setup]} | {c} | {r.rate:,.0f} | {r.p50_ms:.1f} | "
                f"{r.p99_ms:.1f} | {r.errors:,} | " + " | ".join(ratios) + " |"
            )
    lines += [
        "d rows: d+t is compared with a and c (stock) and with e+t (same transport).",
        *skipped,
        f"CPU by process during the measured run at {top}: cores used (of {os.cpu_count()}), "
        "and CPU ms per answered request",
        *(cpu_line(s, results[s], top) for s in NAMES if s in results),
        *targets(results, top, rate),
        f"answers: d {results.get('d', {}).get('answer')}; e {results.get('e', {}).get('answer')}",
        f"whole run {seconds / 60:.1f} min",
    ]
    return "\n".join(lines)


def cpu_line(setup: str, result: dict, c: int) -> str:
    rate = wrk.Result(**result["runs"][str(c)]).rate
    used = result["cpu"][str(c)].items()
    return f"  {setup}: " + ", ".join(f"{k} {v:.2f} ({v / rate * 1000:.1f} ms)" for k, v in used)


def targets(results: dict, c: int, rate) -> list[str]:  # noqa: ANN001 - report's rate()
    """The issue's targets, at the highest concurrency run."""
    lines = []
    for d, e in (("d", "e"), ("d+t", "e+t")):
        if d not in results:
            continue
        checks = [(f"{d} >= 4x a", "a", 4.0), (f"{d} >= 1.5x c", "c", 1.5)]
        checks.append((f"{d} >= 0.75x {e}", e, 0.75))
        for name, other, need in checks:
            ours, theirs = rate(d, c), rate(other, c)
            if not theirs:
                lines.append(f"SKIP {name} at {c}: {other} not run")
                continue
            verdict = "PASS" if ours >= need * theirs else "FAIL"
            lines.append(f"{verdict} {name} at {c}: {ours / theirs:.2f}x")
        p99 = results[d]["runs"][str(c)]["p99_ms"]
        lines.append(f"{'PASS' if p99 <= 100 else 'FAIL'} {d} p99 <= 100 ms at {c}: {p99:.1f} ms")
    return lines
