"""The rollout controller (actors/rollout.py), driven through simulated traffic: fake
ports, a fake clock, and the real Recorder and StatsStore in between."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from actors.rollout import Controller
from actors.rollout_spec import RolloutSpec, RolloutState
from actors.stats import Recorder, StatsStore
from app.errors import Conflict, InvalidRequest, NotFound
from tests.conftest import FakeClock

T0 = 1_700_000_000.0
MODEL = "digits"


class FakeRoutes:
    """The routing table as the registry keeps it: text, changed only through set/clear."""

    def __init__(self, known: set[str]) -> None:
        self.known, self.text, self.writes = known, None, 0

    def get(self, model: str) -> str | None:
        return self.text

    def set(self, model: str, weights: dict[str, int], shadow: str | None) -> str:
        unknown = [v for v in [*weights, *([shadow] if shadow else [])] if v not in self.known]
        if unknown or sum(weights.values()) != 100:
            raise InvalidRequest(f"invalid routing table: unknown version {unknown}")
        self.writes += 1
        self.text = json.dumps({"routes": weights, "shadow": shadow, "n": self.writes})
        return self.text

    def clear(self, model: str) -> None:
        self.text = None

    def table(self) -> tuple[dict[str, int] | None, str | None]:
        if self.text is None:
            return None, None
        table = json.loads(self.text)
        return table["routes"], table["shadow"]


class FakeRegistry:
    def __init__(self) -> None:
        self.champion, self.promoted = "3", []

    def promote(self, model: str, version: str) -> None:
        self.promoted.append((model, version))
        self.champion = version


class FakeStateStore:
    def __init__(self) -> None:
        self.texts: dict[str, str] = {}

    def load(self, model: str) -> str | None:
        return self.texts.get(model)

    def save(self, model: str, text: str) -> None:
        self.texts[model] = text


class World:
    """A service under load: ``rate`` requests a second, split by the routing table, each
    version failing, slowing or (as a shadow) disagreeing as told."""

    def __init__(self, rate: int = 100, **versions: dict) -> None:
        self.rate = rate
        self.behaviour = {"3": {}, "4": {}, **versions}
        self.clock = FakeClock()
        self.clock.now = T0
        self.recorder = Recorder(clock=self.clock)
        self.stats = StatsStore(clock=self.clock)
        self.routes = FakeRoutes(known=set(self.behaviour))
        self.registry = FakeRegistry()
        self.store = FakeStateStore()
        self.events: list = []
        self.rng = np.random.default_rng(0)
        self.pick = random.Random(0)
        self.failed_for: dict[str, int] = {}

    def controller(self) -> Controller:
        return Controller(
            self.stats,
            self.routes,
            self.registry,
            self.store,
            on_event=self.events.append,
            clock=self.clock,
        )

    def serve_one_second(self) -> None:
        weights, shadow = self.routes.table()
        weights = weights or {self.registry.champion: 100}
        versions = list(weights)
        for _ in range(self.rate):
            version = self.pick.choices(versions, weights=list(weights.values()))[0]
            b = self.behaviour[version]
            ms = self.rng.lognormal(np.log(20), 0.3) + b.get("extra_ms", 0)
            status = 500 if self.pick.random() < b.get("error_share", 0) else 200
            self.failed_for[version] = self.failed_for.get(version, 0) + (status == 500)
            self.recorder.request(MODEL, version, status, ms / 1000)
            if shadow:
                disagree = self.pick.random() < self.behaviour[shadow].get("disagree", 0)
                self.recorder.shadow(MODEL, shadow, agree=int(not disagree), disagree=disagree)

    def run(self, controller: Controller | None, seconds: int) -> None:
        """Serve and report every second, then tick, as replicas and the actor would."""
        for _ in range(seconds):
            self.serve_one_second()
            self.clock.now += 1
            self.stats.add(self.recorder.drain())
            if controller is not None:
                controller.tick()

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


def spec(**kw: object) -> dict:
    base = {"model": MODEL, "champion": "3", "challenger": "4", "hold_s": 30, "min_requests": 100}
    return base | kw


def test_a_challenger_failing_20_percent_is_rolled_back_at_the_first_step() -> None:
    world = World(**{"4": {"error_share": 0.2}})
    controller = world.controller()
    controller.start(spec(steps=[25, 50, 100]))
    assert world.routes.table() == ({"3": 75, "4": 25}, None)
    world.run(controller, 200)
    state = controller.get(MODEL)
    assert (state.status, state.step) == ("rolled_back", 0)
    assert world.routes.text is None and world.registry.promoted == []
    last = world.events[-1]
    assert (last.kind, last.verdict, last.step, last.weight) == ("rolled_back", "fail", 0, 25)
    errors = next(g for g in last.judgement.gates if g.gate == "errors")
    assert errors.verdict == "fail"
    assert errors.figures["challenger_error_rate"] == pytest.approx(0.2, abs=0.05)
    assert errors.thresholds["confidence"] == 0.99
    assert world.failed_for.get("3", 0) == 0  # the champion's users saw no failure
    assert "errors:" in state.reason


def test_a_challenger_50_ms_slower_is_rolled_back_on_latency() -> None:
    world = World(**{"4": {"extra_ms": 50}})
    controller = world.controller()
    controller.start(spec(steps=[25, 100]))
    world.run(controller, 60)
    state = controller.get(MODEL)
    assert state.status == "rolled_back"
    gates = {g.gate: g for g in state.events[-1].judgement.gates}
    assert (gates["errors"].verdict, gates["latency"].verdict) == ("pass", "fail")
    assert gates["latency"].figures["p99_ratio"] > 1.2
    assert gates["latency"].thresholds["max_p99_ratio"] == 1.2


def test_a_good_challenger_goes_through_every_step_and_is_promoted() -> None:
    world = World()
    controller = world.controller()
    controller.start(spec())
    seen = []
    for _ in range(4 * 40):
        world.run(controller, 1)
        if world.routes.table()[0] and world.routes.table()[0] not in seen:
            seen.append(world.routes.table()[0])
    state = controller.get(MODEL)
    assert state.status == "promoted"
    assert seen == [{"3": 100 - w, "4": w} for w in (5, 25, 50, 100)]
    assert world.registry.promoted == [(MODEL, "4")]
    assert world.routes.text is None  # what serves now follows the champion alias
    assert world.kinds() == ["started"] + ["passed", "step"] * 3 + ["passed", "promoted"]
    assert all(e.verdict == "pass" for e in world.events if e.kind == "passed")
    view = controller.status(MODEL)
    assert [s["verdict"] for s in view["steps"]] == ["pass"] * 4
    assert view["weights"] is None and view["status"] == "promoted"
    gate = view["steps"][0]["gates"][1]
    assert gate["gate"] == "latency" and {"p99_ratio", "p_value"} <= set(gate["figures"])
    assert gate["thresholds"] == {"max_p99_ratio": 1.2, "tolerance": 0.05, "confidence": 0.99}
    saved = RolloutState.model_validate_json(world.store.texts[MODEL])
    assert saved == state and [e.kind for e in saved.events] == world.kinds()


def test_at_100_percent_the_challenger_is_judged_against_the_champions_step_before() -> None:
    world = World()
    controller = world.controller()
    controller.start(spec(steps=[50, 100]))
    world.run(controller, 30)
    assert world.routes.table() == ({"3": 0, "4": 100}, None)
    world.behaviour["4"]["extra_ms"] = 50  # slower once it takes all the traffic
    world.run(controller, 30)
    state = controller.get(MODEL)
    assert state.status == "rolled_back" and state.baseline == (T0, T0 + 30)
    latency = state.events[-1].judgement.gates[1]
    assert latency.verdict == "fail" and latency.figures["champion_samples"] > 1000


def test_a_straight_cutover_is_judged_against_the_champions_traffic_before_it() -> None:
    world = World()
    world.run(None, 30)  # the champion alone, before the rollout
    controller = world.controller()
    controller.start(spec(steps=[100]))
    world.run(controller, 30)
    assert controller.get(MODEL).status == "promoted"
    assert world.registry.promoted == [(MODEL, "4")]


def test_no_traffic_is_inconclusive_extended_once_then_paused_never_promoted() -> None:
    world = World(rate=0)
    controller = world.controller()
    controller.start(spec(deadline_s=60))
    world.run(controller, 59)
    assert world.kinds() == ["started"] and controller.get(MODEL).status == "stepping"
    assert controller.status(MODEL)["steps"][0]["verdict"] == "inconclusive"
    world.run(controller, 1)
    assert world.kinds() == ["started", "extended"]
    world.run(controller, 59)
    assert world.kinds() == ["started", "extended"]
    world.run(controller, 1)
    state = controller.get(MODEL)
    assert (state.status, world.kinds()[-1], world.events[-1].verdict) == (
        "paused",
        "paused",
        "inconclusive",
    )
    assert "too little data" in state.reason
    world.run(controller, 600)
    assert controller.tick() == [] and world.kinds()[-1] == "paused"
    assert state.status == "paused" and world.registry.promoted == []
    assert world.routes.table() == ({"3": 95, "4": 5}, None)  # held, not moved


def test_a_restarted_controller_resumes_at_the_same_step_and_point_of_its_hold() -> None:
    world = World()
    first = world.controller()
    first.start(spec())
    world.run(first, 30)  # step 1 passed at its first tick past the hold: T0 + 30
    assert world.kinds() == ["started", "passed", "step"]
    world.run(first, 20)
    before = first.status(MODEL)
    del first  # the actor is killed mid-step

    second = world.controller()
    assert second.restore(MODEL) is not None
    after = second.status(MODEL)
    assert (after["step"], after["hold_left_s"]) == (before["step"], before["hold_left_s"])
    assert after["step"] == "2 (25 %)" and after["hold_left_s"] == 10
    world.run(second, 9)
    assert world.kinds()[-1] == "step"
    world.run(second, 1)
    assert world.kinds()[-2:] == ["passed", "step"]
    assert world.events[-1].time == T0 + 60 and world.events[-1].weight == 50


def test_a_table_changed_by_hand_pauses_the_rollout_and_resume_writes_it_again() -> None:
    world = World()
    controller = world.controller()
    controller.start(spec())
    world.run(controller, 10)
    world.routes.text = json.dumps({"routes": {"3": 50, "4": 50}, "shadow": None})
    world.run(controller, 1)
    state = controller.get(MODEL)
    assert state.status == "paused" and "changed by hand" in state.reason
    assert world.routes.table() == ({"3": 50, "4": 50}, None)  # the operator's table stays
    world.run(controller, 100)
    assert world.kinds() == ["started", "paused"]
    controller.resume(MODEL)
    assert state.status == "stepping" and state.step_started == world.clock.now
    assert world.routes.table() == ({"3": 95, "4": 5}, None)
    world.run(controller, 40)
    assert world.kinds()[-3:] == ["resumed", "passed", "step"]


def test_pause_holds_resume_restarts_the_hold_and_abort_goes_back_to_the_champion() -> None:
    world = World()
    controller = world.controller()
    controller.start(spec())
    world.run(controller, 20)
    controller.pause(MODEL)
    world.run(controller, 100)
    assert controller.get(MODEL).status == "paused" and world.kinds() == ["started", "paused"]
    with pytest.raises(Conflict, match="paused already"):
        controller.pause(MODEL)
    controller.resume(MODEL)
    world.run(controller, 29)
    assert world.kinds()[-1] == "resumed"  # a fresh 30 s hold
    controller.abort(MODEL)
    assert controller.get(MODEL).status == "aborted" and world.routes.text is None
    with pytest.raises(Conflict, match="has ended"):
        controller.resume(MODEL)
    with pytest.raises(NotFound, match="no rollout of 'transactions'"):
        controller.status("transactions")


def test_a_shadow_phase_judges_disagreement_before_any_weight_moves() -> None:
    world = World(**{"4": {"disagree": 0.01}})
    controller = world.controller()
    controller.start(spec(shadow_first_s=20))
    assert world.routes.table() == ({"3": 100}, "4")
    assert controller.status(MODEL)["step"] == "shadow"
    world.run(controller, 20)
    passed = world.events[-2]
    assert (passed.kind, passed.step, passed.judgement.gates[0].gate) == ("passed", -1, "shadow")
    assert world.routes.table() == ({"3": 95, "4": 5}, None)

    bad = World(**{"4": {"disagree": 0.2}})
    controller = bad.controller()
    controller.start(spec(shadow_first_s=20))
    bad.run(controller, 20)
    assert controller.get(MODEL).status == "rolled_back" and bad.routes.text is None
    assert bad.events[-1].judgement.gates[0].figures["disagreement"] > 0.05


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"steps": "5,5,100"}, "--steps must strictly increase"),
        ({"steps": [50, 25, 100]}, "--steps must strictly increase"),
        ({"steps": "5,25,50"}, "--steps must end at 100"),
        ({"steps": [0, 100]}, "--steps: each step is a percent from 1 to 100"),
        ({"steps": [50, 150]}, "--steps: each step is a percent from 1 to 100"),
        ({"steps": "5,half,100"}, "--steps: 'half' is not a whole percent"),
        ({"challenger": "v3"}, "--challenger: v3 is the champion already"),
        ({"challenger": "challenger"}, "--challenger: 'challenger' is not a cascade version"),
        ({"hold_s": 0}, "--hold must be more than 0"),
        ({"hold_s": "2x"}, "--hold: '2x' is not a duration"),
        ({"shadow_first_s": -5}, "--shadow-first must be 0 (off) or more"),
        ({"min_requests": 0}, "--min-requests must be at least 1"),
        ({"deadline_s": 10}, "--deadline (10 s) must be at least --hold"),
        ({"gates": {"confidence": 1.5}}, "gates.confidence: confidence must be between"),
        ({"gates": {"max_disagreement": -1}}, "gates.max_disagreement: max_disagreement is a"),
        ({"hold": 30}, "hold: Extra inputs are not permitted"),
    ],
)
def test_bad_specs_are_refused_with_a_clear_message_and_no_state_change(
    change: dict, says: str
) -> None:
    world = World()
    controller = world.controller()
    with pytest.raises(InvalidRequest, match="invalid rollout: .*" + re.escape(says)):
        controller.start(spec(**change))
    assert world.store.texts == {} and world.routes.writes == 0 and world.events == []
    assert controller.restore(MODEL) is None


def test_an_unknown_version_is_refused_before_any_state_is_written() -> None:
    world = World()
    controller = world.controller()
    with pytest.raises(InvalidRequest, match="unknown version"):
        controller.start(spec(challenger="9"))
    assert world.store.texts == {} and world.events == [] and controller.restore(MODEL) is None


def test_a_second_rollout_while_one_runs_is_refused_also_after_a_restart() -> None:
    world = World(**{"5": {}})
    controller = world.controller()
    controller.start(spec())
    text = world.routes.text
    with pytest.raises(Conflict, match="is stepping: abort it before starting another"):
        controller.start(spec(challenger="5"))
    with pytest.raises(Conflict, match="abort it"):
        world.controller().start(spec(challenger="5"))  # a restarted controller knows too
    assert world.routes.text == text and controller.get(MODEL).spec.challenger == "4"
    controller.abort(MODEL)
    assert controller.start(spec(challenger="5")).status == "stepping"


def test_the_spec_parses_cli_forms_and_reports_every_mistake_at_once() -> None:
    parsed = RolloutSpec.parse(spec(champion="v3", steps="10, 100", hold_s="2m"))
    assert (parsed.champion, parsed.steps, parsed.hold_s) == ("3", [10, 100], 120)
    assert parsed.deadline_of(0) == 360 and parsed.weight_of(0) == 10
    assert RolloutSpec.parse(spec(shadow_first_s="1m30s")).hold_of(-1) == 90
    with pytest.raises(InvalidRequest) as caught:
        RolloutSpec.parse(spec(steps="5,5,100", hold_s=0, min_requests=0))
    assert caught.value.message.count("; ") == 2 and caught.value.status_code == 400
