"""The models every setup of ``bench.serve`` serves, and the request they all get.

Either the real pipeline runs into a fresh storage root (ingest digits, train both tiers
with Ray Train + DeepSpeed, calibrate and promote the cascade), or ``--store`` names one
that holds a champion cascade.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from app.model_artifact import META, load_model
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
    elif mix == "sure":
        sure = np.flatnonzero(confidence >= spec.threshold)
        chosen = np.random.default_rng(0).choice(sure, 256, replace=False).tolist()
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


MAX_ESCALATED = 0.30  # the targets for the models behind the service
MAX_CASCADE_LOSS = 0.005
MIN_INT8_SPEEDUP = 2.0
MAX_INT8_LOSS = 0.01


def model_targets(store: Path) -> list[str]:
    """PASS/FAIL lines for the cascade and the INT8 expensive tier.

    The cascade's escalated share and accuracies are the test split's, as calibration
    measured them when the cascade was made (the pipeline's own step, in this run when
    ``--store`` is not given). The INT8 speed-up is measured now, on this machine, with
    one thread as a replica has; its accuracy change is the one registered at training.
    """
    from app.cascade_spec import load_cascade
    from app.registry import Registry
    from train.quantize import SPEED_BATCH, speedup

    workload = get_workload(DIGITS)
    registry = Registry(load_settings(storage_root=store).tracking_uri)
    spec, ref = load_cascade(registry, DIGITS, "champion")
    test = spec.test
    loss = test.expensive_accuracy - test.cascade_accuracy  # points lost to the cascade
    cascade_ok = test.escalated_share <= MAX_ESCALATED and loss <= MAX_CASCADE_LOSS
    name = workload.registered_model_name("expensive")
    fp32 = registry.resolve(name, spec.expensive_version)
    int8 = registry.int8_twin(name, fp32.version)
    delta = registry.run_metrics(fp32).get("int8_accuracy_delta", float("nan"))
    int8_dir = registry.download(int8)
    times = speedup(registry.download(fp32), int8_dir)
    kind = json.loads((int8_dir / META).read_text()).get("quantization")
    return [
        f"{'PASS' if cascade_ok else 'FAIL'} cascade <= {MAX_ESCALATED:.0%} escalated at "
        f"accuracy within {MAX_CASCADE_LOSS * 100:.1f} pt of expensive-only: "
        f"{test.escalated_share:.1%} escalated, {test.cascade_accuracy:.4f} vs "
        f"{test.expensive_accuracy:.4f} ({-loss * 100 + 0.0:+.2f} pt), test split, "
        f"cascade {ref.label}",
        f"{'PASS' if times >= MIN_INT8_SPEEDUP else 'FAIL'} INT8 expensive tier >= "
        f"{MIN_INT8_SPEEDUP:g}x faster at batch {SPEED_BATCH}: {times:.2f}x (measured now, "
        f"one thread; {int8.label}, {kind})",
        f"{'PASS' if delta >= -MAX_INT8_LOSS else 'FAIL'} INT8 accuracy "
        f"within {MAX_INT8_LOSS * 100:.0f} pt: {delta * 100:+.2f} pt (test split, at training)",
    ]
