"""Training's live series: what rank 0 publishes from what the loop did (no Ray here;
tests/integration/test_train.py reads them from a live node's export)."""

from __future__ import annotations

import time

import pytest

from tests.conftest import FakeClock
from train.metrics import LiveFigures, Publisher


class Recorded:
    """A Series that keeps every call, as the Ray one would set it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def __getattr__(self, name: str):  # noqa: ANN204 - samples, loss, epoch, ...
        return lambda value: self.calls.append((name, value))

    def last(self, name: str) -> float | None:
        values = [v for n, v in self.calls if n == name]
        return values[-1] if values else None

    def total(self, name: str) -> float:
        return sum(v for n, v in self.calls if n == name)


def test_samples_count_every_data_parallel_worker_once_and_loss_is_the_windows_mean() -> None:
    clock = FakeClock()
    figures, series = LiveFigures(data_parallel=2, clock=clock), Recorded()
    publisher = Publisher(figures, series)
    figures.epoch = 0
    clock.now = 100.0
    figures.add(16, 2.0, stepped=False)  # accumulating: no optimizer step yet
    figures.add(16, 1.0, stepped=True)
    publisher.publish()
    assert series.total("samples") == 64  # rank 0's 32 rows x 2 data-parallel ranks
    assert series.last("loss") == pytest.approx(1.5)
    assert series.last("last_step") == 100.0
    assert series.last("epoch") == 0
    assert series.last("checkpoint") is None  # none yet: absent, not 0

    clock.now = 101.0
    figures.add(8, 0.5, stepped=False)  # rows after the last step
    figures.epoch = 1
    figures.checkpointed()
    publisher.publish()
    assert series.total("samples") == 80  # only the new rows: counted once
    assert series.last("loss") == pytest.approx(0.5)  # this window's rows only
    assert series.last("last_step") == 100.0  # no step since
    assert (series.last("epoch"), series.last("checkpoint")) == (1, 101.0)


def test_a_run_that_makes_no_progress_keeps_every_gauge_set_at_its_last_value() -> None:
    """Ray drops a gauge not set again within two report intervals: a stalled run
    must still show its last step (and time() - it growing), or no alert could fire."""
    clock = FakeClock()
    figures, series = LiveFigures(data_parallel=1, clock=clock), Recorded()
    publisher = Publisher(figures, series)
    clock.now = 50.0
    figures.add(16, 0.7, stepped=True)
    figures.epoch = 3
    figures.checkpointed()
    publisher.publish()
    series.calls.clear()
    for _ in range(3):  # stuck: nothing new from the loop
        clock.now += 60
        publisher.publish()
    assert [n for n, _ in series.calls].count("last_step") == 3
    assert {v for n, v in series.calls if n == "last_step"} == {50.0}
    assert [v for n, v in series.calls if n == "loss"] == pytest.approx([0.7] * 3)
    assert [n for n, _ in series.calls].count("epoch") == 3
    assert [n for n, _ in series.calls].count("checkpoint") == 3
    assert series.total("samples") == 0


def test_nothing_is_published_before_the_first_micro_batch() -> None:
    series = Recorded()
    Publisher(LiveFigures(data_parallel=2), series).publish()
    assert series.calls == []


def test_the_thread_publishes_while_the_loop_runs_and_once_more_when_closed() -> None:
    figures, series = LiveFigures(data_parallel=1), Recorded()
    publisher = Publisher(figures, series, every_s=0.01)
    publisher.start()
    figures.add(4, 1.0, stepped=True)
    deadline = time.monotonic() + 5
    while series.total("samples") < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert series.total("samples") == 4  # published by the thread, not the loop
    figures.add(6, 1.0, stepped=True)  # the end of the last epoch
    publisher.close()
    assert series.total("samples") == 10
    count = len(series.calls)
    time.sleep(0.05)
    assert len(series.calls) == count  # the thread has stopped
