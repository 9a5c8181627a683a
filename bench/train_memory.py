"""Training memory against the size of the split: streamed stays flat, cached grows.

A worker that keeps its share of a split holds it as tensors (train/feeds.py); one that
streams it holds Ray Data's blocks in flight and a shuffle window, both sized by the
cache limit (``train.cache_inputs_below_mb``), whatever the split's size. Issue 20 item
6 asks for that proof on a version above the limit.

Generated transactions are ingested once per size (a version each); then the cheap tier
trains one epoch on each version twice, each run in a fresh child process with a local
Ray cluster of its own: streamed (a cache limit of ``LIMIT_MB``, which the train split
is above at every size; at ``--quick``'s size val and test are below it, so they are
kept and scored in the driver) and cached (no limit set: 5 % of the node's memory).
Every 50 ms the child's process tree is sampled: the RSS of the two Ray Train workers
together, and of the whole tree (driver, Ray's processes, Ray Data's tasks). Both feeds
run the same micro batch, ``MICRO_BATCH`` (large, so that an epoch of a million rows
takes seconds).

    .venv/bin/python -m bench.train_memory           # 250,000 and 1,000,000 rows
    .venv/bin/python -m bench.train_memory --quick   # what make test runs: 20,000, streamed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from bench.data_pipeline import PII_KEY, communicate_sampling, tree_rss

FEEDS = ("streamed", "cached")
LIMIT_MB = 1.0  # the streamed runs' cache limit: 5,140 rows; a window of 8 micro batches
MICRO_BATCH = 1024
FLAT = 1.1  # goal: streamed workers' peak RSS at the largest size / at the smallest


def settings_for(store: str, feed: str | None = None):  # noqa: ANN201 - Settings
    from app.settings import load_settings

    train = {"epochs": 1, "micro_batch_size": MICRO_BATCH}
    if feed == "streamed":
        train["cache_inputs_below_mb"] = LIMIT_MB
    return load_settings(storage_root=Path(store), pii_key=PII_KEY, train=train)


def child_ingest(raw: str, store: str) -> None:
    from app.runtime import ray_session
    from app.workloads import get_workload
    from data.pipeline import ingest
    from data.sources import open_source

    settings = settings_for(store)
    with ray_session(settings):
        manifest = ingest(settings, get_workload("transactions"), open_source(raw)).manifest
    print(json.dumps({"train_rows": manifest.splits["train"]}))


def child_train(feed: str, store: str) -> None:
    from app.runtime import ray_session
    from app.workloads import get_workload
    from train.run import train_tier

    settings = settings_for(store, feed)
    with ray_session(settings):
        outcome = train_tier(settings, get_workload("transactions"), "cheap")
        feeds = sorted({e["feed"] for e in epoch_events(outcome.run_name)})
    print(json.dumps({"seconds": outcome.seconds, "feeds": feeds, **outcome.metrics}))


def epoch_events(run_name: str) -> list[dict]:
    """The ``train.epoch`` lines every rank of the run logged (JSON, in its worker's log):
    what tells a streamed run from a cached one."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    events = []
    for f in logs.rglob("worker-*.err"):  # rglob: exited workers' logs move to logs/old/
        for line in f.read_text(errors="replace").splitlines():
            if '"train.epoch"' in line and run_name in line:
                events.append(json.loads(line))
    return events


def workers_rss(pid: int) -> int:
    """The RSS of the Ray Train workers under ``pid``, together."""
    import psutil

    total = 0
    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_child(*args: str, log: Path) -> dict:
    """``python -m bench.train_memory --child ARGS``: its last line as JSON, and the peak
    RSS of its workers and of its whole tree."""
    # A cluster of its own, whatever the caller's environment joins: its workers must be
    # the child's descendants to be measured.
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("SCALEDL_") and k != "RAY_ADDRESS"
    }
    env["RAY_AUTH_MODE"] = os.environ.get("RAY_AUTH_MODE", "token")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.train_memory", "--child", *args],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        env=env,
    )
    out, peaks = communicate_sampling(proc, {"workers": workers_rss, "tree": tree_rss})
    if proc.returncode != 0:
        raise ChildFailed(
            f"{' '.join(args)} failed (exit {proc.returncode}): {out[-1000:]}\n"
            f"{log.read_text()[-3000:]}"
        )
    return {**json.loads(out.strip().splitlines()[-1]), **peaks}


class ChildFailed(Exception):
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250_000, 1_000_000])
    parser.add_argument("--feeds", nargs="+", default=list(FEEDS), choices=FEEDS)
    parser.add_argument("--quick", action="store_true", help="20,000 rows, streamed only")
    parser.add_argument("--child", nargs="+", metavar="ARG")
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        {"ingest": child_ingest, "train": child_train}[kind](*rest)
        return
    if args.quick:
        args.sizes, args.feeds = [20_000], ["streamed"]
    args.sizes = sorted(set(args.sizes))

    results: dict[tuple[int, str], dict] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="scaledl-bench-") as tmp:
            for size in args.sizes:
                results.update(measure(size, args.feeds, Path(tmp)))
    except ChildFailed as failed:
        print(report(results, args))  # what finished
        raise SystemExit(str(failed)) from None
    print(report(results, args))


def measure(size: int, feeds: list[str], tmp: Path) -> dict[tuple[int, str], dict]:
    """One version of ``size`` generated rows, trained on with each feed."""
    from data.generate import generate_transactions

    raw, store = tmp / f"raw-{size}", tmp / f"store-{size}"
    generate_transactions(raw, rows=size, seed=1, rows_per_shard=250_000)
    ingested = run_child("ingest", str(raw), str(store), log=store.with_suffix(".log"))
    results = {}
    for feed in feeds:
        r = run_child("train", feed, str(store), log=tmp / f"train-{size}-{feed}.log")
        results[size, feed] = {**r, "train_rows": ingested["train_rows"]}
        print(
            f"  {size:>10,} {feed:<8} {r['seconds']:6.1f} s workers "
            f"{r['workers'] / 2**20:,.0f} MiB tree {r['tree'] / 2**20:,.0f} MiB",
            file=sys.stderr,
        )
    return results


def report(results: dict[tuple[int, str], dict], args: argparse.Namespace) -> str:
    smallest = args.sizes[0]
    lines = [
        f"training memory, transactions cheap tier, 1 epoch, micro batch {MICRO_BATCH}, "
        f"2 workers; streamed: cache limit {LIMIT_MB:g} MB; {date.today()}, "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "| rows in | train rows | feed | s | test acc | workers' peak RSS MiB | vs smallest "
        "| tree's peak RSS MiB | vs smallest |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (size, feed), r in results.items():
        base = results.get((smallest, feed))
        workers = f"{r['workers'] / base['workers']:.2f}x" if base else "-"
        tree = f"{r['tree'] / base['tree']:.2f}x" if base else "-"
        lines.append(
            f"| {size:,} | {r['train_rows']:,} | {'/'.join(r['feeds'])} | {r['seconds']:.1f} "
            f"| {r['test_accuracy']:.4f} | {r['workers'] / 2**20:,.0f} | {workers} "
            f"| {r['tree'] / 2**20:,.0f} | {tree} |"
        )
    largest = args.sizes[-1]
    if {(smallest, "streamed"), (largest, "streamed")} <= results.keys() and largest != smallest:
        ratio = results[largest, "streamed"]["workers"] / results[smallest, "streamed"]["workers"]
        verdict = "PASS" if ratio <= FLAT else "FAIL"
        lines.append(
            f"{verdict} streamed: workers' peak RSS at {largest:,} rows is {ratio:.2f}x that at "
            f"{smallest:,} (goal <= {FLAT}x)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
