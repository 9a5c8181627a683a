"""The ingest pipeline on Ray Data vs the same transforms in one plain process.

Both sides run the very same ``data.pipeline.ingest`` (contract check, PII
pseudonymization and redaction, split, Parquet write, cross-batch uniqueness, the
preprocessor and column statistics fitted on the train split, the manifest); only the
engine of the one pass over the records differs: Ray Data streaming over a local
cluster, or a loop that reads, marks and writes one block at a time with pyarrow and
pandas. Each run is a fresh child process, and its peak memory is the largest sum of
RSS over the child and all its descendants (the Ray cluster included), sampled every
50 ms. Both sides read the same generated files, in the same run.

    .venv/bin/python -m bench.data_pipeline                  # 1 M and 4 M rows, Parquet
    .venv/bin/python -m bench.data_pipeline --sizes 200000   # a quick look
    .venv/bin/python -m bench.data_pipeline --quick          # what make test runs: 10,000 rows
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

ENGINES = ("plain", "ray")
PII_KEY = "bench-pii-key-0123456789abcdef"


def local_pass(source, columns, rows_dir, mark) -> None:  # noqa: ANN001 - a data.marking.Pass
    """The single-process baseline: read, mark and write one block at a time."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from data.marking import SPLIT_COLUMN
    from data.readers import read_stream

    for i, path in enumerate(source.paths):
        with source.filesystem.open_input_file(path) as f:
            for j, block in enumerate(read_stream(f, path, columns)):
                table = mark(block)
                for split in pc.unique(table.column(SPLIT_COLUMN)).to_pylist():
                    part = table.filter(pc.equal(table.column(SPLIT_COLUMN), split))
                    out = rows_dir / f"{SPLIT_COLUMN}={split}"
                    out.mkdir(parents=True, exist_ok=True)
                    pq.write_table(
                        part.drop_columns([SPLIT_COLUMN]), out / f"{i:05d}-{j:05d}.parquet"
                    )


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
        result = ingest(settings, workload, open_source(source), run_pass=local_pass)
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
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(
            f"{engine} ingest failed (exit {proc.returncode}): {out[-1000:]}\n"
            f"{log.read_text()[-3000:]}"
        )
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--format", default="parquet", choices=["parquet", "csv", "jsonl"])
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
            generate_transactions(
                raw, rows=size, seed=1, fault_rate=args.fault_rate, faults=faults, fmt=args.format
            )
            for engine in ENGINES:
                results[size, engine] = measure(engine, raw, Path(tmp) / f"store-{size}-{engine}")
                r = results[size, engine]
                rate, peak = r["rows_in"] / r["seconds"], r["peak_rss"] / 2**20
                print(
                    f"  {size:>9,} {engine:<5} {r['seconds']:7.1f} s {rate:>9,.0f} rows/s "
                    f"peak {peak:,.0f} MiB",
                    file=sys.stderr,
                )
    print(report(results, args))


def report(results: dict[tuple[int, str], dict], args: argparse.Namespace) -> str:
    sizes = args.sizes
    lines = [
        f"ingest pipeline, transactions, {args.format}, fault rate {args.fault_rate:g}; "
        f"{date.today()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "| rows | engine | seconds | rows/s | vs plain | peak RSS MiB |",
        "|-----:|--------|--------:|-------:|---------:|-------------:|",
    ]
    for size in sizes:
        base = results[size, "plain"]
        for engine in ENGINES:
            r = results[size, engine]
            rate = r["rows_in"] / r["seconds"]
            ratio = rate / (base["rows_in"] / base["seconds"])
            lines.append(
                f"| {size:,} | {engine} | {r['seconds']:.1f} | {rate:,.0f} | {ratio:.2f}x | "
                f"{r['peak_rss'] / 2**20:,.0f} |"
            )
    if len(sizes) >= 2:
        small, large = min(sizes), max(sizes)
        for engine in ENGINES:
            growth = results[large, engine]["peak_rss"] / results[small, engine]["peak_rss"]
            lines.append(f"peak memory {engine}: {large:,} rows / {small:,} rows = {growth:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
