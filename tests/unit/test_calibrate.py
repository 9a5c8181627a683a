"""Choosing the cascade threshold (pure numpy) and storing the pair in the registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.cascade_spec import ALWAYS_ESCALATE, CascadeSpec, SplitResult, load_cascade
from app.errors import ModelNotFound
from app.registry import Registry
from train.calibrate import PairScores, choose_threshold


def scores(conf: list[float], cheap_right: list[bool], expensive_right: list[bool]) -> PairScores:
    label = np.zeros(len(conf), dtype=int)
    return PairScores(
        label=label,
        cheap_pred=np.where(cheap_right, 0, 1),
        cheap_conf=np.asarray(conf),
        expensive_pred=np.where(expensive_right, 0, 1),
    )


def test_escalates_just_the_unsure_rows_the_expensive_tier_gets_right() -> None:
    s = scores(
        conf=[0.30, 0.50, 0.70, 0.90, 0.95, 0.99],
        cheap_right=[False, False, True, True, True, True],
        expensive_right=[True, True, True, True, True, True],
    )
    t = choose_threshold(s, margin=0.0)
    assert t == 0.70  # escalate the two rows below 0.70, and nothing else
    assert s.result(t).cascade_accuracy == 1.0
    assert s.result(t).escalated_share == pytest.approx(2 / 6)


def test_a_margin_buys_fewer_escalations() -> None:
    s = scores(
        conf=[0.1 * i for i in range(1, 11)],
        cheap_right=[False] + [True] * 9,
        expensive_right=[True] * 10,
    )
    assert choose_threshold(s, margin=0.0) == pytest.approx(0.2)
    assert choose_threshold(s, margin=0.1) == pytest.approx(0.1)  # 90 % is within 10 points


def test_ties_in_confidence_escalate_together() -> None:
    s = scores(conf=[0.5, 0.5, 0.9], cheap_right=[False, True, True], expensive_right=[True] * 3)
    t = choose_threshold(s, margin=0.0)
    assert t == 0.9 and s.result(t).escalated_share == pytest.approx(2 / 3)


def test_a_useless_cheap_tier_escalates_everything() -> None:
    s = scores(conf=[0.9, 0.95, 1.0], cheap_right=[False] * 3, expensive_right=[True] * 3)
    t = choose_threshold(s, margin=0.0)
    assert t == ALWAYS_ESCALATE and s.result(t).escalated_share == 1.0


def test_a_cascade_round_trips_through_the_registry(tmp_path: Path) -> None:
    registry = Registry(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts")
    with pytest.raises(ModelNotFound, match="run `scaledl calibrate --workload digits`"):
        load_cascade(registry, "digits", "champion")
    r = SplitResult(
        cascade_accuracy=0.99, escalated_share=0.1, cheap_accuracy=0.95, expensive_accuracy=0.99
    )
    spec = CascadeSpec(
        workload="digits", cheap_version="3", expensive_version="2", threshold=0.8,
        margin=0.005, val=r, test=r,
    )  # fmt: skip
    run = registry.start_run("cascade", params={}, tags={})
    registry.register("digits-cascade", spec.save(tmp_path / "c"), run_id=run, tags={})
    loaded, ref = load_cascade(registry, "digits", "champion")
    assert loaded == spec and ref.version == "1"
