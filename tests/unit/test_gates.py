"""The rollout gates (actors/gates.py): each compares the challenger with the champion on
the same window and says why it passed or failed."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from actors.gates import (
    ErrorGate,
    GateConfig,
    LatencyGate,
    ShadowGate,
    judge,
    latency_samples,
)
from actors.stats import Recorder, Summary, latency_bucket, quantile


def arm(
    version: str,
    n: int,
    *,
    error_share: float = 0.0,
    median_ms: float = 20.0,
    extra_ms: float = 0.0,
    slower: float = 1.0,
    seed: int = 0,
    shadow: tuple[int, int] = (0, 0),
) -> Summary:
    """One arm's window, counted the way an ingress replica counts it."""
    rng = np.random.default_rng(seed)
    recorder = Recorder(clock=lambda: 1_700_000_000.0)
    latencies = rng.lognormal(np.log(median_ms), 0.3, n) * slower + extra_ms
    errors = rng.random(n) < error_share
    for ms, failed in zip(latencies, errors, strict=True):
        recorder.request("digits", version, 500 if failed else 200, ms / 1000)
    recorder.shadow("digits", version, *shadow)
    drained = recorder.drain()
    return Summary.merged(drained) if drained else Summary.empty("digits", version, 0, 10)


def test_a_challenger_failing_20_percent_fails_the_error_gate() -> None:
    result = ErrorGate().judge(arm("3", 1000), arm("4", 1000, error_share=0.2, seed=1))
    assert result.verdict == "fail"
    assert result.figures["champion_error_rate"] == 0.0
    assert result.figures["challenger_error_rate"] == pytest.approx(0.2, abs=0.03)
    assert result.figures["p_value"] < 0.01
    assert result.thresholds == {"confidence": 0.99, "max_error_margin": 0.01}
    assert "significantly higher" in result.reason and "margin" in result.reason


def test_equal_error_rates_pass() -> None:
    champion = arm("3", 2000, error_share=0.02, seed=1)
    challenger = arm("4", 2000, error_share=0.02, seed=2)
    result = ErrorGate().judge(champion, challenger)
    assert result.verdict == "pass", result.reason
    assert ErrorGate().judge(arm("3", 600), arm("4", 600, seed=1)).verdict == "pass"  # 0 vs 0


def test_a_rise_within_the_margin_fails_when_significant_and_a_large_one_fails_anyway() -> None:
    small_but_sure = ErrorGate().judge(arm("3", 20_000), arm("4", 20_000, error_share=0.005))
    assert small_but_sure.verdict == "fail" and "margin" not in small_but_sure.reason
    champion = Summary(
        model="digits", version="3", start=0, end=10, counters={"ok": 570, "error": 30}
    )
    challenger = champion.model_copy(update={"version": "4", "counters": {"ok": 555, "error": 45}})
    noisy = ErrorGate().judge(champion, challenger)  # 7.5 % vs 5 % on 600: not significant
    assert noisy.verdict == "fail" and "significantly" not in noisy.reason
    assert noisy.figures["p_value"] > 0.01 and noisy.figures["difference"] == pytest.approx(0.025)


def test_a_challenger_50_ms_slower_fails_on_latency() -> None:
    result = LatencyGate().judge(arm("3", 3000), arm("4", 3000, extra_ms=50, seed=1))
    assert result.verdict == "fail"
    assert result.figures["p99_ratio"] > 2
    assert result.figures["p_value"] < 0.01
    assert result.figures["challenger_p99_ms"] > result.figures["champion_p99_ms"] + 40
    assert result.thresholds == {"max_p99_ratio": 1.2, "tolerance": 0.05, "confidence": 0.99}


def test_identical_latency_distributions_pass() -> None:
    result = LatencyGate().judge(arm("3", 5000, seed=1), arm("4", 5000, seed=2))
    assert result.verdict == "pass", result.reason
    assert result.figures["p99_ratio"] == pytest.approx(1, abs=0.1)


def test_a_whole_distribution_shift_fails_even_under_the_p99_ratio() -> None:
    """15 % slower throughout: p99 stays under 1.2x, the rank test catches it; 2 % slower
    is within the 5 % tolerance."""
    champion = arm("3", 5000, seed=1)
    shifted = LatencyGate().judge(champion, arm("4", 5000, slower=1.15, seed=2))
    assert shifted.figures["p99_ratio"] < 1.2
    assert shifted.verdict == "fail" and "Mann-Whitney" in shifted.reason
    assert LatencyGate().judge(champion, arm("4", 5000, slower=1.02, seed=2)).verdict == "pass"


def test_the_shadow_gate_judges_disagreement() -> None:
    champion = arm("3", 10)
    assert ShadowGate().judge(champion, arm("4", 0, shadow=(98, 2))).verdict == "pass"
    failed = ShadowGate().judge(champion, arm("4", 0, shadow=(90, 10)))
    assert failed.verdict == "fail"
    assert failed.figures == {"compared": 100, "disagree": 10, "disagreement": 0.1}
    assert ShadowGate().judge(champion, arm("4", 0)).verdict == "inconclusive"


def test_too_little_data_is_inconclusive_however_bad_it_looks() -> None:
    gates = GateConfig().step_gates()
    judgement = judge(gates, arm("3", 100), arm("4", 100, error_share=0.5), min_requests=500)
    assert judgement.verdict == "inconclusive"
    assert [g.verdict for g in judgement.gates] == ["inconclusive", "inconclusive"]
    assert judgement.gates[0].figures == {"samples": 100}
    assert judgement.gates[0].thresholds == {"min_requests": 500}
    assert "too little data" in judgement.reason


def test_the_overall_verdict_and_its_figures() -> None:
    gates = GateConfig().step_gates()
    good = judge(gates, arm("3", 1000), arm("4", 1000, seed=1), min_requests=500)
    assert good.verdict == "pass"
    assert [g.gate for g in good.gates] == ["errors", "latency"]
    assert (good.champion_requests, good.challenger_requests) == (1000, 1000)
    assert {"champion_error_rate", "challenger_error_rate", "z", "p_value"} <= set(
        good.gates[0].figures
    )
    assert {"champion_p99_ms", "challenger_p99_ms", "p99_ratio", "u"} <= set(good.gates[1].figures)
    bad = judge(gates, arm("3", 1000), arm("4", 1000, error_share=0.2), min_requests=500)
    assert bad.verdict == "fail" and bad.reason.startswith("errors:")
    assert [g.verdict for g in bad.gates] == ["fail", "pass"]
    assert judge([], arm("3", 1000), arm("4", 1000), 1).verdict == "inconclusive"


def test_a_capped_latency_sample_keeps_the_distribution() -> None:
    rng = np.random.default_rng(3)
    histogram: dict[int, int] = {}
    for ms in rng.lognormal(np.log(20), 0.5, 50_000):
        i = latency_bucket(ms)
        histogram[i] = histogram.get(i, 0) + 1
    full = latency_samples(histogram, cap=10**6)
    capped = latency_samples(histogram, cap=5000)
    assert len(full) == 50_000 and len(capped) == 5000
    assert np.array_equal(capped, latency_samples(histogram, cap=5000))  # deterministic
    for q in (0.5, 0.99):
        assert abs(np.quantile(capped, q) - np.quantile(full, q)) <= 1
    assert quantile(histogram, 0.5) is not None


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("confidence", 0.5, "confidence must be between 0.5 and 1"),
        ("confidence", 1.0, "confidence must be between 0.5 and 1"),
        ("max_error_margin", -0.01, "max_error_margin is a share"),
        ("max_disagreement", -0.1, "max_disagreement is a share"),
        ("max_disagreement", 1.5, "max_disagreement is a share"),
        ("max_p99_ratio", 0, "max_p99_ratio must be above 0"),
        ("latency_tolerance", -0.05, "latency_tolerance must be 0 or more"),
    ],
)
def test_thresholds_that_mean_nothing_are_refused(field: str, value: float, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        GateConfig(**{field: value})


def test_the_config_builds_the_gates_with_its_thresholds() -> None:
    config = GateConfig(confidence=0.95, max_p99_ratio=1.5, max_disagreement=0.1)
    errors, latency = config.step_gates()
    assert (errors.confidence, latency.max_p99_ratio, latency.confidence) == (0.95, 1.5, 0.95)
    [shadow] = config.shadow_gates()
    assert shadow.max_disagreement == 0.1
    assert GateConfig(max_p99_ratio=0.9).max_p99_ratio == 0.9  # a faster challenger can pass
