"""Overload: what the scaledl graph answers in a burst far past its capacity, same run.

The graph exactly as ``scaledl serve`` deploys it (``app.serving.deploy``, the default
fast transport), on one local cluster:

1. **capacity**: ``wrk`` at ``--capacity-connections`` (64), the answers per second the
   graph sustains; the baseline of the run.
2. **burst**: ``hey`` at ``--burst-connections`` (512) for ``--seconds``. hey writes one
   CSV row per response (status and latency), so the figures are exact: the share of
   each status, the slowest 503 and its p99, and every 5xx that is not a 503 (a 504 or a
   500 here is a defect: overload must be shed at once with 503 + Retry-After).
3. **polite burst**: as many connections for as long, from ``bench.polite``: clients that
   wait the Retry-After of a 503 or 429 before their next request, as well-behaved ones
   do. hey sends the next request at once, so each fast 503 becomes more load.

The burst's size is given two ways: its connections over the capacity run's, and the
requests it made per second over the capacity (both clients are closed loops, so a fast
503 frees its connection for the next request; that ratio is the offered load). Goodput
is the burst's 200s per second over the capacity. The client shares the 2 cores with the
servers, as in ``bench.serve``; the CPU each process used in the burst is printed.

    .venv/bin/python -m bench.overload                  # about 6 minutes, training included
    .venv/bin/python -m bench.overload --store DIR      # a store with a cascade: 2 minutes
    .venv/bin/python -m bench.overload --quick          # what make test runs (--report-only)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from app.runtime import FAST_TRANSPORT
from bench import wrk
from bench.polite import summary
from bench.serve import add_report_only, deploy_setup, run_child, store_with_cascade
from bench.serve_models import DIGITS, request_bodies

# Overload must be shed within about a batch time; a 503 slower than this is a finding.
SLOW_503_MS = 250
SETTLE_S = 5.0


def require_hey() -> str:
    path = shutil.which("hey")
    if path is None:
        raise SystemExit("hey is not installed: apt-get install hey")
    return path


def burst(url: str, body: str, key: str, connections: int, seconds: float) -> dict:
    """hey at ``connections`` for ``seconds``: per-status counts and 503 latencies (ms).

    hey writes a CSV row for every response; a request that got none (a socket error or
    hey's own timeout) has no row, so this burst cannot count those: bench.polite's can."""
    cmd = [
        require_hey(),
        "-z",
        f"{max(round(seconds), 1)}s",
        "-c",
        str(connections),
        "-t",
        "20",  # hey's own timeout, s: far past the graph's request timeout
        "-m",
        "POST",
        "-T",
        "application/json",
        "-H",
        f"Authorization: Bearer {key}",
        "-d",
        body,
        "-o",
        "csv",
        url,
    ]
    started = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    elapsed = time.monotonic() - started
    statuses: dict[str, int] = {}
    by_status_ms: dict[str, list[float]] = {}
    for row in csv.DictReader(io.StringIO(out)):
        status = row["status-code"]
        statuses[status] = statuses.get(status, 0) + 1
        by_status_ms.setdefault(status, []).append(float(row["response-time"]) * 1000)
    answered = sum(statuses.values())
    return {
        "connections": connections,
        "seconds": elapsed,
        "responses": answered,
        "statuses": dict(sorted(statuses.items())),
        "ms": {s: summary(v) for s, v in sorted(by_status_ms.items())},
    }


def cluster(plan: dict) -> dict:
    """The graph on one local cluster (the env gives the transport): capacity, then burst."""
    import ray
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": plan["port"]})
        url = deploy_setup("d", plan)
        wrk.probe(url, plan["bodies"][0], plan["key"])
        capacity = wrk.measure(
            url, plan["bodies"], plan["key"], [plan["capacity"]], plan["seconds"], plan["warmup"]
        )[plan["capacity"]][0]
        args = (url, plan["bodies"][0], plan["key"], plan["burst"], plan["seconds"])
        result = with_cpu(burst, *args, client="hey")
        time.sleep(SETTLE_S)  # hey's backlog drains before the second burst starts
        wrk.probe(url, plan["bodies"][0], plan["key"])
        polite = with_cpu(polite_burst, *args, client="bench.polite")
        serve.delete(DIGITS)
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "capacity": {
            "connections": plan["capacity"],
            "rate": capacity.rate,
            "p99_ms": capacity.p99_ms,
            "errors": capacity.errors,
        },
        "burst": result,
        "polite": polite,
    }


def with_cpu(run: Callable[..., dict], *args: object, client: str) -> dict:
    """``run(*args)``'s result, with the cores each process used meanwhile; the client's,
    a child that has exited by then, from this process's children's CPU times."""
    before, children = wrk.cpu_seconds(), os.times()
    result = run(*args)
    after, done = wrk.cpu_seconds(), os.times()
    cpu = wrk.cpu_split(before, after, result["seconds"])
    used = done.children_user + done.children_system
    used -= children.children_user + children.children_system
    cpu[f"client ({client})"] = round(used / result["seconds"], 2)
    result["cpu"] = dict(sorted(cpu.items(), key=lambda kv: -kv[1]))
    return result


def polite_burst(url: str, body: str, key: str, connections: int, seconds: float) -> dict:
    """The same burst from clients that honour Retry-After (``bench.polite``, a process
    of its own)."""
    plan = {"url": url, "body": body, "key": key, "connections": connections,
            "seconds": seconds}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "bench.polite", json.dumps(plan)],
        capture_output=True, text=True, timeout=seconds + 120, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"bench.polite failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def burst_row(name: str, b: dict) -> str:
    ok = b["statuses"].get("200", 0)
    shed = b["statuses"].get("503", 0) + b["statuses"].get("429", 0)
    answered = max(b["responses"], 1)
    return (
        f"| {name} | {b['connections']} | {b['responses'] / b['seconds']:.0f} made, "
        f"{ok / b['seconds']:.0f} answered | {ok / answered:.3f} | {shed / answered:.3f} | "
        f"{unexpected(b) or 'none'} | {b['ms'].get('200', {}).get('p99', 0)} | "
        f"{b['ms'].get('503', {}).get('p99', '-')} | "
        f"{b['ms'].get('503', {}).get('max', '-')} |"
    )


def unexpected(b: dict) -> dict[str, int]:
    """Statuses that are neither an answer nor shedding (a request with no answer too)."""
    return {s: n for s, n in b["statuses"].items() if s not in ("200", "429", "503")}


def report(result: dict, elapsed_s: float) -> tuple[str, bool]:
    cap, b, p = result["capacity"], result["burst"], result["polite"]

    def goodput(run: dict) -> float:
        return run["statuses"].get("200", 0) / run["seconds"] / cap["rate"]

    slow_503 = b["ms"].get("503", {}).get("max", 0.0)
    lines = [
        "| run | connections | req/s | 200 share | 503+429 share | other | p99 200 ms "
        "| p99 503 ms | slowest 503 ms |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
        f"| capacity (wrk) | {cap['connections']} | {cap['rate']:.0f} answered | - | - "
        f"| {cap['errors']} errors | {cap['p99_ms']:.1f} (all) | - | - |",
        burst_row("burst (hey)", b),
        burst_row("burst honouring Retry-After (bench.polite)", p),
        "",
        "| ratio | value |",
        "|---|---:|",
        f"| burst connections / capacity's | {b['connections'] / cap['connections']:.1f}x |",
        f"| burst requests made per s / capacity | "
        f"{b['responses'] / b['seconds'] / cap['rate']:.2f}x |",
        f"| goodput: burst 200s per s / capacity | {goodput(b):.2f}x |",
        f"| goodput, clients honouring Retry-After / capacity | {goodput(p):.2f}x |",
        "",
        f"burst statuses: {b['statuses']}; latency ms by status: {json.dumps(b['ms'])}",
        f"CPU in the burst (cores): {b['cpu']}",
        f"honouring Retry-After: statuses {p['statuses']}; latency ms by status: "
        f"{json.dumps(p['ms'])}; {p['waited_s']} s waited in all",
        f"CPU in that burst (cores): {p['cpu']}",
    ]
    checks = [
        (not unexpected(b), f"no status but 200/429/503 in the burst: {unexpected(b) or 'none'}"),
        (
            not unexpected(p),
            f"none either from clients honouring Retry-After: {unexpected(p) or 'none'}",
        ),
        (slow_503 <= SLOW_503_MS, f"slowest 503 <= {SLOW_503_MS} ms: {slow_503} ms"),
    ]
    lines += [f"{'PASS' if c else 'FAIL'} {text}" for c, text in checks]
    lines.append(f"whole run {elapsed_s / 60:.1f} min")
    return "\n".join(lines), all(c for c, _ in checks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="reuse a storage root with a cascade")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs without --store")
    parser.add_argument("--capacity-connections", type=int, default=64)
    parser.add_argument("--burst-connections", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=15, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=3)
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument(
        "--quick", action="store_true", help="2 s runs, 1 epoch, 256 burst connections"
    )
    add_report_only(parser)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(cluster(json.loads(args.child[0]))))
        return
    if args.quick:
        args.seconds, args.warmup, args.epochs = 2, 1, 1
        args.burst_connections = min(args.burst_connections, 256)
    wrk.require_wrk()
    require_hey()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="scaledl-bench-overload-") as tmp:
        store = store_with_cascade(args.store, args.epochs, Path(tmp))
        bodies, model_dir, _ = request_bodies(store, "digits")
        plan = {
            "store": str(store),
            "port": args.port,
            "key": os.urandom(16).hex(),
            "bodies": bodies,
            "model_dir": model_dir,
            "capacity": args.capacity_connections,
            "burst": args.burst_connections,
            "seconds": args.seconds,
            "warmup": args.warmup,
        }
        result = run_child(
            "bench.overload", [json.dumps(plan)], FAST_TRANSPORT, Path(tmp) / "cluster.log"
        )
    print(json.dumps(result), file=sys.stderr)
    text, passed = report(result, time.monotonic() - started)
    print(text)
    sys.exit(0 if passed or args.report_only else 1)


if __name__ == "__main__":
    main()
