"""Reading a dataset version's split: Ray 2.60's default Parquet reader against ours.

Ray 2.60 reads Parquet through DataSourceV2, whose listing starts a pool of footer-reading
actors (32 by default) for every read. ``data.splits.read_split`` uses Ray Data's V1
reader instead. Both read the same split of the same version, in the same run, one
after the other in turns; each read plans the dataset and materializes it on a local
cluster (4 logical CPUs), as a training run does.

    .venv/bin/python -m bench.read_split                    # digits, and 1 M transactions
    .venv/bin/python -m bench.read_split --rows 0           # digits only: a quick look
    .venv/bin/python -m bench.read_split --quick            # what make test runs: 1 round
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

FOOTER_ACTORS = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"


def v2(footer_actors: int | None) -> Callable[[str, list[str]], Any]:
    """Ray's default reader; ``footer_actors`` overrides the size of its footer pool."""

    def read(path: str, columns: list[str]) -> Any:
        import ray.data

        saved = os.environ.get(FOOTER_ACTORS)
        if footer_actors is not None:  # read when the read is planned, below
            os.environ[FOOTER_ACTORS] = str(footer_actors)
        try:
            return ray.data.read_parquet(path, columns=columns, partitioning=None)
        finally:
            if saved is None:
                os.environ.pop(FOOTER_ACTORS, None)
            else:
                os.environ[FOOTER_ACTORS] = saved

    return read


def readers() -> dict[str, Callable[[str, list[str]], Any]]:
    from data.splits import read_parquet_v1

    return {
        "v2, Ray 2.60's default (32 footer actors)": v2(None),
        "v2, 1 footer actor": v2(1),
        "v1 (scaledl: data.splits.read_split)": read_parquet_v1,
    }


def timed_reads(path: Path, columns: list[str], rounds: int) -> dict[str, tuple[float, int]]:
    """Median seconds to plan and materialize the split, and its rows, per reader."""
    seconds: dict[str, list[float]] = {name: [] for name in readers()}
    rows: dict[str, int] = {}
    for _ in range(rounds):
        for name, read in readers().items():
            started = time.perf_counter()
            dataset = read(str(path), columns).materialize()
            seconds[name].append(time.perf_counter() - started)
            rows[name] = dataset.count()
    return {name: (statistics.median(s), rows[name]) for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="transactions; 0: none")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="digits only, one round")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.rounds = 0, 1

    import ray

    from app.settings import load_settings
    from app.workloads import get_workload
    from bench.data_pipeline import PII_KEY
    from data.generate import generate_transactions
    from data.pipeline import ingest
    from data.sources import open_source
    from data.versions import DatasetStore

    results = []
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="scaledl-bench-") as tmp:
            settings = load_settings(storage_root=Path(tmp) / "store", pii_key=PII_KEY)
            cases = [("digits", None)]
            if args.rows:
                raw = Path(tmp) / "raw"
                generate_transactions(raw, rows=args.rows, seed=1, fault_rate=0.0, fmt="parquet")
                cases.append(("transactions", raw))
            for name, raw in cases:
                workload = get_workload(name)
                source = open_source(raw) if raw else None
                manifest = ingest(settings, workload, source).manifest
                store = DatasetStore(settings.datasets_dir)
                for split in ("train", "test"):
                    path = store.split_dir(name, manifest.version, split)
                    files = len(list(path.rglob("*.parquet")))
                    columns = [*workload.feature_columns, workload.label_column]
                    print(f"  {name} {split}: {files} files ...", file=sys.stderr, flush=True)
                    results.append((name, split, files, timed_reads(path, columns, args.rounds)))
    finally:
        ray.shutdown()
    print(report(results, args))


def report(results: list, args: argparse.Namespace) -> str:
    lines = [
        f"read a split and materialize it, median of {args.rounds} reads per reader, taken in "
        f"turns; {date.today()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "| dataset | split | files | rows | reader | seconds | vs Ray's default |",
        "|---------|-------|------:|-----:|--------|--------:|-----------------:|",
    ]
    for name, split, files, timings in results:
        base = next(iter(timings.values()))[0]
        for reader, (seconds, rows) in timings.items():
            lines.append(
                f"| {name} | {split} | {files} | {rows:,} | {reader} | {seconds:.2f} | "
                f"{base / seconds:.2f}x |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
