"""A tier replica's logic without Ray (serve_graphs/decide/tier.py): the swap, the
chunking of large requests, the retry of a request whose chunks straddled a swap, the
grouping of a batch's rows by version."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np

from serve_graphs.decide.tier import TierModelRef, TierRunner
from tests.unit.graph import tier


class Constant:
    """A model that answers ``p`` for label 0 for every row, and records each pass."""

    def __init__(self, p: float, delay_s: float = 0.0) -> None:
        self.p, self.delay_s = p, delay_s
        self.passes: list[int] = []
        self.threads: set[str] = set()

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        self.passes.append(len(rows))
        self.threads.add(threading.current_thread().name)
        if self.delay_s:
            time.sleep(self.delay_s)
        return np.tile([[self.p, 1 - self.p]], (len(rows), 1))


def runner(version: str, p: float = 0.9, delay_s: float = 0.0) -> TierRunner:
    return TierRunner(Constant(p, delay_s), version)


def test_a_large_request_runs_in_batch_sized_chunks_and_answers_in_order() -> None:
    t = tier(runner("digits-cheap/1"), max_rows=4)
    rows = np.arange(10, dtype=float).reshape(10, 1)
    probs, version = asyncio.run(t.predict(rows))
    assert version == "digits-cheap/1" and probs.shape == (10, 2)
    assert sorted(t.runner.model.passes) == [2, 4, 4]


def test_rows_of_pinned_and_routed_versions_in_one_batch_run_one_pass_per_version() -> None:
    routed = runner("digits-cheap/4", p=0.7)
    t = tier(runner("digits-cheap/1"), routed={"digits-cheap/4": routed})

    async def together() -> list:
        return await asyncio.gather(
            t.predict(np.zeros((2, 1))),
            t.predict(np.zeros((3, 1)), "digits-cheap/4"),
            t.predict(np.zeros((1, 1))),
        )

    (a, va), (b, vb), (c, vc) = asyncio.run(together())
    assert (va, vb, vc) == ("digits-cheap/1", "digits-cheap/4", "digits-cheap/1")
    assert a[0, 0] == c[0, 0] == 0.9 and b[0, 0] == 0.7
    assert t.runner.model.passes == [3] and routed.model.passes == [3]  # one pass each


def test_a_request_named_by_the_pinned_model_id_uses_the_pinned_runner() -> None:
    t = tier(runner("digits-cheap/1"))
    t.swap(t.runner, TierModelRef(registered_name="digits-cheap", model_ref="1"))
    _, version = asyncio.run(t.predict(np.zeros((1, 1)), "digits-cheap/1"))
    assert version == "digits-cheap/1"


def test_a_swap_lands_between_batches_and_a_straddling_request_runs_again() -> None:
    """A swap that lands while a multi-chunk request is in the batcher would answer it
    with two versions; it runs again, so one version answers every row."""
    old, new = runner("digits-cheap/1", p=0.9), runner("digits-cheap/2", p=0.6)
    t = tier(old, max_rows=2)
    submit = t.submit
    swapped = []

    async def swap_after_first_chunk(work):  # noqa: ANN001, ANN202
        answer = await submit(work)
        if not swapped:  # the first chunk ran on the old version: swap now
            swapped.append(t.swap(new, TierModelRef(registered_name="digits-cheap", model_ref="2")))
        return answer

    t.submit = swap_after_first_chunk
    probs, version = asyncio.run(t.predict(np.zeros((5, 1))))
    assert swapped == ["digits-cheap/1"]
    assert version == "digits-cheap/2" and np.all(probs[:, 0] == 0.6)  # all rows, one version
