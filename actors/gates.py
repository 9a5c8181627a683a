"""The gates a rollout step must pass, free of Ray: each compares the challenger with the
champion on the same window of live statistics, never against fixed numbers alone.

A gate is anything with a ``name``, a ``samples`` count and a ``judge`` method
(:class:`Gate`), so a later gate (live accuracy from labelled feedback, say) joins the
list without touching the others. :func:`judge` runs a list of them and refuses to judge
a gate on less data than ``min_requests``: too little data is inconclusive, never a pass.

Each verdict carries the figures it was computed from and the thresholds it was held to,
so ``scaledl rollout status`` can show why a challenger passed or failed.
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from scipy import stats as scipy_stats

from actors.stats import ERROR, LATENCY, LATENCY_RATIO, TIMEOUT, Summary, quantile

Verdict = Literal["pass", "fail", "inconclusive"]


class GateResult(BaseModel):
    """One gate's verdict on one window, with what it was computed from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gate: str = Field(description="The gate's name: errors, latency, shadow, ...")
    verdict: Verdict
    figures: dict[str, float] = Field(description="The measured figures the verdict used.")
    thresholds: dict[str, float] = Field(description="What the figures were held to.")
    reason: str = Field(description="One line for a person.")


class Judgement(BaseModel):
    """All gates' verdicts on one window, and the overall one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    verdict: Verdict
    reason: str
    gates: list[GateResult]
    champion_requests: int
    challenger_requests: int


class Gate(Protocol):
    name: str

    def samples(self, champion: Summary, challenger: Summary) -> int:
        """How much of what this gate reads the smaller arm holds (requests, latencies,
        shadow comparisons): :func:`judge` does not ask a gate with too few."""
        ...

    def judge(self, champion: Summary, challenger: Summary) -> GateResult: ...


class ErrorGate:
    """The challenger's (error + timeout) / requests is not significantly above the
    champion's (one-sided two-proportion z-test, pooled), and is within an absolute
    margin of it. The test alone would pass a small but real rise on little traffic; the
    margin alone would fail noise on a champion that errs too."""

    name = "errors"

    def __init__(self, confidence: float = 0.99, max_error_margin: float = 0.01) -> None:
        self.confidence = confidence
        self.max_error_margin = max_error_margin

    def samples(self, champion: Summary, challenger: Summary) -> int:
        return min(champion.requests, challenger.requests)

    def judge(self, champion: Summary, challenger: Summary) -> GateResult:
        n1, n2 = champion.requests, challenger.requests
        x1 = champion.count(ERROR) + champion.count(TIMEOUT)
        x2 = challenger.count(ERROR) + challenger.count(TIMEOUT)
        thresholds = {"confidence": self.confidence, "max_error_margin": self.max_error_margin}
        if not n1 or not n2:
            return GateResult(
                gate=self.name,
                verdict="inconclusive",
                figures={"champion_requests": n1, "challenger_requests": n2},
                thresholds=thresholds,
                reason="no requests in one arm",
            )
        p1, p2 = x1 / n1, x2 / n2
        pooled = (x1 + x2) / (n1 + n2)
        se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
        z = (p2 - p1) / se if se > 0 else 0.0  # no errors (or only errors) in both: equal
        p_value = float(scipy_stats.norm.sf(z))
        figures = {
            "champion_requests": n1,
            "challenger_requests": n2,
            "champion_error_rate": p1,
            "challenger_error_rate": p2,
            "difference": p2 - p1,
            "z": z,
            "p_value": p_value,
        }
        rates = f"error rate {p2:.2%} vs the champion's {p1:.2%}"
        significant = p_value < 1 - self.confidence
        over = p2 - p1 > self.max_error_margin
        if significant or over:
            why = []
            if significant:
                why.append(f"significantly higher (p={p_value:.2g} < {1 - self.confidence:.2g})")
            if over:
                why.append(f"{p2 - p1:.2%} above it, past the {self.max_error_margin:.2%} margin")
            return GateResult(
                gate=self.name,
                verdict="fail",
                figures=figures,
                thresholds=thresholds,
                reason=f"{rates}: {' and '.join(why)}",
            )
        return GateResult(
            gate=self.name, verdict="pass", figures=figures, thresholds=thresholds, reason=rates
        )


def latency_samples(histogram: dict[int, int], cap: int) -> np.ndarray:
    """A histogram's bucket indices repeated by count, as a sample for a rank test.

    Past ``cap`` values, a systematic sample: the values at ranks evenly spaced through the
    whole histogram, so the same histogram always gives the same sample and its shape is
    kept. Measured on one core: LatencyGate.judge takes ~10 ms at 1e5 latencies per arm
    (scipy ranks the repeated indices, n log n) and ~18 ms at 1e6 with this cap of 2e5,
    which bounds the actor's time and memory on long windows."""
    if not histogram:
        return np.empty(0)
    index = np.fromiter(sorted(histogram), dtype=np.float64)
    counts = np.array([histogram[int(i)] for i in index], dtype=np.int64)
    total = int(counts.sum())
    if total <= cap:
        return np.repeat(index, counts)
    ranks = ((np.arange(cap) + 0.5) * (total / cap)).astype(np.int64)
    return index[np.searchsorted(np.cumsum(counts), ranks, side="right")]


class LatencyGate:
    """The challenger's p99 is at most ``max_p99_ratio`` times the champion's, and a
    Mann-Whitney U test finds no upward shift of its whole latency distribution beyond
    ``tolerance``: the champion's latencies are shifted up by the tolerance (a shift of
    log(1 + tolerance) / log(ratio) buckets, as buckets are log-spaced) and the test asks
    whether the challenger's are still greater. p99 alone misses a slower median; the
    rank test alone would fail a difference too small to matter, given enough requests."""

    name = "latency"

    def __init__(
        self,
        max_p99_ratio: float = 1.2,
        tolerance: float = 0.05,
        confidence: float = 0.99,
        max_samples: int = 200_000,
    ) -> None:
        self.max_p99_ratio = max_p99_ratio
        self.tolerance = tolerance
        self.confidence = confidence
        self.max_samples = max_samples

    def samples(self, champion: Summary, challenger: Summary) -> int:
        return min(sum(s.histogram(LATENCY).values()) for s in (champion, challenger))

    def judge(self, champion: Summary, challenger: Summary) -> GateResult:
        old, new = champion.histogram(LATENCY), challenger.histogram(LATENCY)
        thresholds = {
            "max_p99_ratio": self.max_p99_ratio,
            "tolerance": self.tolerance,
            "confidence": self.confidence,
        }
        p99_old, p99_new = quantile(old, 0.99), quantile(new, 0.99)
        if p99_old is None or p99_new is None:
            return GateResult(
                gate=self.name,
                verdict="inconclusive",
                figures={
                    "champion_samples": sum(old.values()),
                    "challenger_samples": sum(new.values()),
                },
                thresholds=thresholds,
                reason="no latencies in one arm",
            )
        shift = math.log1p(self.tolerance) / math.log(LATENCY_RATIO)
        x = latency_samples(new, self.max_samples)
        y = latency_samples(old, self.max_samples) + shift
        test = scipy_stats.mannwhitneyu(x, y, alternative="greater", method="asymptotic")
        p_value = float(test.pvalue)
        ratio = p99_new / p99_old
        figures = {
            "champion_samples": sum(old.values()),
            "challenger_samples": sum(new.values()),
            "champion_p50_ms": quantile(old, 0.5) or 0.0,
            "challenger_p50_ms": quantile(new, 0.5) or 0.0,
            "champion_p99_ms": p99_old,
            "challenger_p99_ms": p99_new,
            "p99_ratio": ratio,
            "shift_buckets": shift,
            "u": float(test.statistic),
            # P(a challenger latency > a champion latency + tolerance), ties counted half
            "p_slower": float(test.statistic) / (len(x) * len(y)),
            "p_value": p_value,
        }
        why = []
        if ratio > self.max_p99_ratio:
            why.append(f"p99 {ratio:.2f}x the champion's, past {self.max_p99_ratio:g}x")
        if p_value < 1 - self.confidence:
            why.append(
                f"latencies shifted up by more than {self.tolerance:.0%} "
                f"(Mann-Whitney p={p_value:.2g} < {1 - self.confidence:.2g})"
            )
        head = f"p99 {p99_new:.1f} ms vs the champion's {p99_old:.1f} ms"
        return GateResult(
            gate=self.name,
            verdict="fail" if why else "pass",
            figures=figures,
            thresholds=thresholds,
            reason=f"{head}: {' and '.join(why)}" if why else head,
        )


class ShadowGate:
    """The challenger, mirrored as a shadow, disagreed with the labels returned on at most
    ``max_disagreement`` of the instances compared (counted under the shadow's version)."""

    name = "shadow"

    def __init__(self, max_disagreement: float = 0.05) -> None:
        self.max_disagreement = max_disagreement

    def samples(self, champion: Summary, challenger: Summary) -> int:
        return challenger.count("shadow_agree") + challenger.count("shadow_disagree")

    def judge(self, champion: Summary, challenger: Summary) -> GateResult:
        agree, disagree = challenger.count("shadow_agree"), challenger.count("shadow_disagree")
        thresholds = {"max_disagreement": self.max_disagreement}
        compared = agree + disagree
        if not compared:
            return GateResult(
                gate=self.name,
                verdict="inconclusive",
                figures={"compared": 0},
                thresholds=thresholds,
                reason="no shadow comparisons",
            )
        share = disagree / compared
        figures = {"compared": compared, "disagree": disagree, "disagreement": share}
        ok = share <= self.max_disagreement
        return GateResult(
            gate=self.name,
            verdict="pass" if ok else "fail",
            figures=figures,
            thresholds=thresholds,
            reason=f"disagreed on {share:.2%} of {compared} instances"
            + ("" if ok else f", past {self.max_disagreement:.2%}"),
        )


def judge(
    gates: list[Gate], champion: Summary, challenger: Summary, min_requests: int
) -> Judgement:
    """Every gate's verdict and the overall one: fail if any gate fails, inconclusive if
    any is (a gate whose smaller arm has fewer than ``min_requests`` samples is not asked:
    it is inconclusive), pass only when all pass. No gates at all is inconclusive."""
    results = []
    for gate in gates:
        n = gate.samples(champion, challenger)
        if n < min_requests:
            results.append(
                GateResult(
                    gate=gate.name,
                    verdict="inconclusive",
                    figures={"samples": n},
                    thresholds={"min_requests": min_requests},
                    reason=f"too little data: {n} in the smaller arm, {min_requests} needed",
                )
            )
        else:
            results.append(gate.judge(champion, challenger))
    failed = [r for r in results if r.verdict == "fail"]
    unsure = [r for r in results if r.verdict == "inconclusive"]
    if failed:
        verdict: Verdict = "fail"
        reason = "; ".join(f"{r.gate}: {r.reason}" for r in failed)
    elif unsure or not results:
        verdict = "inconclusive"
        reason = "; ".join(f"{r.gate}: {r.reason}" for r in unsure) or "no gates"
    else:
        verdict, reason = "pass", "every gate passed"
    return Judgement(
        verdict=verdict,
        reason=reason,
        gates=results,
        champion_requests=champion.requests,
        challenger_requests=challenger.requests,
    )


class GateConfig(BaseModel):
    """The thresholds of the gates (``scaledl rollout start`` options, or ``gates`` in a
    rollout request). Ones that could never pass, or that mean nothing, are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    confidence: float = Field(
        0.99,
        description="Confidence of the significance tests (errors, latency): a challenger "
        "fails when p < 1 - confidence. Higher fails fewer good challengers by chance.",
    )
    max_error_margin: float = Field(
        0.01,
        description="Most the challenger's error + timeout rate may exceed the champion's, "
        "in absolute terms (0.01 = one point), however significant.",
    )
    max_p99_ratio: float = Field(
        1.2,
        description="Most the challenger's p99 latency may be, as a multiple of the champion's.",
    )
    latency_tolerance: float = Field(
        0.05,
        description="Upward shift of the whole latency distribution tolerated before the "
        "Mann-Whitney test counts it (0.05 = 5 % slower).",
    )
    max_disagreement: float = Field(
        0.05,
        description="Most share of shadow-compared instances whose labels may differ from "
        "the answers returned (the shadow phase, --shadow-first).",
    )

    @field_validator("confidence")
    @classmethod
    def _confidence(cls, v: float) -> float:
        if not 0.5 < v < 1:
            raise ValueError(
                f"confidence must be between 0.5 and 1, both excluded (e.g. 0.99), got {v}"
            )
        return v

    @field_validator("max_error_margin", "max_disagreement")
    @classmethod
    def _share(cls, v: float, info: ValidationInfo) -> float:
        if not 0 <= v <= 1:
            raise ValueError(f"{info.field_name} is a share: set it between 0 and 1, got {v}")
        return v

    @field_validator("max_p99_ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"max_p99_ratio must be above 0 (e.g. 1.2), got {v}")
        return v

    @field_validator("latency_tolerance")
    @classmethod
    def _tolerance(cls, v: float) -> float:
        if v < 0:
            raise ValueError(f"latency_tolerance must be 0 or more (e.g. 0.05), got {v}")
        return v

    def step_gates(self) -> list[Gate]:
        """The gates of a step with traffic: errors and latency."""
        return [
            ErrorGate(self.confidence, self.max_error_margin),
            LatencyGate(self.max_p99_ratio, self.latency_tolerance, self.confidence),
        ]

    def shadow_gates(self) -> list[Gate]:
        """The gates of the shadow phase: the challenger takes no traffic, so only its
        mirrored answers can be judged."""
        return [ShadowGate(self.max_disagreement)]
