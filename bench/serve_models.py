"""The models every setup of ``bench.serve`` serves, and the request they all get.

Either the real pipeline runs into a fresh storage root (ingest digits, train both tiers
with Ray Train + DeepSpeed, calibrate and promote the cascade), or ``--store`` names one
that holds a champion cascade.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from app.model_artifact import load_model
from app.settings import load_settings
from app.workloads import TIERS, get_workload

DIGITS = "digits"


def prepare(store: str, epochs: int) -> None:
    """The real pipeline into ``store``: ingest, both tiers, a promoted cascade."""
    import ray

    from app.cascade_spec import promote_cascade
    from app.registry import Registry
    from data.pipeline import ingest
    from train.calibrate import calibrate
    from train.run import train_tier

    settings = load_settings(storage_root=Path(store), train={"epochs": epochs})
    workload = get_workload(DIGITS)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        ingest(settings, workload)
        for tier in TIERS:
            train_tier(settings, workload, tier)
        spec, ref = calibrate(settings, workload, cheap="challenger", expensive="challenger")
        promote_cascade(Registry(settings.tracking_uri, settings.artifacts_dir), spec, ref)
    finally:
        ray.shutdown()


def request_bodies(store: Path, mix: str) -> tuple[list[str], str, str]:
    """The JSON bodies (one instance each), the expensive model's folder, and a note.

    ``digits``: 256 digits drawn at random (seeded), so the cascade escalates its natural
    share; ``unsure``: one digit the cheap tier is unsure of, so every request escalates.
    """
    from app.cascade_spec import load_cascade
    from app.registry import Registry

    workload = get_workload(DIGITS)
    registry = Registry(load_settings(storage_root=store).tracking_uri)
    spec, _ = load_cascade(registry, DIGITS, "champion")

    def folder(tier: str, ref: str) -> Path:
        return registry.download(registry.resolve(workload.registered_model_name(tier), ref))

    frame = workload.builtin_source()
    rows = frame[list(workload.feature_columns)].to_numpy(dtype=np.float64)
    confidence = load_model(folder("cheap", spec.cheap_version)).predict_proba(rows).max(axis=1)
    unsure = np.flatnonzero(confidence < spec.threshold)
    if mix == "unsure":
        chosen = [int(unsure[0]) if unsure.size else int(confidence.argmin())]
    else:
        chosen = np.random.default_rng(0).choice(len(rows), 256, replace=False).tolist()
    escalated = float(np.mean(confidence[chosen] < spec.threshold))
    note = (
        f"requests: {mix} mix, {len(chosen)} distinct one-digit bodies in turn; the cheap "
        f"tier escalates {escalated:.0%} of them (threshold {spec.threshold:.3f}); cheap "
        f"{spec.cheap_version}, expensive {spec.expensive_version}"
    )
    bodies = [json.dumps({"instances": [rows[i].tolist()]}) for i in chosen]
    return bodies, str(folder("expensive", spec.expensive_version)), note
