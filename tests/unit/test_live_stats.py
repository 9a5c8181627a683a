"""The live statistics an ingress replica reports (serve_graphs/api/observe.py LiveStats):
what is counted, that nothing is lost or counted twice across failed sends, and what the
routes view shows. The store is the actor's own class (StatsStore), in this process."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import pytest

from actors.stats import StatsStore
from serve_graphs.api.observe import LiveStats
from serve_graphs.decide.cascade import Prediction
from tests.unit.graph import LocalStats


class Clock:
    def __init__(self, now: float = 1_005.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FlakySink(LocalStats):
    """The actor's client, failing the next ``fail`` sends (the actor restarting, say)."""

    def __init__(self, store: StatsStore, fail: int = 0) -> None:
        super().__init__(store)
        self.fail = fail

    async def add(self, summaries: list[dict]) -> None:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("actor unavailable")
        await super().add(summaries)


def predictions(*tiers: str, degraded: int = 0) -> list[Prediction]:
    out = [Prediction(7, 0.9, t, f"digits-{t}/1", False) for t in tiers]
    out += [Prediction(7, 0.6, "cheap", "digits-cheap/1", True)] * degraded
    return out


def test_counts_predict_requests_by_version_and_outcome_and_reads_them_back() -> None:
    clock = Clock()
    store = StatsStore(clock=clock)
    live = LiveStats("digits", LocalStats(store), clock=clock)
    live.request("/v1/predict", 200, 0.010, "3")
    live.request("/v2/infer", 200, 0.030, "3")
    live.request("/v1/predict", 500, 0.020, "4")
    live.request("/v1/predict", 503, 0.001, "4", shed=True)  # shed: not the version's fault
    live.request("/v1/predict", 503, 0.002, "4", shed=False)  # a tier down: an error
    live.request("/v1/predict", 401, 0.001, "none")  # no version answered it
    live.request("/v1/admin", 200, 0.001, "3")  # not a prediction
    live.predictions("3", predictions("cheap", "expensive", degraded=1))

    view = asyncio.run(live.view(60))  # flushes this replica's counts first
    v3, v4 = view["versions"]["3"], view["versions"]["4"]
    assert set(view["versions"]) == {"3", "4"} and view["window_s"] == 60
    assert (
        v3["requests"] == 2
        and v3["outcomes"]["ok"] == 2
        and v3["p99_ms"] == pytest.approx(30, rel=0.03)
    )
    assert v3["instances"] == 3 and v3["escalated_share"] == pytest.approx(2 / 3, abs=1e-5)
    assert v3["degraded_share"] == pytest.approx(1 / 3, abs=1e-5)
    assert v4["outcomes"] == {"ok": 0, "client_error": 0, "shed": 1, "error": 2, "timeout": 0,
                              "cancelled": 0}  # fmt: skip
    assert v4["error_rate"] == pytest.approx(2 / 3, abs=1e-5)


def test_a_failed_send_is_kept_and_goes_with_the_next_so_nothing_is_lost_or_doubled() -> None:
    clock = Clock()
    store = StatsStore(clock=clock)
    sink = FlakySink(store, fail=2)
    live = LiveStats("digits", sink, clock=clock, bucket_s=10)
    for i in range(30):
        live.request("/v1/predict", 200, 0.01, "3")
        if i % 10 == 9:
            clock.now += 10  # the next requests land in the next bucket
            with pytest.raises(ConnectionError) if sink.fail else contextlib.nullcontext():
                asyncio.run(live.flush())
    asyncio.run(live.flush())
    assert store.window("digits", "3", 0, clock.now + 10).requests == 30


def test_shadow_copies_count_under_the_shadow_version() -> None:
    clock = Clock()
    store = StatsStore(clock=clock)
    live = LiveStats("digits", LocalStats(store), clock=clock)
    answer = predictions("cheap", "cheap")
    mirrored = [answer[0], Prediction(1, 0.9, "cheap", "digits-cheap/2", False)]
    live.shadow("3", "7", answer, mirrored, 0.01)
    live.shadow("3", "7", answer, None, 0.01)
    live.shadow_dropped("3", "7", 4)
    shadow = asyncio.run(live.view(60))["versions"]["7"]["shadow"]
    assert shadow == {"compared": 2, "agreement": 0.5, "failed": 2, "dropped": 4}


def test_the_run_loop_sends_every_interval_and_survives_a_failing_sink() -> None:
    store = StatsStore()
    sink = FlakySink(store, fail=1)
    live = LiveStats("digits", sink, every_s=0.01)

    def sent() -> int:
        return store.window("digits", "3", 0, 2e10).requests

    async def until(done: Callable[[], bool]) -> None:  # polled, so a loaded host waits longer
        for _ in range(500):
            if done():
                return
            await asyncio.sleep(0.01)

    async def run() -> None:
        task = asyncio.get_running_loop().create_task(live.run())
        live.request("/v1/predict", 200, 0.01, "3")
        await until(lambda: sent() == 1)  # one failed send, then it is sent
        live.request("/v1/predict", 200, 0.01, "3")
        await until(lambda: sent() == 2)
        task.cancel()

    asyncio.run(run())
    assert store.window("digits", "3", 0, 2e10).requests == 2
    assert not live.failing


def test_the_stats_actor_is_looked_up_off_the_event_loop() -> None:
    """The first send looks the actor up: a blocking call to the GCS, which waits while
    the GCS is down (a head restarting). The replica's loop, which answers every
    request, must go on meanwhile."""
    from types import SimpleNamespace

    from actors.serving_stats import StatsClient

    received: list[list[dict]] = []

    async def add(summaries: list[dict]) -> None:
        received.append(summaries)

    def lookup_while_the_gcs_is_down(retention_s: float) -> SimpleNamespace:
        time.sleep(1.0)
        return SimpleNamespace(add=SimpleNamespace(remote=add))

    async def scenario() -> float:
        client = StatsClient(lookup=lookup_while_the_gcs_is_down)
        gaps, last = [], time.monotonic()

        async def requests_meanwhile() -> None:
            nonlocal last
            while True:
                await asyncio.sleep(0.01)
                gaps.append(time.monotonic() - last)
                last = time.monotonic()

        answering = asyncio.create_task(requests_meanwhile())
        await client.add([{"n": 1}])
        answering.cancel()
        return max(gaps)

    longest = asyncio.run(scenario())
    assert received == [[{"n": 1}]]
    assert longest < 0.5, f"the loop stalled {longest:.2f} s behind the lookup"
