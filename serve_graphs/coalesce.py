"""Concurrent calls to one tier sent as one call: the caller's half of dynamic batching.
The callers are the ingress (to the cheap tier) and the cheap tier (to the expensive
tier, when it escalates).

Every call to a tier deployment costs its caller the same, whatever it carries: Serve's
router picks a replica, the arguments are serialized, the call is submitted and its
answer awaited. With one call per request that cost was most of the ingress's CPU
(bench/serve.py, py-spy). A :class:`Coalescer` keeps at most ``max_in_flight`` calls
out per tier; requests that reach the tier while they are out wait and go together, as
one call, when one returns. There is no timer: at low load each call goes out alone and
at once, and under load a call carries as many requests' rows as arrived meanwhile. The
tier's ``@serve.batch`` then joins the calls of all its callers' replicas into forward
passes.

Serve's own ``@serve.batch`` cannot play this part: its queue belongs to the decorated
function, not to an instance, and a caller needs one per tier and routed version.

A combined call belongs to none of its requests: it runs in a context of its own, so a
client that leaves cancels its own wait but never the call that carries other
requests' rows (Serve cancels a request's child calls with it). The requests' tags
(their request ids, for the tier's log) are readable inside the call with
:func:`callers`. One failure is every caller's, as a copy that names the call
(``cascade.call_of``), so a circuit breaker counts it once.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import functools
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, Self, TypeVar

from serve_graphs.cascade import SHARED_CALL, Instances, concat


class Answer(Protocol):
    """What a coalesced call returns: one row's answer per row sent, divisible among the
    callers (``TierAnswer``: a tier's probabilities; ``CascadeAnswer``: predictions)."""

    def __len__(self) -> int: ...

    def split(self, rows: list[int], seconds: float) -> list[Self]: ...


A = TypeVar("A", bound=Answer)

_callers: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "scaledl_coalesced_callers", default=()
)


def callers() -> tuple[str, ...]:
    """Inside a combined call: the tags of the requests whose rows it carries."""
    return _callers.get()


def carrying(tags: tuple[str, ...]) -> None:
    """The current task works on the rows of these requests: a tier that was called with
    them, and calls on (the cheap tier escalating), names them to its own callee."""
    _callers.set(tags)


@dataclass
class _Waiting(Generic[A]):
    rows: Instances
    future: asyncio.Future[A]
    tag: str


class Coalescer(Generic[A]):
    """A call of rows (a :data:`~serve_graphs.cascade.TierFn`, say) that sends
    concurrent calls to ``fn`` as one.

    ``max_in_flight`` may be a function, read whenever a call could go out: a caller
    allows a few calls per running tier replica, so a tier that scales out gets more.
    ``max_rows`` may be one too (a batch size that a new configuration changes).
    ``call_timeout_s`` bounds each combined call, so a tier call that never returns
    cannot hold a slot (and everyone waiting behind it) for ever; callers keep their own
    deadlines on top. A call whose callers have all given up is cancelled, freeing its
    slot at once. ``tag`` names the calling request (read in the caller's context).
    """

    def __init__(
        self,
        fn: Callable[[Instances], Awaitable[A]],
        *,
        max_in_flight: int | Callable[[], int],
        max_rows: int | Callable[[], int],
        call_timeout_s: float,
        tag: Callable[[], str] = lambda: "",
    ) -> None:
        fixed = None if callable(max_in_flight) else max_in_flight
        rows = None if callable(max_rows) else max_rows
        if (fixed is not None and fixed < 1) or (rows is not None and rows < 1):
            raise ValueError("max_in_flight and max_rows must be at least 1")
        self.fn = fn
        self.max_in_flight = max_in_flight if fixed is None else lambda: fixed
        self.max_rows = max_rows if rows is None else lambda: rows
        self.call_timeout_s = call_timeout_s
        self.tag = tag
        self.waiting: deque[_Waiting[A]] = deque()
        self.in_flight = 0
        self._tasks: set[asyncio.Task] = set()

    async def __call__(self, instances: Instances) -> A:
        future: asyncio.Future[A] = asyncio.get_running_loop().create_future()
        self.waiting.append(_Waiting(instances, future, self.tag()))
        self._send_waiting()
        return await future

    def _send_waiting(self) -> None:
        loop = asyncio.get_running_loop()
        while self.waiting and self.in_flight < max(1, self.max_in_flight()):
            batch = self._next_batch()
            if not batch:  # only callers that had given up were waiting
                break
            self.in_flight += 1
            context = contextvars.Context()  # the call's own: no request's, see above
            context.run(_callers.set, tuple(w.tag for w in batch))
            task = loop.create_task(self._call(batch), context=context)
            self._tasks.add(task)  # a reference, so the task is not collected mid-call
            task.add_done_callback(functools.partial(self._done, batch))
            for w in batch:
                w.future.add_done_callback(functools.partial(_gave_up, batch, task))

    def _done(self, batch: list[_Waiting], task: asyncio.Task) -> None:
        """A call ended (answered, failed, timed out, or cancelled, even before it
        started): its slot is free, and no caller of it waits any more."""
        for w in batch:
            if not w.future.done():
                w.future.cancel()
        self._tasks.discard(task)
        self.in_flight -= 1
        if self.waiting:
            self._send_waiting()

    def _next_batch(self) -> list[_Waiting]:
        """The oldest waiting calls, up to ``max_rows`` rows (always at least one call);
        callers that gave up meanwhile are left out."""
        batch: list[_Waiting] = []
        rows, limit = 0, self.max_rows()
        while self.waiting:
            first = self.waiting[0]
            if first.future.done():  # cancelled: its client or its deadline is gone
                self.waiting.popleft()
                continue
            if batch and rows + len(first.rows) > limit:
                break
            batch.append(self.waiting.popleft())
            rows += len(first.rows)
        return batch

    async def _call(self, batch: list[_Waiting]) -> None:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.call_timeout_s):  # see Cascade._expensive
                answer = await self.fn(concat([w.rows for w in batch]))
            rows = [len(w.rows) for w in batch]
            if len(answer) != sum(rows):
                raise RuntimeError(f"the tier answered {len(answer)} rows of {sum(rows)}")
        except Exception as exc:  # noqa: BLE001 - every caller's failure, one call's
            call = object()
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(_copy_for_caller(exc, call))
            return
        # Each request is charged its rows' share of the call's time (the cost report),
        # not the whole call and its wait for a slot.
        parts = answer.split(rows, time.perf_counter() - started)
        for w, part in zip(batch, parts, strict=True):
            if not w.future.done():
                w.future.set_result(part)


def _gave_up(batch: list[_Waiting], task: asyncio.Task, _: asyncio.Future) -> None:
    """A caller's future is done: cancel the call once nobody waits for it any more."""
    if not task.done() and all(w.future.done() for w in batch):
        task.cancel()


def _copy_for_caller(exc: Exception, call: object) -> Exception:
    """A caller's own copy of a shared failure (its traceback stays its own), naming
    the call it came from."""
    try:
        mine = copy.copy(exc)
    except Exception:  # noqa: BLE001 - an exception that cannot be copied is shared
        mine = exc
    mine.__cause__ = exc.__cause__
    setattr(mine, SHARED_CALL, call)
    return mine
