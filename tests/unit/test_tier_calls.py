"""How the ingress calls a tier: one retry for a failed call, none for one refused for
load, and a 503 either way when it cannot answer. The handle is a stand-in for a Ray Serve
DeploymentHandle (no cluster here); the errors are Ray's own."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from app.errors import ServiceUnavailable
from serve_graphs.ingress import tier_fn


class Handle:
    """`handle.predict.remote(x)` that fails with the given errors first."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.predict = self

    def remote(self, instances: np.ndarray, model_id: str | None = None):  # noqa: ANN201
        self.calls += 1

        async def answer() -> tuple[np.ndarray, str]:
            if self.errors:
                raise self.errors.pop(0)
            return np.full((len(instances), 2), 0.5), "digits-cheap/1"

        return answer()


def call(handle: Handle) -> object:
    return asyncio.run(tier_fn(handle, "cheap", retry_wait_s=0)(np.zeros((3, 4))))


def test_a_failed_call_is_retried_once_and_answers() -> None:
    handle = Handle(RayActorError())
    assert call(handle).version == "digits-cheap/1" and handle.calls == 2


def test_two_failures_are_a_503() -> None:
    handle = Handle(RayActorError(), RayActorError())
    with pytest.raises(ServiceUnavailable, match="could not answer"):
        call(handle)
    assert handle.calls == 2


def test_a_call_refused_for_load_is_not_retried() -> None:
    handle = Handle(BackPressureError(num_queued_requests=9, max_queued_requests=8))
    with pytest.raises(ServiceUnavailable, match="at capacity"):
        call(handle)
    assert handle.calls == 1


def test_a_swap_that_cannot_load_keeps_the_version_that_serves(tmp_path) -> None:  # noqa: ANN001
    """Serve stops a replica whose reconfigure raises; a failed swap must not do that."""
    from serve_graphs.tier_model import TierModel, TierRunner

    tier = TierModel.func_or_class(f"sqlite:///{tmp_path / 'mlflow.db'}")
    serving = TierRunner(model=None, version="digits-cheap/1")  # type: ignore[arg-type]
    tier.runner = serving
    missing = {"model": {"registered_name": "digits-cheap", "model_ref": "9"}}
    asyncio.run(tier.reconfigure(missing))
    assert tier.runner is serving

    fresh = TierModel.func_or_class(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(Exception, match="no version or alias '9'"):
        asyncio.run(fresh.reconfigure(missing))  # nothing to keep: the replica fails
