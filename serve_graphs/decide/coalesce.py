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
(``cascade.call_of``), so a circuit breaker counts it once; so is a deadline that
passes while the call is out.

Waiting is bounded: a request that finds every call slot taken and ``max_waiting_rows``
rows already waiting is refused at once (:class:`~app.errors.Overloaded`, a 503 with
Retry-After), rather than queued until its deadline.
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

from app.errors import Overloaded
from serve_graphs.decide.cascade import SHARED_CALL, Instances, concat


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
    call: object | None = None  # the combined call that carries these rows, once sent
    counted: bool = True  # its rows count against max_waiting_rows while it waits


class Coalescer(Generic[A]):
    """A call of rows (a :data:`~serve_graphs.decide.cascade.TierFn`, say) that sends
    concurrent calls to ``fn`` as one.

    ``max_in_flight`` may be a function, read whenever a call could go out: a caller
    allows a few calls per running tier replica, so a tier that scales out gets more.
    ``max_rows`` may be one too (a batch size that a new configuration changes), and so
    may ``max_waiting_rows``. ``timeout_s`` is each caller's deadline, waiting included:
    past it the caller gets a TimeoutError that names the call it waited on
    (``cascade.call_of``), so a breaker counts one slow call once. A call whose callers
    have all given up is cancelled, freeing its slot at once. ``tag`` names the calling
    request (read in the caller's context); ``name`` the tier, for errors.
    """

    def __init__(
        self,
        fn: Callable[[Instances], Awaitable[A]],
        *,
        max_in_flight: int | Callable[[], int],
        max_rows: int | Callable[[], int],
        max_waiting_rows: int | Callable[[], int],
        timeout_s: float,
        name: str = "called",
        tag: Callable[[], str] = lambda: "",
    ) -> None:
        self.max_in_flight = _at_least_one(max_in_flight, "max_in_flight")
        self.max_rows = _at_least_one(max_rows, "max_rows")
        self.max_waiting_rows = _at_least_one(max_waiting_rows, "max_waiting_rows")
        self.fn = fn
        self.timeout_s = timeout_s
        self.name = name
        self.tag = tag
        self.waiting: deque[_Waiting[A]] = deque()
        self.waiting_rows = 0  # rows of the callers in ``waiting`` that still wait
        self.in_flight = 0
        self._calls: dict[asyncio.Task, object] = {}  # in flight, oldest first

    async def __call__(self, instances: Instances) -> A:
        if (  # a request alone in the wait gets in, however large
            self.waiting_rows
            and self.in_flight >= max(1, self.max_in_flight())
            and self.waiting_rows + len(instances) > self.max_waiting_rows()
        ):
            raise Overloaded(
                f"the {self.name} tier is at capacity ({self.waiting_rows} rows wait for "
                "it): retry shortly"
            )
        future: asyncio.Future[A] = asyncio.get_running_loop().create_future()
        waiting = _Waiting(instances, future, self.tag())
        self.waiting.append(waiting)
        self.waiting_rows += len(instances)
        self._send_waiting()
        deadline = asyncio.timeout(self.timeout_s)
        try:
            async with deadline:
                return await future
        except TimeoutError:
            if not deadline.expired():  # the call itself failed with a timeout
                raise
            raise self._timed_out(waiting) from None
        finally:
            if waiting.call is None and waiting.counted:  # gave up before it was sent
                waiting.counted = False
                self.waiting_rows -= len(instances)

    def _timed_out(self, waiting: _Waiting) -> TimeoutError:
        """A caller's deadline passed: blame the call it was on, or, while it still
        waited, the oldest call out (the one holding the slot it waited for)."""
        exc = TimeoutError(f"no answer from the {self.name} tier within {self.timeout_s:g} s")
        setattr(exc, SHARED_CALL, waiting.call or next(iter(self._calls.values()), None))
        return exc

    def _send_waiting(self) -> None:
        loop = asyncio.get_running_loop()
        while self.waiting and self.in_flight < max(1, self.max_in_flight()):
            batch = self._next_batch()
            if not batch:  # only callers that had given up were waiting
                break
            self.in_flight += 1
            call = object()  # names the call in its callers' failures
            context = contextvars.Context()  # the call's own: no request's, see above
            context.run(_callers.set, tuple(w.tag for w in batch))
            task = loop.create_task(self._call(batch, call), context=context)
            self._calls[task] = call  # a reference, so the task is not collected mid-call
            task.add_done_callback(functools.partial(self._done, batch))
            for w in batch:
                w.call = call
                w.future.add_done_callback(functools.partial(_gave_up, batch, task))

    def _done(self, batch: list[_Waiting], task: asyncio.Task) -> None:
        """A call ended (answered, failed, timed out, or cancelled, even before it
        started): its slot is free, and no caller of it waits any more."""
        for w in batch:
            if not w.future.done():
                w.future.cancel()
        del self._calls[task]
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
                self.waiting.popleft()  # its rows stopped counting when it gave up
                continue
            if batch and rows + len(first.rows) > limit:
                break
            batch.append(self.waiting.popleft())
            first.counted = False
            rows += len(first.rows)
        self.waiting_rows -= rows
        return batch

    async def _call(self, batch: list[_Waiting], call: object) -> None:
        started = time.perf_counter()
        try:
            # No deadline of its own: its callers have theirs, and once they all gave
            # up the call is cancelled (_gave_up).
            answer = await self.fn(concat([w.rows for w in batch]))
            rows = [len(w.rows) for w in batch]
            if len(answer) != sum(rows):
                raise RuntimeError(f"the tier answered {len(answer)} rows of {sum(rows)}")
        except Exception as exc:  # noqa: BLE001 - every caller's failure, one call's
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


def _at_least_one(value: int | Callable[[], int], name: str) -> Callable[[], int]:
    """A limit as a function; a fixed one below 1 is refused now."""
    if callable(value):
        return value
    if value < 1:
        raise ValueError(f"{name} must be at least 1")
    return lambda: value


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
