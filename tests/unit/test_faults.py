"""Fault injection (serve.faults): refused outside dev, and a faulty version fails or
slows only its own requests, counted as its errors."""

from __future__ import annotations

import asyncio
import time
import warnings

import pytest

from app.errors import ConfigError
from app.sections import Fault
from app.settings import load_settings
from serve_graphs.api.observe import LiveStats
from tests.unit.graph import LocalStats
from tests.unit.test_api import AUTH, URL, api_for, digit_images, digits_graph

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


def test_faults_are_refused_outside_dev(clean_env: None) -> None:
    faults = {"faults": {"4": {"fail_share": 0.2}}}
    with pytest.raises(ConfigError, match=r"serve.faults .* development only.*dev"):
        load_settings(serve=faults)
    assert load_settings(serve=faults, dev=True).serve.faults["4"].fail_share == 0.2


@pytest.mark.parametrize("bad", [{"fail_share": 1.5}, {"delay_ms": -1}, {"fails": 1}])
def test_a_bad_fault_names_its_key(clean_env: None, bad: dict) -> None:
    with pytest.raises(ConfigError, match=r"serve\.faults\.4"):
        load_settings(serve={"faults": {"4": bad}}, dev=True)


def test_a_failing_version_answers_500_counted_as_its_errors_and_a_slow_one_is_slower() -> None:
    faults = {"3": Fault(fail_share=1.0)}
    live = LiveStats("digits", LocalStats())
    http = TestClient(
        api_for(digits_graph(0.5), faults=lambda: faults, live=live),
        raise_server_exceptions=False,
    )
    resp = http.post(URL, json={"instances": digit_images(1)}, headers=AUTH)
    assert resp.status_code == 500 and "fault injected into version 3" in resp.json()["error"]
    assert resp.headers["x-scaledl-version"] == "3"
    assert asyncio.run(live.view(60))["versions"]["3"]["outcomes"]["error"] == 1

    faults["3"] = Fault(delay_ms=1000)  # applied at once, as a user_config change is
    started = time.perf_counter()
    assert http.post(URL, json={"instances": digit_images(1)}, headers=AUTH).status_code == 200
    assert time.perf_counter() - started >= 1.0
    faults.clear()  # (1 s, so that a loaded host's slow request is not taken for a delay)
    started = time.perf_counter()
    assert http.post(URL, json={"instances": digit_images(1)}, headers=AUTH).status_code == 200
    assert time.perf_counter() - started < 1.0
