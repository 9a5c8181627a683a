"""Cascade calibration: the cheap tier's confidence threshold, chosen on validation data.

Pick the lowest escalation share whose cascade accuracy stays within ``margin`` of the
expensive tier alone; report what that threshold gives on the test split.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.cascade_spec import ALWAYS_ESCALATE, CascadeSpec, SplitResult, cascade_name
from app.errors import ConfigError
from app.registry import ModelRef, Registry
from app.settings import Settings
from app.workloads import Workload
from data.versions import DatasetManifest, DatasetStore
from train.evaluate import score


@dataclass(frozen=True)
class PairScores:
    """Per row: the label, both tiers' predictions, the cheap tier's confidence."""

    label: np.ndarray
    cheap_pred: np.ndarray
    cheap_conf: np.ndarray
    expensive_pred: np.ndarray

    def result(self, threshold: float) -> SplitResult:
        escalate = self.cheap_conf < threshold
        cascade = np.where(escalate, self.expensive_pred, self.cheap_pred)
        return SplitResult(
            cascade_accuracy=float((cascade == self.label).mean()),
            escalated_share=float(escalate.mean()),
            cheap_accuracy=float((self.cheap_pred == self.label).mean()),
            expensive_accuracy=float((self.expensive_pred == self.label).mean()),
        )


def choose_threshold(scores: PairScores, margin: float) -> float:
    """The threshold escalating the fewest rows while accuracy >= expensive - margin.

    Escalating the k least confident rows, for every k at once: accuracy(k) is the
    expensive tier's hits among them plus the cheap tier's hits among the rest.
    """
    order = np.argsort(scores.cheap_conf, kind="stable")
    conf = scores.cheap_conf[order]
    cheap_hit = (scores.cheap_pred == scores.label)[order]
    expensive_hit = (scores.expensive_pred == scores.label)[order]
    n = len(conf)
    hits = np.concatenate([[0], np.cumsum(expensive_hit)]) + np.concatenate(
        [np.cumsum(cheap_hit[::-1])[::-1], [0]]
    )  # hits[k]: escalate rows [0, k)
    # A threshold t escalates every row with conf < t, so k can only stop where the
    # confidence changes (or at the ends).
    cuts = np.concatenate([[0], np.flatnonzero(np.diff(conf) > 0) + 1, [n]])
    target = expensive_hit.mean() - margin
    good = cuts[hits[cuts] / n >= target - 1e-12]
    k = int(good.min())
    return float(conf[k]) if k < n else ALWAYS_ESCALATE


def score_pair(
    settings: Settings, manifest: DatasetManifest, split: str, cheap_dir: Path, expensive_dir: Path
) -> PairScores:
    """Both tiers on every row of a split in one pass, so rows stay aligned."""
    scores = score(settings, manifest, split, {"cheap": cheap_dir, "expensive": expensive_dir})
    cheap, expensive = scores["cheap"], scores["expensive"]
    return PairScores(cheap.label, cheap.pred, cheap.confidence, expensive.pred)


def calibrate(
    settings: Settings, workload: Workload, *, cheap: str, expensive: str
) -> tuple[CascadeSpec, ModelRef]:
    """Calibrate the pair on the cheap model's dataset version and register the cascade."""
    registry = Registry(settings.tracking_uri, settings.artifacts_dir)
    cheap_ref = registry.resolve(workload.registered_model_name("cheap"), cheap)
    expensive_ref = registry.resolve(workload.registered_model_name("expensive"), expensive)
    versions = {ref.tags.get("dataset_version") for ref in (cheap_ref, expensive_ref)}
    if len(versions) != 1:
        raise ConfigError(
            f"{cheap_ref.label} was trained on dataset version "
            f"{cheap_ref.tags.get('dataset_version')} and {expensive_ref.label} on "
            f"{expensive_ref.tags.get('dataset_version')}: calibrate a pair trained on the "
            "same version (retrain one tier with --dataset-version <version>)"
        )
    manifest = DatasetStore(settings.datasets_dir).get(workload.name, versions.pop())
    cheap_dir, expensive_dir = registry.download(cheap_ref), registry.download(expensive_ref)
    margin = settings.calibrate.margin
    val = score_pair(settings, manifest, "val", cheap_dir, expensive_dir)
    threshold = choose_threshold(val, margin)
    test = score_pair(settings, manifest, "test", cheap_dir, expensive_dir)
    spec = CascadeSpec(
        workload=workload.name,
        cheap_version=cheap_ref.version,
        expensive_version=expensive_ref.version,
        threshold=threshold,
        margin=margin,
        val=val.result(threshold),
        test=test.result(threshold),
    )
    run_id = registry.start_run(
        cascade_name(workload.name),
        params={"margin": margin, "threshold": threshold},
        tags={"dataset_version": manifest.version, "workload": workload.name},
    )
    registry.log_metrics(
        run_id,
        {f"{split}_{k}": v for split in ("val", "test") for k, v in getattr(spec, split)},
    )
    with tempfile.TemporaryDirectory(prefix="scaledl-cascade-") as tmp:
        ref = registry.register(
            cascade_name(workload.name),
            spec.save(Path(tmp)),
            run_id=run_id,
            artifact_path="cascade",
            tags={
                "cheap_version": cheap_ref.version,
                "expensive_version": expensive_ref.version,
                "threshold": f"{threshold:.6f}",
                "dataset_version": manifest.version,
            },
        )
    registry.finish_run(run_id)
    return spec, ref
