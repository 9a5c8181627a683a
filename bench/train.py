"""Training throughput: Ray Train + DeepSpeed against plain torch, same run.

The expensive tier (the digits CNN) on the digits training split replicated 8x. Plain
torch trains 3 epochs; Ray Train, plain DDP and DeepSpeed without Ray run 8; the last
epoch's samples/s counts (early epochs share the CPU with start-up work). Ratios are per
core, against plain torch on one thread at the same micro batch. The fair baseline of
Ray Train's 2 workers is plain torch DDP over gloo on 2 processes x 1 thread, data in
memory, at the same micro and global batch; DeepSpeed without Ray (the platform's own
DeepSpeed config, torch.multiprocessing) separates Ray Train's cost from DeepSpeed's.

A second table is each 2-process run's fixed cost: its seconds outside the training
steps (process start, rendezvous, DeepSpeed; for Ray Train also its workers, the last
checkpoint, test scoring, INT8 and registration, by phase: train/run.py's Phases),
against plain DDP's.

    .venv/bin/python -m bench.train            # about 10 minutes on 2 cores
    .venv/bin/python -m bench.train --quick    # what make test runs: 1 Ray Train run, 1 epoch
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from app.settings import Settings, load_settings
from app.workloads import get_workload

REPLICAS = 8
PLAIN_EPOCHS = 3
RAY_EPOCHS = 8
TIER = "expensive"
DIGITS = get_workload("digits")


def make_source(directory: Path, replicas: int) -> Path:
    base = DIGITS.builtin_source()
    copies = [base.assign(id=base["id"] + k * len(base)) for k in range(replicas)]
    path = directory / "digits-x8.parquet"
    pd.concat(copies, ignore_index=True).to_parquet(path, index=False)
    return path


def plain_torch(
    settings: Settings, version: str, threads: int, micro_batch: int, epochs: int
) -> float:
    """Samples/s of the same model and optimizer in one process, no Ray, no DeepSpeed."""
    import pyarrow.parquet as pq
    import torch
    import torch.nn.functional as F

    from data.versions import DatasetStore

    frame = pq.read_table(DatasetStore(settings.datasets_dir).split_dir("digits", version, "train"))
    frame = frame.to_pandas()
    x = torch.from_numpy(DIGITS.features(frame))
    y = torch.from_numpy(frame[DIGITS.label_column].to_numpy(dtype=np.int64, copy=True))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = DIGITS.build_model(TIER)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rate = 0.0
    for _ in range(epochs):
        order = torch.randperm(len(x))
        started, rows = time.perf_counter(), 0
        for i in range(0, len(x) - micro_batch + 1, micro_batch):
            idx = order[i : i + micro_batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            rows += len(idx)
        rate = rows / (time.perf_counter() - started)
    return rate


def _train_arrays(settings: Settings, version: str) -> tuple[np.ndarray, np.ndarray]:
    """The version's train split as the model's inputs and labels, in memory."""
    import pyarrow.parquet as pq

    from data.versions import DatasetStore

    frame = pq.read_table(DatasetStore(settings.datasets_dir).split_dir("digits", version, "train"))
    frame = frame.to_pandas()
    return DIGITS.features(frame), frame[DIGITS.label_column].to_numpy(dtype=np.int64, copy=True)


def _rank(rank: int, engine: str, port: int, data: tuple, micro_batch: int, epochs: int,
          out: object) -> None:  # fmt: skip
    """One of 2 processes x 1 thread, over gloo, its half of the data in memory: a plain
    torch DDP loop (``engine="ddp"``), or DeepSpeed on the platform's own config
    (train/deepspeed_config.py) without Ray (``"deepspeed"``). Same model, optimizer,
    clipping, micro batch and global batch (2 x micro batch) as Ray Train's 2 workers."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    world = 2
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = (torch.from_numpy(a[rank::world].copy()) for a in data)
    model = DIGITS.build_model(TIER)
    steps = len(x) // micro_batch
    if engine == "ddp":
        dist.init_process_group("gloo", rank=rank, world_size=world)
        net = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)

        def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
            loss = F.cross_entropy(net(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
    else:
        from app.sections import TrainConfig
        from train.deepspeed_config import build_deepspeed_config
        from train.engines import import_deepspeed

        deepspeed = import_deepspeed()
        deepspeed.init_distributed(dist_backend="gloo")
        cfg = TrainConfig(micro_batch_size=micro_batch, num_workers=world)
        config = build_deepspeed_config(cfg, total_steps=steps * epochs)
        net, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                       config=config)  # fmt: skip

        def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
            net.backward(F.cross_entropy(net(xb), yb))
            net.step()

    rate = stepping = 0.0
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch + rank))
        dist.barrier()
        started = time.perf_counter()
        for i in range(steps):
            idx = order[i * micro_batch : (i + 1) * micro_batch]
            step(x[idx], y[idx])
        dist.barrier()
        seconds = time.perf_counter() - started
        rate, stepping = steps * micro_batch * world / seconds, stepping + seconds
    if rank == 0:
        out.put((rate, stepping))  # type: ignore[attr-defined]
    dist.destroy_process_group()


@dataclass(frozen=True)
class Run:
    samples_per_s: float  # global, the last epoch's
    seconds: float  # the whole run, as its caller waits for it
    stepping: float  # first step to last
    phases: dict[str, float] | None = None  # Ray Train's, by phase

    @property
    def fixed(self) -> float:
        return self.seconds - self.stepping


def two_processes(engine: str, data: tuple, micro_batch: int, epochs: int) -> Run:
    """:func:`_rank` on 2 processes: its last epoch's global samples/s, and its time."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:  # a free port for the ranks' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = mp.get_context("spawn").SimpleQueue()
    started = time.perf_counter()
    mp.start_processes(_rank, args=(engine, port, data, micro_batch, epochs, out),
                       nprocs=2, join=True, start_method="spawn")  # fmt: skip
    rate, stepping = out.get()
    return Run(rate, time.perf_counter() - started, stepping)


def ray_train(root: Path, version: str, micro_batch: int, epochs: int, **train: object) -> Run:
    from train.run import train_tier

    settings = load_settings(
        storage_root=root, train={"epochs": epochs, "micro_batch_size": micro_batch, **train}
    )
    outcome = train_tier(settings, DIGITS, TIER, dataset_ref=version)
    rate = outcome.metrics["samples_per_s"]  # the last epoch's, global
    return Run(rate, outcome.seconds, outcome.phases["train"], outcome.phases)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the split once, micro batch 64, 1 epoch, one Ray Train run (2 workers)",
    )
    args = parser.parse_args()
    replicas, plain_epochs, ray_epochs = (
        (1, 1, 1) if args.quick else (REPLICAS, PLAIN_EPOCHS, RAY_EPOCHS)
    )
    micro_batches = (64,) if args.quick else (64, 256)

    import ray

    from data.pipeline import ingest
    from data.sources import local_source

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory(prefix="scaledl-bench-") as tmp:
        root = Path(tmp)
        settings = load_settings(storage_root=root / "store")
        manifest = ingest(settings, DIGITS, local_source(make_source(root, replicas))).manifest
        version, store = manifest.version, root / "store"
        table, fixed = [], {}
        for mb in micro_batches:
            base = plain_torch(settings, version, 1, mb, plain_epochs)
            data = _train_arrays(settings, version)
            runs = [
                ("plain torch, 1 thread", 1, base),
                ("plain torch, 2 threads", 2, plain_torch(settings, version, 2, mb, plain_epochs)),
                ("plain torch DDP, gloo, 2 x 1 thread", 2,
                 two_processes("ddp", data, mb, ray_epochs)),
                ("DeepSpeed ZeRO-1 without Ray, 2 x 1 thread", 2,
                 two_processes("deepspeed", data, mb, ray_epochs)),
            ]  # fmt: skip
            if not args.quick:  # quick: the one Ray Train run below
                runs.append(("Ray Train + DeepSpeed ZeRO-1, 1 worker", 1,
                             ray_train(store, version, mb, ray_epochs, num_workers=1)))  # fmt: skip
            runs.append(("Ray Train + DeepSpeed ZeRO-1, 2 workers", 2,
                         ray_train(store, version, mb, ray_epochs, num_workers=2)))  # fmt: skip
            if mb == 64 and not args.quick:
                runs += [
                    ("Ray Train + DeepSpeed ZeRO-1, 2w, no cache", 2,
                     ray_train(store, version, mb, ray_epochs, num_workers=2,
                               cache_inputs_below_mb=0)),
                    ("Ray Train + DeepSpeed ZeRO-2, 2 workers", 2,
                     ray_train(store, version, mb, ray_epochs, num_workers=2, zero_stage=2)),
                    ("Ray Train + DeepSpeed pipeline, 2 stages", 2,
                     ray_train(store, version, mb, ray_epochs, num_workers=2, pipeline_stages=2)),
                ]  # fmt: skip
            runs = [(name, cores, r if isinstance(r, Run) else Run(r, 0.0, 0.0))  # plain: rates
                    for name, cores, r in runs]  # fmt: skip
            table += [(mb, name, cores, r.samples_per_s, r.samples_per_s / cores / base)
                      for name, cores, r in runs]  # fmt: skip
            if mb == micro_batches[0]:
                fixed = {name: r for name, cores, r in runs if r.seconds and cores == 2}
    ray.shutdown()
    print(
        f"training throughput, digits {TIER} tier, {manifest.splits['train']:,} train rows; "
        f"{date.today()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )
    print(f"| mb  | {'setup':<42} | cores | samples/s | per core | per core vs plain 1 thread |")
    print(f"|----:|{'-' * 44}|------:|----------:|---------:|---------------------------:|")
    for mb, name, cores, rate, ratio in table:
        print(
            f"| {mb:>3} | {name:<42} | {cores:>5} | {rate:>9,.0f} | {rate / cores:>8,.0f} "
            f"| {ratio:>25.2f}x |"
        )
    rates = {(mb, name): rate for mb, name, _, rate, _ in table}
    pipe = rates.get((64, "Ray Train + DeepSpeed pipeline, 2 stages"))
    data = rates[64, "Ray Train + DeepSpeed ZeRO-1, 2 workers"]
    for mb in micro_batches:
        ddp = rates[mb, "plain torch DDP, gloo, 2 x 1 thread"]
        ray_ds = rates[mb, "Ray Train + DeepSpeed ZeRO-1, 2 workers"]
        plain_ds = rates[mb, "DeepSpeed ZeRO-1 without Ray, 2 x 1 thread"]
        print(f"mb {mb}: Ray Train + DeepSpeed vs plain DDP {ray_ds / ddp:.2f}x samples/s "
              f"(goal >= 0.9x); DeepSpeed without Ray vs plain DDP {plain_ds / ddp:.2f}x; "
              f"Ray Train's share: {ray_ds / plain_ds:.2f}x")  # fmt: skip
    if pipe is not None:  # not in --quick
        print(f"pipeline vs data parallel (2 workers, mb 64): {pipe / data:.2f}x samples/s")
    print_fixed_costs(fixed, micro_batches[0], ray_epochs)


def print_fixed_costs(runs: dict[str, Run], micro_batch: int, epochs: int) -> None:
    """Each 2-process run's seconds outside its steps, against plain DDP's."""
    ddp = runs["plain torch DDP, gloo, 2 x 1 thread"].fixed
    print(f"\nfixed cost per run: mb {micro_batch}, 2 processes, {epochs} epoch(s); steps = first "
          "to last (Ray Train: with each epoch's validation and checkpoint)")  # fmt: skip
    print(f"| {'setup':<42} | run s | steps s | fixed s | fixed vs plain DDP |")
    print(f"|{'-' * 44}|------:|--------:|--------:|-------------------:|")
    for name, run in runs.items():
        print(
            f"| {name:<42} | {run.seconds:>5.1f} | {run.stepping:>7.1f} | {run.fixed:>7.1f} "
            f"| {run.fixed / ddp:>17.1f}x |"
        )
    for name, run in runs.items():
        if run.phases:
            shown = ", ".join(f"{k} {v:.1f}" for k, v in run.phases.items() if k != "train")
            print(f"{name}, fixed cost by phase (s): {shown}")


if __name__ == "__main__":
    main()
