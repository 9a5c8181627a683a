"""Live serving statistics (actors/stats.py): outcomes, the latency histogram, and exact
merging of what several ingress replicas report."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from actors.stats import (
    LATENCY,
    LATENCY_BUCKETS,
    LATENCY_RATIO,
    OUTCOMES,
    Recorder,
    StatsStore,
    Summary,
    bucket_ms,
    latency_bucket,
    outcome_of,
    quantile,
)
from tests.conftest import FakeClock

T0 = 1_700_000_000.0  # bucket-aligned (a multiple of 10)


def clock_at(t: float = T0) -> FakeClock:
    clock = FakeClock()
    clock.now = t
    return clock


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, "ok"),
        (204, "ok"),
        (400, "client_error"),
        (401, "client_error"),
        (404, "client_error"),
        (413, "client_error"),
        (422, "client_error"),
        (429, "shed"),
        (499, "cancelled"),
        (500, "error"),
        (502, "error"),
        (503, "shed"),
        (504, "timeout"),
    ],
)
def test_status_to_outcome(status: int, outcome: str) -> None:
    assert outcome_of(status) == outcome


def test_latency_buckets_cover_the_range_within_the_ratio() -> None:
    assert latency_bucket(0) == 0 and latency_bucket(0.01) == 0
    assert latency_bucket(10**9) == LATENCY_BUCKETS - 1  # clamped, not an error
    assert bucket_ms(LATENCY_BUCKETS - 1) > 120_000 / LATENCY_RATIO
    for ms in np.geomspace(0.2, 100_000, 500):
        mid = bucket_ms(latency_bucket(ms))
        assert abs(mid / ms - 1) <= LATENCY_RATIO**0.5 - 1 + 1e-9


@pytest.mark.parametrize(("median_ms", "sigma", "n"), [(20, 0.3, 20_000), (5, 1.0, 100_000)])
@pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
def test_quantile_from_the_histogram_is_within_5_percent(
    median_ms: float, sigma: float, n: int, q: float
) -> None:
    rng = np.random.default_rng(7)
    samples = rng.lognormal(np.log(median_ms), sigma, n)
    histogram: dict[int, int] = {}
    for ms in samples:
        i = latency_bucket(ms)
        histogram[i] = histogram.get(i, 0) + 1
    true = np.percentile(samples, q * 100)
    assert abs(quantile(histogram, q) / true - 1) <= 0.05
    assert quantile({}, q) is None


def stream(n: int, seed: int = 1) -> list[tuple]:
    """Traffic for two models and three versions over ~3 minutes."""
    rng = random.Random(seed)
    events, t = [], T0
    statuses = [200] * 90 + [400, 429, 499, 500, 503, 504, 404, 502, 422, 200]
    for _ in range(n):
        t += rng.expovariate(5.0)
        model = rng.choice(["digits", "transactions"])
        version = rng.choice(["3", "4", "5"])
        kind = rng.random()
        if kind < 0.7:
            events.append((t, "request", model, version, rng.choice(statuses), rng.random()))
        elif kind < 0.9:
            m = rng.randint(1, 8)
            escalated = rng.randint(0, m)
            degraded = rng.randint(0, escalated)
            events.append(
                (
                    t,
                    "predictions",
                    model,
                    version,
                    m,
                    {"escalated": escalated, "degraded": degraded},
                )
            )
        else:
            events.append((t, "shadow", model, version, rng.randint(0, 5), rng.randint(0, 2)))
    return events


def call(recorder: Recorder, clock: FakeClock, event: tuple) -> None:
    t, kind, *args = event
    clock.now = t
    if kind == "predictions":
        *pos, kw = args
        recorder.predictions(*pos, **kw)
    else:
        getattr(recorder, kind)(*args)


def dump(store: StatsStore, start: float, end: float) -> dict:
    return {
        (m, v): store.window(m, v, start, end).model_dump()
        for m in ("digits", "transactions")
        for v in store.versions(m, start, end)
    }


def test_two_replicas_merge_exactly_into_what_one_would_count() -> None:
    events = stream(4000)
    clock = clock_at()
    one, two, whole = Recorder(clock=clock), Recorder(clock=clock), Recorder(clock=clock)
    merged, single = StatsStore(clock=clock), StatsStore(clock=clock)
    rng = random.Random(2)
    for i, event in enumerate(events):
        call(rng.choice([one, two]), clock, event)  # disjoint halves, interleaved
        call(whole, clock, event)
        if i % 97 == 0:  # the replicas report at their own times
            merged.add(one.drain())
        if i % 131 == 0:
            merged.add([s.model_dump() for s in two.drain()])  # as it crosses Ray
    merged.add(two.drain() + one.drain())
    single.add(whole.drain())
    end = clock.now + 10
    assert dump(merged, T0, end) == dump(single, T0, end)
    assert merged.report("digits", T0, end) == single.report("digits", T0, end)
    assert sum(merged.window("digits", v, T0, end).requests for v in "345") > 1000


def test_drain_loses_nothing_and_counts_nothing_twice() -> None:
    events = stream(2000, seed=3)
    clock = clock_at()
    drained, never = Recorder(clock=clock), Recorder(clock=clock)
    parts: list[Summary] = []
    for i, event in enumerate(events):
        call(drained, clock, event)
        call(never, clock, event)
        if i % 50 == 0:
            parts.extend(drained.drain())  # mid-bucket: the partial bucket goes out too
    parts.extend(drained.drain())
    assert drained.drain() == []
    store_parts, store_whole = StatsStore(clock=clock), StatsStore(clock=clock)
    store_parts.add(parts)
    store_whole.add(never.drain())
    assert dump(store_parts, T0, clock.now + 10) == dump(store_whole, T0, clock.now + 10)


def test_requeued_summaries_go_out_with_the_next_drain() -> None:
    clock = clock_at(T0 + 3)
    recorder = Recorder(clock=clock)
    recorder.request("digits", "3", 200, 0.01)
    failed_send = recorder.drain()
    recorder.request("digits", "3", 500, 0.02)
    recorder.requeue(failed_send)
    [summary] = recorder.drain()
    assert (summary.count("ok"), summary.count("error"), summary.requests) == (1, 1, 2)


def summary(version: str, start: float, **counters: int) -> Summary:
    return Summary(
        model="digits",
        version=version,
        start=start,
        end=start + 10,
        counters=counters,
        histograms={LATENCY: {100: counters.get("ok", 0)}},
    )


def test_merging_is_adding_in_any_order_and_survives_json() -> None:
    a, b, c = summary("3", T0, ok=3, error=1), summary("3", T0 + 10, ok=2), summary("3", T0, ok=5)
    orders = [[a, b, c], [c, b, a], [b, a, c]]
    merged = [Summary.merged(o).model_dump() for o in orders]
    assert merged[0] == merged[1] == merged[2]
    assert merged[0]["counters"] == {"ok": 10, "error": 1}
    assert merged[0]["histograms"] == {LATENCY: {100: 10}}
    assert (merged[0]["start"], merged[0]["end"]) == (T0, T0 + 20)
    back = Summary.model_validate(json.loads(a.model_dump_json()))  # int keys come back
    assert back == a
    with pytest.raises(ValueError, match="cannot add"):
        a.model_copy(deep=True).add(summary("4", T0))


def test_a_window_holds_the_buckets_that_start_inside_it() -> None:
    clock = clock_at(T0 + 40)
    store = StatsStore(clock=clock)
    store.add([summary("3", T0 + 10 * i, ok=10**i) for i in range(4)])  # 1, 10, 100, 1000
    assert store.window("digits", "3", T0 + 10, T0 + 30).count("ok") == 110
    assert store.window("digits", "3", T0 + 15, T0 + 30).count("ok") == 100  # straddles: out
    assert store.window("digits", "3", T0, T0 + 40).count("ok") == 1111
    assert store.window("digits", "3", T0 + 40, T0 + 50).requests == 0
    assert store.window("digits", "9", T0, T0 + 40).requests == 0  # unknown: empty, no error
    assert store.versions("digits", T0, T0 + 40) == ["3"]
    assert store.versions("digits", T0 + 40, T0 + 50) == []


def test_buckets_older_than_the_retention_are_pruned() -> None:
    clock = clock_at(T0)
    store = StatsStore(retention_s=60, clock=clock)
    store.add([summary("3", T0, ok=1), summary("4", T0 + 30, ok=1)])
    clock.now = T0 + 61
    store.add([summary("3", T0 + 60, ok=2), summary("3", T0 - 10, ok=100)])  # late and too old
    assert store.window("digits", "3", 0, T0 + 100).count("ok") == 2
    assert store.versions("digits", 0, T0 + 100) == ["3", "4"]
    clock.now = T0 + 91
    store.prune()
    assert store.versions("digits", 0, T0 + 100) == ["3"]


def test_report_gives_rates_percentiles_and_shares_per_version() -> None:
    clock = clock_at(T0)
    recorder = Recorder(clock=clock)
    for i in range(100):
        recorder.request("digits", "3", 500 if i < 4 else (504 if i < 5 else 200), 0.010)
    recorder.request("digits", "3", 429, 0.0)
    recorder.request("digits", "3", 499, 3.0)  # the client left: not a latency
    recorder.predictions("digits", "3", 10, escalated=3, degraded=1)
    recorder.shadow("digits", "4", agree=9, disagree=1)
    store = StatsStore(clock=clock)
    store.add(recorder.drain())
    report = store.report("digits", T0, T0 + 10)
    v3, v4 = report["versions"]["3"], report["versions"]["4"]
    assert v3["requests"] == 102
    assert v3["outcomes"] == dict.fromkeys(OUTCOMES, 0) | {
        "ok": 95,
        "error": 4,
        "timeout": 1,
        "shed": 1,
        "cancelled": 1,
    }
    assert v3["error_rate"] == pytest.approx(5 / 102, abs=1e-6)
    assert v3["p99_ms"] == pytest.approx(10, rel=0.02)
    assert (v3["escalated_share"], v3["degraded_share"]) == (0.3, 0.1)
    assert v4["requests"] == 0 and v4["shadow"] == {
        "compared": 10,
        "agreement": 0.9,
        "failed": 0,
        "dropped": 0,
    }
