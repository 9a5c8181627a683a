"""train/feeds.py: what the workers of a run agree on before they read."""

from __future__ import annotations

import os

import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import free_port


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
