"""The ingest pipeline on Ray Data vs the same code on a 2-process pool.

Both sides run the very same ``data.pipeline.ingest`` (contract check, PII
pseudonymization and redaction, split, Parquet write, cross-batch uniqueness, the
preprocessor and column statistics fitted on the train split, the manifest), and the
same per-piece work in the pass (data/readers.read_piece, data/marking.mark_rows and
write_rows); only the engine that runs the pieces differs: Ray Data streaming over a
local cluster, or a ``multiprocessing`` pool of 2 processes (fair on 2 cores). Each run
is a fresh child process, and its peak memory is the largest sum of RSS over the child
and all its descendants (the Ray cluster or the pool included), sampled every 50 ms.
Both sides read the same generated files, in the same run: shards of 250,000 rows, or
one single file (``--layout single``).

    .venv/bin/python -m bench.data_pipeline          # 1 M and 4 M rows, Parquet shards
    .venv/bin/python -m bench.data_pipeline --format csv --layout single --sizes 2000000 20000000
    .venv/bin/python -m bench.data_pipeline --quick  # what make test runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

ENGINES = ("pool", "ray")
PII_KEY = "bench-pii-key-0123456789abcdef"
SHARD_ROWS = 250_000


def pool_pass(filesystem, pieces, columns, out, mark) -> None:  # noqa: ANN001 - a data.marking.Pass
    """The baseline engine: the pieces on a pool of 2 processes, one piece a task."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        tasks = [(filesystem, piece, columns, out, mark) for piece in pieces]
        pool.map(piece_task, tasks, chunksize=1)


def piece_task(task: tuple) -> None:
    """What one of Ray Data's fused read tasks does: read, mark and write a piece."""
    from data.marking import write_rows
    from data.readers import read_piece

    filesystem, piece, columns, out, mark = task
    write_rows((mark(block) for block in read_piece(filesystem, piece, columns)), out)


def child(engine: str, source: str, store: str) -> None:
    """One ingest in this process; prints its result as JSON on the last line."""
    from app.runtime import ray_session
    from app.settings import load_settings
    from app.workloads import get_workload
    from data.marking import ray_pass
    from data.pipeline import ingest
    from data.sources import open_source

    settings = load_settings(storage_root=Path(store), pii_key=PII_KEY)
    workload = get_workload("transactions")
    if engine == "ray":
        with ray_session(settings):
            started = time.perf_counter()
            result = ingest(settings, workload, open_source(source), run_pass=ray_pass)
            seconds = time.perf_counter() - started
    else:
        started = time.perf_counter()
        result = ingest(settings, workload, open_source(source), run_pass=pool_pass)
        seconds = time.perf_counter() - started
    m = result.manifest
    print(json.dumps({"seconds": seconds, "rows_in": m.rows_in, "valid": m.rows_valid}))


def tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def communicate_sampling(
    proc: subprocess.Popen, probes: dict[str, Callable[[int], int]]
) -> tuple[str, dict[str, int]]:
    """``proc.communicate()``, while every 50 ms each probe measures the process (by
    pid): its stdout, and each probe's largest reading."""
    peaks = dict.fromkeys(probes, 0)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for name, probe in probes.items():
                peaks[name] = max(peaks[name], probe(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    stop.set()
    sampler.join()
    return out, peaks


def measure(engine: str, source: Path, store: Path) -> dict:
    """Run one ingest in a child process; its result plus the tree's peak RSS."""
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    log = store.with_suffix(".log")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.data_pipeline", "--child", engine, str(source), str(store)],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        env=env,
    )
    out, peaks = communicate_sampling(proc, {"tree": tree_rss})
    if proc.returncode != 0:
        raise SystemExit(
            f"{engine} ingest failed (exit {proc.returncode}): {out[-1000:]}\n"
            f"{log.read_text()[-3000:]}"
        )
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss": peaks["tree"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--format", default="parquet", choices=["parquet", "csv", "jsonl"])
    parser.add_argument("--layout", default="shards", choices=["shards", "single"])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--fault-rate", type=float, default=0.01)
    parser.add_argument("--quick", action="store_true", help="one size of 10,000 rows")
    parser.add_argument("--child", nargs=3, metavar=("ENGINE", "SOURCE", "STORE"))
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.quick:
        args.sizes = [10_000]

    from data.generate import generate_transactions

    results: dict[tuple[int, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="scaledl-bench-") as tmp:
        for size in args.sizes:
            raw = Path(tmp) / f"raw-{size}"
            faults = ("nulls", "range", "categories", "duplicates", "malformed")
            shard = size if args.layout == "single" else SHARD_ROWS
            generate_transactions(raw, rows=size, seed=1, fault_rate=args.fault_rate,
                                  faults=faults, fmt=args.format, rows_per_shard=shard)  # fmt: skip
            size_bytes = sum(f.stat().st_size for f in raw.iterdir())
            for engine in args.engines:
                r = measure(engine, raw, Path(tmp) / f"store-{size}-{engine}")
                results[size, engine] = {**r, "bytes": size_bytes}
                rate, peak = r["rows_in"] / r["seconds"], r["peak_rss"] / 2**20
                print(
                    f"  {size:>10,} {engine:<5} {r['seconds']:7.1f} s {rate:>9,.0f} rows/s "
                    f"peak {peak:,.0f} MiB",
                    file=sys.stderr,
                )
            for engine in args.engines:  # one size on disk at a time
                shutil.rmtree(Path(tmp) / f"store-{size}-{engine}")
            shutil.rmtree(raw)
    print(report(results, args))


def report(results: dict[tuple[int, str], dict], args: argparse.Namespace) -> str:
    sizes, engines = args.sizes, args.engines
    base = engines[0]
    lines = [
        f"ingest pipeline, transactions, {args.format} {args.layout}, fault rate "
        f"{args.fault_rate:g}; {date.today()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        f"| rows | input MB | engine | seconds | rows/s | vs {base} | peak RSS MiB |",
        "|-----:|---------:|--------|--------:|-------:|---------:|-------------:|",
    ]
    for size in sizes:
        first = results[size, base]
        for engine in engines:
            r = results[size, engine]
            rate = r["rows_in"] / r["seconds"]
            ratio = rate / (first["rows_in"] / first["seconds"])
            lines.append(
                f"| {size:,} | {r['bytes'] / 1e6:,.0f} | {engine} | {r['seconds']:.1f} | "
                f"{rate:,.0f} | {ratio:.2f}x | {r['peak_rss'] / 2**20:,.0f} |"
            )
    if len(sizes) >= 2:
        small, large = min(sizes), max(sizes)
        for engine in engines:
            growth = results[large, engine]["peak_rss"] / results[small, engine]["peak_rss"]
            lines.append(f"peak memory {engine}: {large:,} rows / {small:,} rows = {growth:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
