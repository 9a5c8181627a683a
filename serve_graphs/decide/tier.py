"""A model tier's replica, free of Ray: which loaded version answers which rows, in
which forward pass, and, in the cheap tier, the cascade.

:class:`Tier` holds the pinned version (the deployment's ``user_config``) and swaps it
in one assignment; splits a request larger than a batch into batch-sized chunks; runs a
request again when its chunks straddled a swap, so one version answers it all; and
groups a batch's rows by version, one forward pass each. The forward passes run on the
replica's event loop: on a thread of their own they measured slower (bench/results/
2026-12-02-serve.md: 624 against 802 req/s at 64 clients, p99 189 against 147 ms, the
same store and hour), since a batch of these models takes about a millisecond and the
hand-off to a thread and back costs the loop more than it frees. Its
:meth:`Tier.predict` and :meth:`Tier.cascade` are the deployment's Serve methods, as
callers call them.

The Serve deployment (``serve_graphs/tier_model.py``) wires it: its ``@serve.batch``
method is the batcher (``submit``), Serve's model multiplexing loads routed versions
(``routed``), and a handle to the expensive tier makes ``expensive``. Unit tests pass
plain functions for the first two and the same caller over a stand-in handle.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from app.model_artifact import LoadedModel
from serve_graphs.decide.cascade import (
    Cascade,
    CascadeAnswer,
    CascadeRoute,
    Instances,
    TierAnswer,
    TierFn,
    concat,
    take,
)
from serve_graphs.decide.coalesce import carrying

log = logging.getLogger("ray.serve")
MAX_STRADDLES = 3  # tries for a multi-chunk request to land on one side of a swap


class TierModelRef(BaseModel):
    """Which model version a tier serves."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    registered_name: str = Field(description="Registry name, e.g. digits-cheap.")
    model_ref: str = Field("champion", description="Alias or version number to load.")

    @property
    def model_id(self) -> str:
        """``name/ref``: how a caller names it to a tier replica (multiplexed id)."""
        return f"{self.registered_name}/{self.model_ref}"

    @classmethod
    def from_id(cls, model_id: str) -> TierModelRef:
        name, _, ref = model_id.rpartition("/")
        return cls(registered_name=name, model_ref=ref)


class TierRunner:
    """A loaded model version that turns raw rows into probabilities."""

    def __init__(self, model: LoadedModel, version: str) -> None:
        self.model = model
        self.version = version

    def predict_many(self, batches: list[Instances]) -> list[np.ndarray]:
        """Run several requests' rows as one forward pass and split the answer back."""
        probs = self.model.predict_proba(concat(batches))
        return np.split(probs, np.cumsum([len(b) for b in batches])[:-1])


@dataclass(frozen=True)
class Work:
    """Rows of one request for the batcher, and the version to run them with (None: the
    pinned version, taken when the batch runs, so a swap lands between batches)."""

    rows: Instances
    runner: TierRunner | None = None

    def __len__(self) -> int:
        return len(self.rows)


def batch_rows(batch: list[Work]) -> int:
    """Batch size in rows, not requests: one 64-row request fills a 64-row batch."""
    return sum(len(w) for w in batch)


Probs = tuple[np.ndarray, str]  # (probabilities (n, C), the version that made them)


class Tier:
    """One tier replica's models and how rows reach them.

    ``submit(work)`` hands one chunk to the batcher, which calls :meth:`run_batch` with
    the chunks it gathered; ``routed(model_id)`` loads (or finds loaded) a version other
    than the pinned one. ``expensive(model_id)``, in the cheap tier only: the caller of
    the expensive tier for that version, which the cascade escalates to.
    """

    def __init__(
        self,
        submit: Callable[[Work], Awaitable[Probs]],
        routed: Callable[[str], Awaitable[TierRunner]],
        *,
        max_rows: int,
        busy: Callable[[], object] | None = None,
        expensive: Callable[[str | None], TierFn] | None = None,
        breaker_failures: int = 5,
        breaker_reset_s: float = 10.0,
    ) -> None:
        self.submit = submit
        self.routed = routed
        self.escalation = (
            None
            if expensive is None
            else Cascade(
                self._answer,
                expensive,
                breaker_failures=breaker_failures,
                breaker_reset_s=breaker_reset_s,
            )
        )
        self.max_rows = max_rows
        self.busy = busy  # a context manager around each batch (the autoscaling meter)
        self.runner: TierRunner | None = None
        self.loaded: TierModelRef | None = None

    def swap(self, runner: TierRunner, ref: TierModelRef) -> str | None:
        """Serve ``runner`` from the next batch on; the version it replaced, if any."""
        previous = self.runner.version if self.runner else None
        self.runner, self.loaded = runner, ref  # the swap: one assignment
        return previous

    def pins(self, model_id: str) -> bool:
        return self.loaded is not None and model_id == self.loaded.model_id

    async def predict(
        self, instances: Instances, model_id: str | None = None, requests: tuple[str, ...] = ()
    ) -> Probs:
        """Probabilities (n, C) for raw rows, and the version that produced them:
        ``model_id`` (``name/version``), or the pinned version when it is None.

        ``requests``: the ids of the HTTP requests whose rows the call carries (its
        caller sends several requests' rows as one call); logged, so a request id leads
        to the tier's log line of the call that answered it."""
        if any(requests):
            log.info("rows of requests %s", " ".join(requests))
        return await self._probs(instances, model_id)

    async def cascade(
        self, instances: Instances, route: CascadeRoute, requests: tuple[str, ...] = ()
    ) -> CascadeAnswer:
        """The cascade's predictions for raw rows: this tier answers, and sends the rows
        it is unsure of on to the expensive tier. ``route`` names the cascade (its
        models and thresholds); ``requests`` as for :meth:`predict`."""
        if self.escalation is None:
            raise RuntimeError("only the cheap tier runs the cascade: call predict here")
        if any(requests):
            log.info("rows of requests %s", " ".join(requests))
            carrying(requests)  # named to the expensive tier in turn
        return await self.escalation(instances, route)

    async def _answer(self, instances: Instances, model_id: str | None) -> TierAnswer:
        return TierAnswer(*await self._probs(instances, model_id))

    async def _probs(self, instances: Instances, model_id: str | None) -> Probs:
        """A request larger than a batch is split into batch-sized chunks, which join
        other requests' rows in the batcher; chunks that straddled a swap run again."""
        routed = None  # None: the pinned version when the batch runs (swaps land between)
        if model_id is not None:  # this version and no other, even if a swap lands now
            routed = self.runner if self.pins(model_id) else await self.routed(model_id)
        step = self.max_rows
        chunks = [
            Work(take(instances, slice(i, i + step)), routed)
            for i in range(0, len(instances), step)
        ]
        for _ in range(MAX_STRADDLES):
            answers = await asyncio.gather(*(self.submit(c) for c in chunks))
            if len({version for _, version in answers}) == 1:
                break
        return np.concatenate([probs for probs, _ in answers]), answers[-1][1]

    async def run_batch(self, batch: list[Work]) -> list[Probs]:
        """One forward pass per version in the batch (most batches hold one), on the
        event loop (see the module's docstring for why)."""
        pinned = self.runner  # one version for the whole batch, even if a swap lands now
        if pinned is None and any(w.runner is None for w in batch):
            raise RuntimeError("no model loaded yet: reconfigure has not run")
        return self._forward(batch, pinned)

    def _forward(self, batch: list[Work], pinned: TierRunner | None) -> list[Probs]:
        by_runner: dict[int, list[int]] = {}
        for i, work in enumerate(batch):
            by_runner.setdefault(id(work.runner or pinned), []).append(i)
        answers: list[Probs] = [None] * len(batch)  # type: ignore[list-item]
        with self.busy() if self.busy else _nothing():
            for positions in by_runner.values():
                runner = batch[positions[0]].runner or pinned
                parts = runner.predict_many([batch[i].rows for i in positions])
                for i, probs in zip(positions, parts, strict=True):
                    answers[i] = (probs, runner.version)
        return answers


class _nothing:  # noqa: N801 - a null context manager, cheaper than contextlib's
    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        pass
