"""train/feeds.py: what the workers of a run agree on before they read."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from app.sections import TrainConfig
from app.workloads import get_workload
from tests.conftest import free_port
from train.feeds import Feed
from train.job import TrainJob


def _answer(rank: int, port: int, answers: list[list[bool]], agreed: dict) -> None:
    from train.feeds import _on_every_worker

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=len(answers))
    try:
        agreed[rank] = _on_every_worker(answers[rank])
    finally:
        dist.destroy_process_group()


def test_a_split_is_kept_in_memory_only_where_every_worker_can() -> None:
    """Two workers over gloo, as Ray Train's are: the first can keep its share of the
    train split (its node has the memory), the second cannot; both can keep val's.
    Both then stream train and keep val: none streams while another waits for it."""
    agreed = mp.Manager().dict()
    answers = [[True, True], [False, True]]
    mp.spawn(_answer, args=(free_port(), answers, agreed), nprocs=2, join=True)
    assert dict(agreed) == {0: [False, True], 1: [False, True]}


def test_a_kept_slice_is_read_and_shuffled_alike_in_every_run(tmp_path: Path) -> None:
    """What a worker that keeps its share of a split holds: an equal slice of the rows in
    stored order (four workers: 449 rows each of digits' 1,797, none twice, and the one
    left over dropped, as Ray's equal split drops it), as model inputs; batches
    shuffled by the seed and the epoch alone, so that a second run of the same job gets
    the same ones and the next epoch others."""
    digits = get_workload("digits")
    rows = digits.builtin_source()
    for i, part in enumerate(np.array_split(np.arange(len(rows)), 2)):
        table = pa.Table.from_pandas(rows.iloc[part], preserve_index=False)
        pq.write_table(table, tmp_path / f"part-{i}.parquet", row_group_size=500)
    job = TrainJob(
        workload="digits", tier="cheap", dataset_version="v", train_rows=len(rows),
        val_rows=0, seed=7, train=TrainConfig(), deepspeed={}, tracking_uri="sqlite://",
        mlflow_run_id="r", split_dirs={"train": str(tmp_path)},
    )  # fmt: skip

    def feeds() -> list[Feed]:
        return [Feed("train", job, share=(i, 4), keep=True) for i in range(4)]

    stored = [
        torch.cat([y for _, y in f.batches(64, epoch=None, drop_last=False)]) for f in feeds()
    ]
    assert [len(s) for s in stored] == [449] * 4
    assert torch.cat(stored).tolist() == rows["label"].tolist()[:1796]
    x, _ = next(feeds()[1].batches(449, epoch=None, drop_last=False))
    expected = digits.features(rows.iloc[449:898]).astype(np.float32)
    assert x.dtype == torch.float32 and np.array_equal(x.numpy(), expected)

    def epoch(feed: Feed, n: int) -> list[list[int]]:
        return [y.tolist() for _, y in feed.batches(64, epoch=n, drop_last=True)]

    first, again = feeds()[0], feeds()[0]
    assert epoch(first, 1) == epoch(again, 1)
    assert epoch(first, 1) != epoch(first, 2)
    assert sorted(sum(epoch(first, 1), [])) != sum(epoch(first, 1), [])  # shuffled
    assert len(epoch(first, 1)) == 449 // 64  # whole batches only
