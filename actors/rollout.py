"""The rollout controller, free of Ray: moves a challenger through canary steps, judges it
against the champion on live statistics at each, and promotes it or rolls it back.

A :class:`Controller` holds at most one active :class:`RolloutState` per model and is
driven by :meth:`Controller.tick` calls (the actor wrapper ticks it every few seconds).
Everything outside it arrives through ports (statistics windows, the routing table,
the registry's aliases, where the state is kept), so tests drive it with fakes and a
fake clock, and production with the stats actor and the registry.

The life of a rollout::

    start ─► [shadow: champion 100 %, challenger mirrored, for --shadow-first]
          ─► step i: champion 100-w %, challenger w %  ─ hold, then judge on [step start, now)
               pass ─► step i+1 … after 100 %: promote, clear the table   (promoted)
               fail ─► clear the table: the champion serves everything    (rolled_back)
               too little data by the deadline ─► extend once, then pause (paused)

State is saved on every decision and holds absolute times, so a controller restarted
from it resumes at the same step and the same point of its hold. Every decision is an
:class:`Event` carrying the figures and thresholds it was made on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from actors.gates import Gate, Judgement, judge
from actors.rollout_spec import SHADOW, Event, EventKind, RolloutSpec, RolloutState
from actors.stats import Summary
from app.errors import Conflict, NotFound


class StatsPort(Protocol):
    def window(self, model: str, version: str, start: float, end: float) -> Summary: ...


class RoutesPort(Protocol):
    """The routing table, with the same validation as ``PUT /routes`` (which raises a
    ScaledlError naming an unknown model or version)."""

    def get(self, model: str) -> str | None: ...

    def set(self, model: str, weights: dict[str, int], shadow: str | None) -> str: ...

    def clear(self, model: str) -> None: ...


class PromotePort(Protocol):
    def promote(self, model: str, version: str) -> None:
        """Move the cascade's champion alias to ``version``, keeping previous-champion."""


class StatePort(Protocol):
    def load(self, model: str) -> str | None: ...

    def save(self, model: str, text: str) -> None: ...


class Controller:
    """Every model's rollout; at most one active per model, whatever the store holds."""

    def __init__(
        self,
        stats: StatsPort,
        routes: RoutesPort,
        promoter: PromotePort,
        store: StatePort,
        *,
        on_event: Callable[[Event], None] = lambda event: None,
        clock: Callable[[], float] = time.time,
        extra_gates: Sequence[Gate] = (),
    ) -> None:
        self.stats, self.routes, self.promoter, self.store = stats, routes, promoter, store
        self.on_event = on_event
        self.clock = clock
        self.extra_gates = list(extra_gates)  # joins the step gates (e.g. live accuracy)
        self.rollouts: dict[str, RolloutState] = {}

    # ------------------------------------------------------------------ commands

    def restore(self, model: str) -> RolloutState | None:
        """The model's saved rollout, loaded (a restarted controller calls this)."""
        if model not in self.rollouts:
            text = self.store.load(model)
            if text is None:
                return None
            self.rollouts[model] = RolloutState.model_validate_json(text)
        return self.rollouts[model]

    def get(self, model: str) -> RolloutState:
        state = self.restore(model)
        if state is None:
            raise NotFound(f"no rollout of {model!r}: start one with `scaledl rollout start`")
        return state

    def start(self, spec: RolloutSpec | dict[str, Any]) -> RolloutState:
        """Start a rollout. Bad input raises before anything is written."""
        spec = spec if isinstance(spec, RolloutSpec) else RolloutSpec.parse(spec)
        current = self.restore(spec.model)
        if current is not None and current.active:
            raise Conflict(
                f"a rollout of {spec.model} (v{current.spec.challenger}) is {current.status}: "
                "abort it before starting another"
            )
        now = self.clock()
        first = SHADOW if spec.shadow_first_s > 0 else 0
        text = self._write(spec, first)  # validates the versions; raises before any state
        state = RolloutState(
            spec=spec, status="stepping", step=first, step_started=now, deadline=now
        )
        self.rollouts[spec.model] = state
        reason = f"v{spec.challenger} against v{spec.champion}, steps {spec.steps}"
        self._enter(state, first, now, text, kind="started", reason=reason)
        return state

    def pause(self, model: str, reason: str = "paused by an operator") -> RolloutState:
        state = self._active(model)
        if state.status == "paused":
            raise Conflict(f"the rollout of {model} is paused already: {state.reason}")
        self._pause(state, self.clock(), reason)
        return state

    def resume(self, model: str) -> RolloutState:
        """Restart the paused step: its weights written again, a fresh hold and window."""
        state = self._active(model)
        if state.status != "paused":
            raise Conflict(f"the rollout of {model} is {state.status}, not paused")
        now = self.clock()
        text = self._write(state.spec, state.step)
        self._enter(state, state.step, now, text, kind="resumed")
        return state

    def abort(self, model: str) -> RolloutState:
        """Back to the champion alone, at once."""
        state = self._active(model)
        self.routes.clear(model)
        state.routes_text, state.status, state.reason = None, "aborted", "aborted by an operator"
        self._emit(state, "aborted", self.clock(), reason=state.reason)
        return state

    def tick(self, now: float | None = None) -> list[Event]:
        """Advance every active rollout; the events of the decisions taken."""
        now = self.clock() if now is None else now
        events: list[Event] = []
        for state in list(self.rollouts.values()):
            if state.status in ("shadowing", "stepping"):
                seen = len(state.events)
                self._tick(state, now)
                events.extend(state.events[seen:])
        return events

    # ------------------------------------------------------------------ the machine

    def _tick(self, state: RolloutState, now: float) -> None:
        spec = state.spec
        if self.routes.get(spec.model) != state.routes_text:
            self._pause(
                state,
                now,
                "the routing table was changed by hand during the rollout: check it, then "
                "resume (which writes this step's weights again) or abort",
            )
            return
        if now < state.step_started + spec.hold_of(state.step):
            return
        judgement = self._judge(state, now)
        state.judgements[state.step] = judgement
        if judgement.verdict == "pass":
            self._passed(state, now, judgement)
        elif judgement.verdict == "fail":
            self.routes.clear(spec.model)
            state.routes_text, state.status = None, "rolled_back"
            state.reason = f"failed at step {self._label(state)}: {judgement.reason}"
            self._emit(state, "rolled_back", now, judgement=judgement, reason=state.reason)
        elif now >= state.deadline and not state.extended:
            state.extended, state.deadline = True, now + spec.deadline_of(state.step)
            reason = f"too little data by the deadline, extended once: {judgement.reason}"
            self._emit(state, "extended", now, judgement=judgement, reason=reason)
        elif now >= state.deadline:
            reason = f"inconclusive past the extended deadline: {judgement.reason}"
            self._pause(state, now, reason, judgement)

    def _judge(self, state: RolloutState, now: float) -> Judgement:
        spec = state.spec
        gates = (
            spec.gates.shadow_gates()
            if state.step == SHADOW
            else [*spec.gates.step_gates(), *self.extra_gates]
        )
        start, end = state.step_started, now
        if spec.weight_of(state.step) == 100 and state.baseline:
            start, end = state.baseline  # the champion serves nothing now: its latest traffic
        champion = self.stats.window(spec.model, spec.champion, start, end)
        challenger = self.stats.window(spec.model, spec.challenger, state.step_started, now)
        return judge(gates, champion, challenger, spec.min_requests)

    def _passed(self, state: RolloutState, now: float, judgement: Judgement) -> None:
        spec = state.spec
        nxt = state.step + 1
        if nxt < len(spec.steps):
            text = self._write(spec, nxt)
            self._emit(state, "passed", now, judgement=judgement, reason=judgement.reason)
            self._enter(state, nxt, now, text)
            return
        self.promoter.promote(spec.model, spec.challenger)  # what serves follows the alias
        self.routes.clear(spec.model)
        self._emit(state, "passed", now, judgement=judgement, reason=judgement.reason)
        state.routes_text, state.status = None, "promoted"
        state.reason = f"v{spec.challenger} is the champion; v{spec.champion} is previous-champion"
        self._emit(state, "promoted", now, reason=state.reason)

    def _write(self, spec: RolloutSpec, step: int) -> str:
        """Write a step's routing table; the stored text, to notice a hand-made change."""
        w = spec.weight_of(step)
        if step == SHADOW:
            return self.routes.set(spec.model, {spec.champion: 100}, spec.challenger)
        return self.routes.set(spec.model, {spec.champion: 100 - w, spec.challenger: w}, None)

    def _enter(
        self,
        state: RolloutState,
        step: int,
        now: float,
        text: str,
        kind: EventKind | None = None,
        reason: str = "",
    ) -> None:
        """Make ``step`` current: its hold, window and deadline start ``now``."""
        spec = state.spec
        if spec.weight_of(step) == 100 and kind != "resumed":
            first = kind == "started"
            state.baseline = (now - spec.hold_s, now) if first else (state.step_started, now)
        state.step, state.step_started, state.routes_text = step, now, text
        state.deadline, state.extended = now + spec.deadline_of(step), False
        state.status, state.reason = ("shadowing" if step == SHADOW else "stepping"), ""
        default = "shadow" if step == SHADOW else "step"
        reason = reason or f"hold {spec.hold_of(step):g} s"
        self._emit(state, kind or default, now, reason=reason)

    def _pause(
        self, state: RolloutState, now: float, reason: str, judgement: Judgement | None = None
    ) -> None:
        state.status, state.reason = "paused", reason
        self._emit(state, "paused", now, judgement=judgement, reason=reason)

    def _active(self, model: str) -> RolloutState:
        state = self.get(model)
        if not state.active:
            raise Conflict(f"the rollout of {model} has ended ({state.status})")
        return state

    def _emit(
        self,
        state: RolloutState,
        kind: EventKind,
        now: float,
        *,
        judgement: Judgement | None = None,
        reason: str = "",
    ) -> None:
        """Record a decision: appended to the state, saved, then handed on (log, metrics)."""
        event = Event(
            time=now,
            model=state.spec.model,
            kind=kind,
            step=state.step,
            weight=state.spec.weight_of(state.step),
            verdict=judgement.verdict if judgement else None,
            reason=reason,
            judgement=judgement,
        )
        state.events.append(event)
        self.store.save(state.spec.model, state.model_dump_json())
        self.on_event(event)

    # ------------------------------------------------------------------ the view

    @staticmethod
    def _label(state: RolloutState) -> str:
        if state.step == SHADOW:
            return "shadow"
        return f"{state.step + 1} ({state.spec.steps[state.step]} %)"

    def status(self, model: str) -> dict[str, Any]:
        """What ``scaledl rollout status`` prints: the steps and their verdicts, each
        gate's figures and thresholds, and the weights now."""
        state, now = self.get(model), self.clock()
        spec = state.spec
        phases = ([SHADOW] if spec.shadow_first_s > 0 else []) + list(range(len(spec.steps)))
        steps = []
        for i in phases:
            j = state.judgements.get(i)
            current = i == state.step and state.active
            steps.append(
                {
                    "step": "shadow" if i == SHADOW else i + 1,
                    "weight": spec.weight_of(i),
                    "current": current,
                    "verdict": j.verdict if j else None,
                    "reason": j.reason if j else None,
                    "gates": [g.model_dump() for g in j.gates] if j else [],
                }
            )
        hold_end = state.step_started + spec.hold_of(state.step)
        return {
            "model": model,
            "champion": spec.champion,
            "challenger": spec.challenger,
            "status": state.status,
            "reason": state.reason,
            "spec": spec.model_dump(),
            "step": self._label(state),
            "weights": self._weights(state),
            "shadow": spec.challenger if state.active and state.step == SHADOW else None,
            "hold_left_s": round(max(0.0, hold_end - now), 1) if state.active else None,
            "deadline_in_s": round(state.deadline - now, 1) if state.active else None,
            "extended": state.extended,
            "steps": steps,
            "events": [e.model_dump(exclude={"judgement"}) for e in state.events],
        }

    @staticmethod
    def _weights(state: RolloutState) -> dict[str, int] | None:
        """The weights the rollout last wrote; None once the table is cleared."""
        if state.routes_text is None:
            return None
        spec, w = state.spec, state.spec.weight_of(state.step)
        return {spec.champion: 100 - w, spec.challenger: w}
