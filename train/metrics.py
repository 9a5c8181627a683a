"""Training's Prometheus series, in one place, with fixed tag keys.

Rank 0 of a run reports them with ``ray.util.metrics``; Ray exports them as
``ray_<name>`` (the counter with ``_total``), tagged ``workload``, ``tier`` and ``run_id``
(the run's name, the one ``--resume`` takes). Only rank 0, so a run is one series
whatever its number of workers: the samples it counts are its own times the data-parallel
width, as the MLflow figures are (every data-parallel rank trains an equal share).

Ray 2.60's export drops a gauge that was not set again within two report intervals
(``RAY_metrics_report_interval_ms``, 10 s by default), as it drops those of a process
that ended. So rank 0 publishes from a thread of its own every ``PUBLISH_EVERY_S``: the
gauges stay while the run's worker lives, also when its loop hangs in a collective (what
the training-stalled alert must see, ``time() - last step`` growing), and go when the run
ends. The loop only updates :class:`LiveFigures`, one tuple per micro-batch: no Ray call
on the training path.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

TAG_KEYS = ("workload", "tier", "run_id")
PUBLISH_EVERY_S = 1.0  # at most the export's shortest report interval (1 s)


class LiveFigures:
    """What the training loop has done so far, updated by the loop, read by a publisher.

    ``totals`` is replaced whole (one tuple per micro-batch), so a reader on another
    thread never sees rows of one update with the loss of another.
    """

    def __init__(self, data_parallel: int, clock: Callable[[], float] = time.time) -> None:
        self.data_parallel = data_parallel
        self.clock = clock
        # rows, sum of loss x rows, unix time of the last optimizer step (None: none yet)
        self.totals: tuple[int, float, float | None] = (0, 0.0, None)
        self.epoch: int | None = None
        self.checkpoint_at: float | None = None

    def add(self, rows: int, loss: float, *, stepped: bool) -> None:
        """One micro-batch of this worker; ``stepped``: the optimizer stepped after it."""
        done, loss_sum, last_step = self.totals
        self.totals = (done + rows, loss_sum + loss * rows, self.clock() if stepped else last_step)

    def checkpointed(self) -> None:
        self.checkpoint_at = self.clock()


class Series(Protocol):
    def samples(self, n: int) -> None: ...
    def loss(self, value: float) -> None: ...
    def epoch(self, value: int) -> None: ...
    def last_step(self, at: float) -> None: ...
    def checkpoint(self, at: float) -> None: ...


class RunSeries:
    """The Ray series of one run, its tags fixed when it is made (rank 0's process)."""

    def __init__(self, workload: str, tier: str, run_id: str) -> None:
        from ray.util import metrics

        tags = {"workload": workload, "tier": tier, "run_id": run_id}

        def made(kind: type, name: str, description: str):  # noqa: ANN202 - a Ray metric
            metric = kind(name, description=description, tag_keys=TAG_KEYS)
            metric.set_default_tags(tags)
            return metric

        self._samples = made(
            metrics.Counter,
            "scaledl_train_samples",
            "Training samples processed by the run, all data-parallel workers together "
            "(rate(): samples/s). A worker replaced after a failure counts its epoch again.",
        )
        self._loss = made(
            metrics.Gauge,
            "scaledl_train_loss",
            "Mean training loss of rank 0's micro-batches since the last update (about 1 s).",
        )
        self._epoch = made(
            metrics.Gauge, "scaledl_train_epoch", "The epoch in progress, 0-based as in MLflow."
        )
        self._last_step = made(
            metrics.Gauge,
            "scaledl_train_last_step_timestamp_seconds",
            "Unix time of the run's last optimizer step: time() minus it is how long the "
            "run has made no progress.",
        )
        self._checkpoint = made(
            metrics.Gauge,
            "scaledl_train_checkpoint_timestamp_seconds",
            "Unix time of the run's last checkpoint (absent before its first one in this "
            "attempt): time() minus it is the checkpoint's age.",
        )

    def samples(self, n: int) -> None:
        self._samples.inc(n)

    def loss(self, value: float) -> None:
        self._loss.set(value)

    def epoch(self, value: int) -> None:
        self._epoch.set(value)

    def last_step(self, at: float) -> None:
        self._last_step.set(at)

    def checkpoint(self, at: float) -> None:
        self._checkpoint.set(at)


class Publisher:
    """Sets the series from the figures, every ``every_s`` on its own thread, and once
    more when closed; each gauge is set again every time, changed or not."""

    def __init__(
        self, figures: LiveFigures, series: Series, every_s: float = PUBLISH_EVERY_S
    ) -> None:
        self.figures, self.series, self.every_s = figures, series, every_s
        self.rows_seen, self.loss_seen = 0, 0.0
        self.last_loss: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scaledl-train-metrics", daemon=True)

    def publish(self) -> None:
        figures = self.figures
        rows, loss_sum, last_step = figures.totals
        if rows > self.rows_seen:
            self.series.samples((rows - self.rows_seen) * figures.data_parallel)
            self.last_loss = (loss_sum - self.loss_seen) / (rows - self.rows_seen)
            self.rows_seen, self.loss_seen = rows, loss_sum
        if self.last_loss is not None:
            self.series.loss(self.last_loss)
        if last_step is not None:
            self.series.last_step(last_step)
        if figures.epoch is not None:
            self.series.epoch(figures.epoch)
        if figures.checkpoint_at is not None:
            self.series.checkpoint(figures.checkpoint_at)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10 * self.every_s)
        self.publish()  # the last figures, the end of the last epoch included

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.publish()


@contextlib.contextmanager
def published(figures: LiveFigures, workload: str, tier: str) -> Iterator[None]:
    """On rank 0, publish ``figures`` as the run's series while the block runs; the
    other ranks keep their figures unpublished (one series per run)."""
    import ray.train

    context = ray.train.get_context()
    if context.get_world_rank() != 0:
        yield
        return
    publisher = Publisher(figures, RunSeries(workload, tier, context.get_experiment_name()))
    publisher.start()
    try:
        yield
    finally:
        publisher.close()
