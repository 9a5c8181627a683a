"""Concurrent calls to one tier sent as one call: the ingress's half of dynamic batching.

Every call to a tier deployment costs the ingress the same, whatever it carries: Serve's
router picks a replica, the arguments are serialized, the call is submitted and its
answer awaited. With one call per request that cost was most of the ingress's CPU
(bench/serve.py, py-spy). A :class:`Coalescer` keeps at most ``max_in_flight`` calls
out per tier; requests that reach the tier while they are out wait and go together, as
one call, when one returns. There is no timer: at low load each call goes out alone and
at once, and under load a call carries as many requests' rows as arrived meanwhile. The
tier's ``@serve.batch`` then joins the calls of every ingress replica into forward passes.

Serve's own ``@serve.batch`` cannot play this part: its queue belongs to the decorated
function, not to an instance, and an ingress needs one per tier and routed version.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import numpy as np

from serve_graphs.cascade import Instances, TierAnswer, TierFn, concat


class Coalescer:
    """A :data:`TierFn` that sends concurrent calls to ``fn`` as one.

    ``call_timeout_s`` bounds each combined call, so a tier call that never returns
    cannot hold a slot (and everyone waiting behind it) for ever; callers keep their own
    deadlines (the cascade's expensive-tier timeout, the request timeout) on top.
    """

    def __init__(
        self, fn: TierFn, *, max_in_flight: int, max_rows: int, call_timeout_s: float
    ) -> None:
        if max_in_flight < 1 or max_rows < 1:
            raise ValueError("max_in_flight and max_rows must be at least 1")
        self.fn = fn
        self.max_in_flight = max_in_flight
        self.max_rows = max_rows
        self.call_timeout_s = call_timeout_s
        self.waiting: deque[tuple[Instances, asyncio.Future[TierAnswer]]] = deque()
        self.in_flight = 0
        self.calls = 0  # combined calls sent, for tests and the bench
        self._tasks: set[asyncio.Task] = set()

    async def __call__(self, instances: Instances) -> TierAnswer:
        future: asyncio.Future[TierAnswer] = asyncio.get_running_loop().create_future()
        self.waiting.append((instances, future))
        self._send_waiting()
        return await future

    def _send_waiting(self) -> None:
        while self.waiting and self.in_flight < self.max_in_flight:
            batch = self._next_batch()
            if not batch:
                continue
            self.in_flight += 1
            self.calls += 1
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)  # a reference, so the task is not collected mid-call
            task.add_done_callback(self._tasks.discard)

    def _next_batch(self) -> list[tuple[Instances, asyncio.Future[TierAnswer]]]:
        """The oldest waiting calls, up to ``max_rows`` rows (always at least one call);
        callers that gave up meanwhile are left out."""
        batch, rows = [], 0
        while self.waiting:
            instances, future = self.waiting[0]
            if future.done():  # cancelled: its client or its deadline is gone
                self.waiting.popleft()
                continue
            if batch and rows + len(instances) > self.max_rows:
                break
            batch.append(self.waiting.popleft())
            rows += len(instances)
        return batch

    async def _send(self, batch: list[tuple[Instances, asyncio.Future[TierAnswer]]]) -> None:
        futures = [future for _, future in batch]
        started = time.perf_counter()
        try:
            answer = await asyncio.wait_for(
                self.fn(concat([instances for instances, _ in batch])), self.call_timeout_s
            )
        except Exception as exc:  # the same failure for everyone in the call
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
        else:
            # Each request is charged its rows' share of the call's time (the cost
            # report), not the whole call and its wait for a slot.
            per_row = (time.perf_counter() - started) / len(answer.probs)
            bounds = np.cumsum([len(instances) for instances, _ in batch])[:-1]
            for future, probs in zip(futures, np.split(answer.probs, bounds), strict=True):
                if not future.done():
                    future.set_result(TierAnswer(probs, answer.version, per_row * len(probs)))
        finally:
            for future in futures:  # this task itself was cancelled (the loop is closing)
                if not future.done():
                    future.cancel()
            self.in_flight -= 1
            self._send_waiting()
