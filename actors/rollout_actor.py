"""The rollout controller actor: one per cluster, named, detached, over
:class:`actors.rollout.Controller`.

A thread ticks the controller every ``tick_s``; commands (start, status, pause, resume,
abort) arrive as actor calls and run under the same lock, one decision at a time. Its
statistics come from the serving-stats actor; the routing table, the promotion and its
state through the ports its creator hands in (serve_graphs/rollouts.py), so this file
knows nothing of Serve. Every decision is a JSON log line and a Prometheus series.

``max_restarts=-1``: killed, Ray starts it again with the same arguments; it restores
the rollouts of the models it was created for from their saved state and goes on at the
same step and the same point of the hold (the state holds absolute times).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import ray
from ray.util import metrics

from actors.named import named_actor
from actors.rollout import Controller, PromotePort, RoutesPort, StatePort
from actors.rollout_spec import Event
from actors.serving_stats import serving_stats
from actors.stats import Summary
from app.logs import event as log_event
from app.logs import events

NAME = "scaledl-rollouts"
TICK_S = 1.0  # also how often the gauges are set again (Ray drops idle ones)

log = logging.getLogger("scaledl.rollouts")


class StatsWindows:
    """The controller's statistics port over the serving-stats actor (blocking calls:
    the controller runs in the actor's threads, never on an event loop)."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        self.actor: ray.actor.ActorHandle | None = None

    def window(self, model: str, version: str, start: float, end: float) -> Summary:
        self.actor = self.actor or serving_stats()
        ref = self.actor.window.remote(model, version, start, end)
        return Summary.model_validate(ray.get(ref, timeout=self.timeout_s))


class RolloutMetrics:
    """The rollout series: the current step and weight, and decisions by kind and verdict."""

    def __init__(self) -> None:
        self.weight = metrics.Gauge(
            "scaledl_rollout_challenger_weight",
            description="The challenger's percent of traffic in the model's active rollout "
            "(0 while shadowing or once ended).",
            tag_keys=("model", "challenger"),
        )
        self.step = metrics.Gauge(
            "scaledl_rollout_step",
            description="The active rollout's step, 1-based (0: the shadow phase; -1: ended).",
            tag_keys=("model", "challenger"),
        )
        self.decisions = metrics.Counter(
            "scaledl_rollout_decisions",
            description="Rollout decisions by kind (started, passed, rolled_back, promoted, "
            "paused, ...) and verdict (pass, fail, inconclusive, none).",
            tag_keys=("model", "kind", "verdict"),
        )

    def gauges(self, event: Event, challenger: str, active: bool) -> None:
        """The step and weight as of the rollout's last decision."""
        tags = {"model": event.model, "challenger": challenger}
        self.weight.set(event.weight if active else 0, tags=tags)
        self.step.set(event.step + 1 if active else -1, tags=tags)

    def event(self, event: Event, challenger: str, active: bool) -> None:
        self.gauges(event, challenger, active)
        self.decisions.inc(
            tags={"model": event.model, "kind": event.kind, "verdict": event.verdict or "none"}
        )


class RolloutController:
    """The actor's body."""

    def __init__(
        self,
        routes: RoutesPort,
        promoter: PromotePort,
        store: StatePort,
        models: list[str],
        tick_s: float = TICK_S,
    ) -> None:
        events("rollouts")  # JSON lines on the actor's stderr: its log file (app/logs.py)
        self.lock = threading.Lock()  # the ticks and the commands: one decision at a time
        self.metrics = RolloutMetrics()
        self.controller = Controller(
            StatsWindows(), routes, promoter, store, on_event=self._on_event
        )
        for model in models:
            try:
                state = self.controller.restore(model)
            except Exception:  # noqa: BLE001 - the registry may lag; commands restore again
                log.exception("restoring the rollout of %s failed", model)
                continue
            if state is not None and state.active:
                log.info("resumed the rollout of %s at step %s", model, state.step)
        self.tick_s = tick_s
        threading.Thread(target=self._loop, name="rollout-ticks", daemon=True).start()

    def _loop(self) -> None:
        while True:
            time.sleep(self.tick_s)
            with self.lock:
                try:
                    self.controller.tick()
                    self._refresh_gauges()
                except Exception:  # noqa: BLE001 - a bad tick must not end the loop
                    log.exception("a rollout tick failed; the next one tries again")

    def _refresh_gauges(self) -> None:
        """Ray 2.60 drops a gauge from the export about two report intervals after it was
        last set (as train/metrics.py found), so the step and weight are set again on
        every tick, not only at a decision."""
        for state in self.controller.rollouts.values():
            if state.events:
                self.metrics.gauges(state.events[-1], state.spec.challenger, state.active)

    def _on_event(self, event: Event) -> None:
        state = self.controller.rollouts[event.model]
        self.metrics.event(event, state.spec.challenger, state.active)
        fields = event.model_dump(mode="json")
        log_event(log, "rollout", challenger=state.spec.challenger, status=state.status, **fields)

    # Commands: each returns the model's status, as `scaledl rollout status` shows it.

    def start(self, spec: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            state = self.controller.start(spec)
            return self.controller.status(state.spec.model)

    def status(self, model: str) -> dict[str, Any]:
        with self.lock:
            return self.controller.status(model)

    def pause(self, model: str) -> dict[str, Any]:
        with self.lock:
            self.controller.pause(model)
            return self.controller.status(model)

    def resume(self, model: str) -> dict[str, Any]:
        with self.lock:
            self.controller.resume(model)
            return self.controller.status(model)

    def abort(self, model: str) -> dict[str, Any]:
        with self.lock:
            self.controller.abort(model)
            return self.controller.status(model)


def rollout_controller(
    routes: RoutesPort, promoter: PromotePort, store: StatePort, models: list[str]
) -> ray.actor.ActorHandle:
    """The cluster's rollout controller, created on first use with these ports (a later
    caller's ports are not used: the running actor keeps its own)."""
    return named_actor(RolloutController, NAME, routes, promoter, store, models)
