"""Every Prometheus series of the graph, in one place, with fixed tag keys.

Ray exports them as ``ray_<name>`` (counters gain ``_total``, histograms ``_bucket``/
``_sum``/``_count``) with the deployment, replica and application tags it adds. The
ingress records them through :class:`ServeMetrics`, the Observer of
``serve_graphs.api.observe``; the Ray-free code never imports this module.
"""

from __future__ import annotations

from collections import Counter

from ray.serve import metrics

from serve_graphs.decide.cascade import Prediction

# Log-spaced, 1 ms to 10 s, ten a decade (each 26 % above the last): histogram_quantile
# interpolates within one bucket, so a p99 read from them is off by less than a bucket's
# width anywhere in the range, the SLO's neighbourhood (50-500 ms) included.
LATENCY_BOUNDARIES_MS = [round(10 ** (i / 10), 2) for i in range(0, 41)]


class ServeMetrics:
    """The series of one ingress replica."""

    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "scaledl_requests",
            description="HTTP requests by route, status and the cascade version that "
            "answered (none: no version did, e.g. a 4xx). 499: the client left first; "
            "429: over its key's rate limit; 503: shed or a tier unavailable.",
            tag_keys=("route", "status", "cascade_version"),
        )
        self.latency = metrics.Histogram(
            "scaledl_request_latency_ms",
            description="HTTP request latency by route and the cascade version that answered.",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("route", "cascade_version"),
        )
        self.answered = metrics.Counter(
            "scaledl_predictions",
            description="Instances answered, by tier and model version, and whether the "
            "answer was degraded: the expensive-tier share and A/B comparisons come from it.",
            tag_keys=("tier", "model_version", "degraded"),
        )
        self.degraded_rows = metrics.Counter(
            "scaledl_cascade_degraded",
            description="Instances answered by the cheap tier because the expensive tier "
            "could not: timeout, unavailable, error (a bug in it), overloaded (shed), "
            "breaker_open.",
            tag_keys=("reason",),
        )
        self.shadowed = metrics.Counter(
            "scaledl_shadow_instances",
            description="Instances mirrored to a shadow version, by primary and shadow "
            "version and outcome: agree, disagree, failed (the copy got no answer) or "
            "dropped (serve.shadow_max_in_flight copies were already running).",
            tag_keys=("cascade_version", "shadow_version", "outcome"),
        )

    def request(self, route: str, status: int, seconds: float, version: str, shed: bool) -> None:
        tags = {"route": route, "cascade_version": version}
        self.requests.inc(tags={**tags, "status": str(status)})
        self.latency.observe(seconds * 1000, tags=tags)

    def predictions(self, version: str, predictions: list[Prediction]) -> None:
        counts = Counter((p.tier, p.model_version, p.degraded) for p in predictions)
        for (tier, version, degraded), n in counts.items():
            tags = {"tier": tier, "model_version": version, "degraded": str(degraded).lower()}
            self.answered.inc(n, tags=tags)

    def degraded(self, n: int, reason: str) -> None:
        self.degraded_rows.inc(n, tags={"reason": reason})

    def shadow(self, primary, shadow, answer, mirrored, seconds) -> None:  # noqa: ANN001
        tags = {"cascade_version": primary, "shadow_version": shadow}
        if mirrored is None:
            self.shadowed.inc(len(answer), tags={**tags, "outcome": "failed"})
            return
        agreed = sum(a.label == m.label for a, m in zip(answer, mirrored, strict=True))
        for outcome, n in (("agree", agreed), ("disagree", len(answer) - agreed)):
            if n:
                self.shadowed.inc(n, tags={**tags, "outcome": outcome})

    def shadow_dropped(self, primary: str, shadow: str, n: int) -> None:
        tags = {"cascade_version": primary, "shadow_version": shadow, "outcome": "dropped"}
        self.shadowed.inc(n, tags=tags)
