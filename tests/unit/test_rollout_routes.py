"""The rollout admin routes (serve_graphs/api/rollouts.py) over the real Controller, with
the fake ports of test_rollout: what `scaledl rollout` gets back, errors included."""

from __future__ import annotations

import warnings

from actors.rollout import Controller
from app.keys import KeyRing, dev_key
from tests.unit.test_api import AUTH, KEY, api_for, digits_graph
from tests.unit.test_rollout import World

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

ROLLOUT = "/v1/models/digits/rollout"


class LocalRollouts:
    """The controller actor's commands, in this process (actors/rollout_actor.py's body
    runs the same Controller calls under its lock)."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    async def start(self, spec: dict) -> dict:
        return self.controller.status(self.controller.start(spec).spec.model)

    async def status(self, model: str) -> dict:
        return self.controller.status(model)

    async def pause(self, model: str) -> dict:
        self.controller.pause(model)
        return self.controller.status(model)

    async def resume(self, model: str) -> dict:
        self.controller.resume(model)
        return self.controller.status(model)

    async def abort(self, model: str) -> dict:
        self.controller.abort(model)
        return self.controller.status(model)


def service() -> tuple[TestClient, World]:
    world = World()
    keys = KeyRing([dev_key(KEY), dev_key("only-predicts-0123456789", "p").model_copy(
        update={"scope": "predict"})])  # fmt: skip
    app = api_for(digits_graph(0.5), keys=keys, rollouts=LocalRollouts(world.controller()))
    return TestClient(app), world


def test_start_status_pause_resume_abort_over_http() -> None:
    http, world = service()
    resp = http.post(ROLLOUT, json={"challenger": "v4", "steps": "25,100", "hold_s": "1m"},
                     headers=AUTH)  # fmt: skip
    assert resp.status_code == 200, resp.text
    view = resp.json()
    # The champion defaults to the deployed version (3 here)
    assert (view["champion"], view["challenger"], view["status"]) == ("3", "4", "stepping")
    assert view["weights"] == {"3": 75, "4": 25} and world.routes.table()[0] == {"3": 75, "4": 25}
    assert view["spec"]["hold_s"] == 60 and [s["weight"] for s in view["steps"]] == [25, 100]

    assert http.get(ROLLOUT, headers=AUTH).json()["status"] == "stepping"
    assert http.post(f"{ROLLOUT}/pause", headers=AUTH).json()["status"] == "paused"
    assert http.post(f"{ROLLOUT}/resume", headers=AUTH).json()["status"] == "stepping"
    view = http.post(f"{ROLLOUT}/abort", headers=AUTH).json()
    assert view["status"] == "aborted" and view["weights"] is None
    assert world.routes.text is None  # the champion alone again
    assert [e["kind"] for e in view["events"]] == ["started", "paused", "resumed", "aborted"]


def test_bad_input_is_a_clear_error_and_changes_nothing() -> None:
    http, world = service()
    cases = [
        ({"challenger": "4", "steps": "5,50"}, 400, "--steps must end at 100"),
        ({"challenger": "4", "steps": "50,25,100"}, 400, "--steps must strictly increase"),
        ({"challenger": "4", "steps": "5,250"}, 400, "each step is a percent from 1 to 100"),
        ({"challenger": "3"}, 400, "v3 is the champion already"),
        ({"challenger": "4", "hold_s": "soon"}, 400, "--hold: 'soon' is not a duration"),
        ({"challenger": "9"}, 400, "unknown version"),
        ({"challenger": "4", "gates": {"confidence": 1.0}}, 400, "confidence must be between"),
        ({}, 400, "challenger"),
    ]
    for body, status, message in cases:
        resp = http.post(ROLLOUT, json=body, headers=AUTH)
        assert resp.status_code == status and message in resp.json()["error"], (body, resp.text)
    assert world.routes.text is None and world.store.texts == {}
    assert http.get(ROLLOUT, headers=AUTH).status_code == 404  # no rollout was started
    assert "scaledl rollout start" in http.get(ROLLOUT, headers=AUTH).json()["error"]

    assert http.post(ROLLOUT, json={"challenger": "4"}, headers=AUTH).status_code == 200
    again = http.post(ROLLOUT, json={"challenger": "4"}, headers=AUTH)
    assert again.status_code == 409 and "abort it before starting another" in again.json()["error"]
    assert http.post("/v1/models/other/rollout", json={"challenger": "4"},
                     headers=AUTH).status_code == 404  # fmt: skip


def test_rollouts_need_an_admin_key() -> None:
    http, world = service()
    predict_only = {"Authorization": "Bearer only-predicts-0123456789"}
    assert http.post(ROLLOUT, json={"challenger": "4"}).status_code == 401
    assert http.post(ROLLOUT, json={"challenger": "4"}, headers=predict_only).status_code == 403
    assert http.post(f"{ROLLOUT}/abort", headers=predict_only).status_code == 403
    assert world.routes.text is None
