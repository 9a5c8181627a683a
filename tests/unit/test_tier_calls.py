"""How the ingress calls a tier: one retry for a failed call, none for one refused for
load, and a 503 either way when it cannot answer; an error the tier raised on purpose
reaches the caller as it is, and a bug in the tier's code is a 500, never retried. The
handle is a stand-in for a Ray Serve DeploymentHandle (no cluster here); the errors are
Ray's own."""

from __future__ import annotations

import asyncio
import gc
import logging

import numpy as np
import pytest
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from app.errors import NotFound, Overloaded, ServiceUnavailable, TierError
from serve_graphs.decide.tier_calls import tier_fn


class Handle:
    """`handle.predict.remote(x)` that fails with the given errors first."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.predict = self

    def remote(self, instances: np.ndarray, model_id: str | None = None, requests=()):  # noqa: ANN001, ANN201
        self.calls += 1
        self.requests = requests

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


def test_predictions_leave_no_garbage_for_the_cyclic_collector() -> None:
    """Under load the ingress made ~100 tier calls a second. Garbage in reference
    cycles from each (tenacity's retry state was ~30 objects) made the collector pause
    the ingress, and every request in it, for 25-80 ms every ~12 s. Here: 200
    predictions, 10 at a time, each escalated (both tiers answer 0.5), through
    coalesced tier calls as the cheap tier makes them (the whole graph's: test_graph)."""
    from serve_graphs.decide.cascade import Cascade, CascadeRoute
    from serve_graphs.decide.coalesce import Coalescer

    def tier(name: str) -> Coalescer:
        fn = tier_fn(Handle(), name, retry_wait_s=0)
        return Coalescer(fn, max_in_flight=2, max_rows=64, max_waiting_rows=1024, timeout_s=5)

    async def predictions() -> int:
        cheap, expensive = tier("cheap"), tier("expensive")

        async def cheap_answer(rows: np.ndarray, model_id: str | None):  # noqa: ANN202
            return await cheap(rows)

        cascade = Cascade(
            cheap_answer, lambda model_id: expensive, breaker_failures=5, breaker_reset_s=10
        )
        route = CascadeRoute("3", None, None, threshold=0.6)
        await cascade(np.zeros((1, 4)), route)  # warm: the breaker and caller are made once
        gc.collect()
        gc.disable()  # count what they leave, not what a collection mid-way freed
        try:
            for _ in range(20):
                await asyncio.gather(*(cascade(np.zeros((1, 4)), route) for _ in range(10)))
            return gc.collect()
        finally:
            gc.enable()

    assert asyncio.run(predictions()) < 20  # with tenacity: ~4,500


def test_a_call_refused_for_load_is_not_retried() -> None:
    handle = Handle(BackPressureError(num_queued_requests=9, max_queued_requests=8))
    with pytest.raises(Overloaded, match="at capacity"):
        call(handle)
    assert handle.calls == 1


def test_a_bug_in_the_tier_is_a_tier_error_and_is_not_retried() -> None:
    """An exception of the tier's own code (not one of ours) arrives wrapped in a
    RayTaskError: a 500 naming its type only (its message may quote the request's
    values), never retried as if the replica had died."""
    bug = RayTaskError("predict", "tb", ValueError("row 3 is secret")).as_instanceof_cause()
    handle = Handle(bug)
    with pytest.raises(TierError, match="ValueError") as raised:
        call(handle)
    assert "secret" not in str(raised.value)
    assert raised.value.status_code == 500
    assert handle.calls == 1


def test_an_error_the_tier_raised_on_purpose_reaches_the_caller_as_it_is() -> None:
    missing = NotFound("model 'digits-cheap' has no version or alias '9'")
    handle = Handle(RayTaskError("predict", "tb", missing).as_instanceof_cause())
    with pytest.raises(NotFound, match="no version or alias '9'") as raised:
        call(handle)
    assert not isinstance(raised.value, RayTaskError)  # ours, not Ray's wrapper
    assert raised.value.status_code == 404
    assert handle.calls == 1


def test_a_combined_call_tells_the_tier_whose_rows_it_carries() -> None:
    """The tier logs the request ids of a coalesced call; the call itself runs in a
    context of its own, so no single request's cancellation can reach it."""
    import contextvars

    from serve_graphs.decide.coalesce import Coalescer

    request = contextvars.ContextVar("request", default="?")
    handle = Handle()
    coalesced = Coalescer(
        tier_fn(handle, "cheap", retry_wait_s=0),
        max_in_flight=1,
        max_rows=64,
        max_waiting_rows=64,
        timeout_s=5,
        tag=request.get,
    )

    async def one(request_id: str, rows: int) -> int:
        request.set(request_id)
        return len((await coalesced(np.zeros((rows, 4)))).probs)

    async def burst() -> list[int]:
        return await asyncio.gather(one("r1", 1), one("r2", 2), one("r3", 3))

    assert asyncio.run(burst()) == [1, 2, 3]
    assert handle.calls == 2 and handle.requests == ("r2", "r3")  # r1 went alone, first


def test_the_cheap_tier_escalates_through_its_handle_and_names_the_requests(tmp_path) -> None:  # noqa: ANN001
    """TierModel wired as the builder wires the cheap tier: its own model answers, the
    unsure rows go to the expensive tier's handle with the ids of the HTTP requests."""
    from serve_graphs.decide.cascade import CascadeRoute
    from serve_graphs.decide.tier import TierModelRef, TierRunner, Work
    from serve_graphs.tier_model import TierModel

    class SureOfOnes:
        def predict_proba(self, rows: np.ndarray) -> np.ndarray:
            sure = np.asarray(rows)[:, 0] == 1
            return np.where(sure[:, None], [[0.9, 0.1]], [[0.6, 0.4]])

    expensive = Handle()
    settings = {"expensive_timeout_s": 5, "tier_calls_in_flight": 1}
    tier = TierModel.func_or_class(f"sqlite:///{tmp_path / 'mlflow.db'}", expensive, settings)
    serving = TierRunner(SureOfOnes(), "digits-cheap/1")  # type: ignore[arg-type]
    tier.tier.swap(serving, TierModelRef(registered_name="digits-cheap", model_ref="1"))

    async def unbatched(work: Work) -> tuple[np.ndarray, str]:
        runner = work.runner or tier.tier.runner
        return runner.model.predict_proba(work.rows), runner.version

    tier.tier.submit = unbatched  # @serve.batch runs only inside a Serve replica
    route = CascadeRoute("", None, None, 0.7, {})
    answer = asyncio.run(tier.cascade(np.array([[1.0, 0.0], [0.0, 0.0]]), route, ("r1", "r2")))
    assert [p.tier for p in answer.predictions] == ["cheap", "expensive"]
    assert expensive.calls == 1 and expensive.requests == ("r1 r2",)
    with pytest.raises(RuntimeError, match="only the cheap tier"):
        plain = TierModel.func_or_class(f"sqlite:///{tmp_path / 'mlflow.db'}")
        asyncio.run(plain.cascade(np.zeros((1, 2)), route))


def test_a_swap_that_cannot_load_keeps_the_version_that_serves(tmp_path) -> None:  # noqa: ANN001
    """Serve stops a replica whose reconfigure raises; a failed swap must not do that."""
    from serve_graphs.decide.tier import TierModelRef, TierRunner
    from serve_graphs.tier_model import TierModel

    tier = TierModel.func_or_class(f"sqlite:///{tmp_path / 'mlflow.db'}")
    serving = TierRunner(model=None, version="digits-cheap/1")  # type: ignore[arg-type]
    tier.tier.swap(serving, TierModelRef(registered_name="digits-cheap", model_ref="1"))
    missing = {"model": {"registered_name": "digits-cheap", "model_ref": "9"}}
    asyncio.run(tier.reconfigure(missing))
    assert tier.tier.runner is serving

    fresh = TierModel.func_or_class(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(Exception, match="no version or alias '9'"):
        asyncio.run(fresh.reconfigure(missing))  # nothing to keep: the replica fails


def test_the_replica_watch_keeps_the_last_count_while_a_redeploy_lists_no_deployments(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What ``serve.status()`` says while a redeploy replaces the application (no
    deployments listed for a moment) is no failure to warn about with a traceback every
    2 s: the callers keep the last count, and take the new one once it is listed."""
    from types import SimpleNamespace

    from serve_graphs.decide import tier_calls

    def status(deployments: dict) -> SimpleNamespace:
        return SimpleNamespace(applications={"digits": SimpleNamespace(deployments=deployments)})

    cheap = SimpleNamespace(app_name="digits", deployment_name="cheap-tier")
    running = {"cheap": 2}
    three = SimpleNamespace(replica_states={"RUNNING": 3})
    answers = iter([status({}), SimpleNamespace(applications={}), status({"cheap-tier": three})])
    monkeypatch.setattr(tier_calls.serve, "status", lambda: next(answers))
    with caplog.at_level(logging.WARNING, logger=tier_calls.log.name):
        for expected in (2, 2, 3):
            asyncio.run(tier_calls.watch_replicas({"cheap": cheap}, running, once=True))
            assert running == {"cheap": expected}
    assert not caplog.records
