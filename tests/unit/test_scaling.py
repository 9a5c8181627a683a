"""Tier autoscaling on busy replicas: the meter each replica reports, and the policy
Serve's controller runs on it (here through Serve's own wrapper, which applies the
deployment's bounds and delays exactly as the controller does)."""

from __future__ import annotations

import time

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from app.keys import dev_key
from app.settings import load_settings
from serve_graphs.args import GraphArgs
from serve_graphs.builder import scaling
from serve_graphs.scaling import BUSY, POLICY, BusyMeter, BusyTierPolicy
from tests.conftest import FakeClock


def test_the_meter_reads_the_share_of_time_spent_in_batches() -> None:
    clock = FakeClock()
    meter = BusyMeter(clock)
    clock.now += 10  # idle
    assert meter.read() == 0.0
    for _ in range(3):  # 3 x 1 s of batches in a 10 s window
        with meter.running():
            clock.now += 1
        clock.now += 2
    clock.now += 1
    assert meter.read() == pytest.approx(0.3)


def test_a_batch_running_across_a_reading_counts_in_both_windows_once() -> None:
    clock = FakeClock()
    meter = BusyMeter(clock)
    with meter.running():
        clock.now += 4
        assert meter.read() == pytest.approx(1.0)  # 4 s, all of it running
        clock.now += 1
    clock.now += 4
    assert meter.read() == pytest.approx(0.2)  # 1 s of the batch in a 5 s window


def context(
    busy: list[float], *, calls: float, config: AutoscalingConfig, replicas: int | None = None
) -> AutoscalingContext:
    deployment = DeploymentID(name="cheap-tier", app_name="digits")
    running = [ReplicaID(f"r{i}", deployment) for i in range(len(busy))]
    n = len(busy) if replicas is None else replicas
    return AutoscalingContext(
        deployment_id=deployment,
        deployment_name=deployment.name,
        app_name=deployment.app_name,
        current_num_replicas=n,
        target_num_replicas=n,
        running_replicas=running,
        total_num_requests=calls,
        total_queued_requests=0,
        aggregated_metrics={BUSY: dict(zip(running, busy, strict=True))} if busy else {},
        raw_metrics={},
        capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=time.time(),
        config=config,
    )


NOW = {"upscale_delay_s": 0, "downscale_delay_s": 0}


def decide(busy: list[float], calls: float = 2, replicas: int | None = None, **config) -> int:  # noqa: ANN003
    cfg = AutoscalingConfig(**{"min_replicas": 0, "max_replicas": 8, **NOW, **config})
    policy = _apply_autoscaling_config(BusyTierPolicy(target_busy=0.5))
    return policy(context(busy, calls=calls, config=cfg, replicas=replicas))[0]


def test_a_busy_tier_scales_out_though_its_calls_in_flight_stay_few() -> None:
    # Two calls in flight, as the ingress's coalescer keeps them: Serve's default policy
    # (target 2 per replica) would stay at one replica.
    assert decide([0.95], calls=2) == 2
    assert decide([0.9, 0.9, 0.8], calls=6) == 6  # 2.6 busy replicas' work at 0.5 each


def test_an_idle_tier_scales_in_and_to_zero_but_not_below_one_while_called() -> None:
    assert decide([0.1, 0.1, 0.05], calls=3) == 1
    assert decide([0.0], calls=0) == 0
    assert decide([0.001], calls=1) == 1


def test_no_reading_yet_holds_and_a_call_to_zero_replicas_cold_starts() -> None:
    assert decide([], calls=4, replicas=3) == 3
    assert decide([], calls=1, replicas=0) == 1


def test_scale_out_waits_for_the_upscale_delay() -> None:
    assert decide([0.95], calls=2, upscale_delay_s=30) == 1


def test_target_busy_must_be_a_share() -> None:
    with pytest.raises(ValueError, match="target_busy"):
        BusyTierPolicy(target_busy=1.5)


def test_the_graphs_tiers_name_the_policy_and_serve_loads_it(tmp_path) -> None:  # noqa: ANN001
    settings = load_settings(storage_root=tmp_path, serve={"cheap_replicas": {"target_busy": 0.3}})
    args = GraphArgs.from_settings(settings, "digits", [dev_key("k")])
    configs = scaling(args)
    assert "policy" not in configs["Ingress"]  # HTTP requests in flight: Serve's default
    cheap = AutoscalingConfig(**configs["cheap-tier"])
    assert cheap.policy.policy_function == POLICY
    assert cheap.policy.policy_kwargs == {"target_busy": 0.3}
    assert isinstance(cheap.policy.get_policy()(**cheap.policy.policy_kwargs), BusyTierPolicy)
