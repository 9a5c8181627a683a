"""A running service changed under load, over real HTTP: a hot swap in place, a busy
tier scaling out, an idle one scaling to zero and back. No request fails meanwhile."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from app.registry import Registry
from app.serving import Endpoint
from tests.ray_platform import AUTH, Platform, redeploy


class Load:
    """Clients that keep posting one-row requests while the block runs: the statuses
    they got and the model versions that answered, in order."""

    def __init__(self, endpoint: Endpoint, rows: np.ndarray, clients: int = 4) -> None:
        self.url, self.rows = endpoint.predict_url, rows
        self.statuses: list[int] = []
        self.versions: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(k,)) for k in range(clients)]

    def _client(self, offset: int) -> None:
        with httpx.Client(timeout=30) as http:
            i = offset
            while not self.stop.is_set():
                row = self.rows[i % len(self.rows)].tolist()
                resp = http.post(self.url, json={"instances": [row]}, headers=AUTH)
                self.statuses.append(resp.status_code)
                if resp.status_code == 200:
                    self.versions.extend(p["model_version"] for p in resp.json()["predictions"])
                i += 7

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def test_a_hot_swap_to_the_int8_twin_under_load_fails_no_request(
    endpoint: Endpoint, test_rows, platform: Platform
) -> None:  # noqa: ANN001
    """The cheap tier swaps to its INT8 twin in place (reconfigure), and back, while four
    clients keep sending requests: every request is answered, first by one version,
    then by the other."""

    from ray._private.worker import global_worker

    x, _ = test_rows

    def wait_for(load: Load, version: str) -> None:
        """Until ``version`` answers, and at least 20 more requests were answered: the
        swap is tested under load however slow a shared machine is."""
        answered, deadline = len(load.statuses), time.monotonic() + 60
        while version not in load.versions[-20:] or len(load.statuses) - answered < 20:
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)

    cheap = f"digits-cheap/{platform.cascade.cheap_version}"
    twin = Registry(platform.settings.tracking_uri).int8_twin(
        "digits-cheap", platform.cascade.cheap_version
    )
    with Load(endpoint, x) as load:
        wait_for(load, cheap)
        redeploy(endpoint, platform, int8_tiers=["cheap"])
        wait_for(load, twin.label)
        redeploy(endpoint, platform)  # and back
        wait_for(load, cheap)
    statuses, seen = load.statuses, load.versions
    assert len(statuses) > 50 and set(statuses) == {200}, Counter(statuses)
    first_twin = seen.index(twin.label)
    assert cheap in seen[:first_twin] and cheap in seen[first_twin:]
    # In place: the running replica swapped (a new replica would have had nothing before).
    logs = Path(global_worker.node.get_logs_dir_path()) / "serve"
    swaps = [line for f in logs.glob("replica_*cheap-tier*.log") for line in f.open()]
    assert any(f"serves {twin.label} (was {cheap})" in line for line in swaps)


def running_replicas(deployment: str) -> int:
    from ray import serve

    app = serve.status().applications["digits"]
    return app.deployments[deployment].replica_states.get("RUNNING", 0)


def test_a_busy_tier_scales_out_and_the_ingress_calls_its_new_replica(
    endpoint: Endpoint, test_rows, platform: Platform
) -> None:  # noqa: ANN001
    """One ingress replica keeps two calls in flight to the cheap tier, so Serve's
    default policy would never scale it. Its replicas report how busy they are, and the
    tier scales on that (target_busy is tiny here, so four clients make it busy); the
    ingress then lets more calls out, and the new replica answers some of them."""

    from ray._private.worker import global_worker

    x, _ = test_rows
    logs = Path(global_worker.node.get_logs_dir_path()) / "serve"

    def calls_per_replica() -> dict[str, int]:
        return {
            f.name: sum("rows of requests" in line for line in f.open())
            for f in logs.glob("replica_*cheap-tier*.log")
        }

    busy = {"max_replicas": 2, "target_busy": 0.005, "upscale_delay_s": 0, "look_back_period_s": 2}
    redeploy(endpoint, platform, cheap_replicas=busy)
    with Load(endpoint, x) as load:
        started = time.monotonic()
        while running_replicas("cheap-tier") < 2 and time.monotonic() < started + 90:
            time.sleep(0.5)
        scaled_out = time.monotonic() - started
        assert running_replicas("cheap-tier") == 2, "the busy cheap tier did not scale out"
        before = calls_per_replica()
        time.sleep(8)  # the ingress reads the replica count every 5 s
    after = calls_per_replica()
    grew = [name for name, n in after.items() if n > before.get(name, 0)]
    print(f"scaled out after {scaled_out:.1f} s; calls per replica: {before} -> {after}")
    assert len(grew) == 2, f"calls reached only {grew} since the scale-out: {before} -> {after}"
    assert set(load.statuses) == {200}, Counter(load.statuses)
    redeploy(endpoint, platform, cheap_replicas={"max_replicas": 1})  # back to one replica
    redeploy(endpoint, platform)


def test_the_expensive_tier_scales_to_zero_and_cold_starts_on_demand(
    endpoint: Endpoint, test_rows, platform: Platform
) -> None:  # noqa: ANN001
    """With min_replicas 0 the idle expensive tier goes away; the next escalation starts
    a replica and waits for it (here: deadlines long enough not to degrade or time out;
    a cold start took over 10 s, the default request timeout, on a loaded 2-core VM)."""

    def expensive_replicas() -> int:
        return running_replicas("expensive-tier")

    x, _ = test_rows
    zero = {"min_replicas": 0, "max_replicas": 1, "downscale_delay_s": 1, "look_back_period_s": 2}
    redeploy(endpoint, platform, expensive_replicas=zero, expensive_timeout_s=60,
             request_timeout_s=60)  # fmt: skip
    deadline = time.monotonic() + 90
    while expensive_replicas() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert expensive_replicas() == 0

    def timed() -> tuple[float, list[dict]]:
        started = time.perf_counter()
        resp = httpx.post(
            endpoint.predict_url, json={"instances": x.tolist()}, headers=AUTH, timeout=90
        )
        assert resp.status_code == 200, resp.text
        return time.perf_counter() - started, resp.json()["predictions"]

    ready = httpx.get(f"{endpoint.base_url}/v2/health/ready", timeout=10)
    assert ready.status_code == 200, ready.text  # no replica, but one starts on demand
    cold, predictions = timed()
    assert any(p["tier"] == "expensive" for p in predictions)
    assert not any(p["degraded"] for p in predictions)
    warm, _ = timed()
    print(f"expensive tier from zero: cold {cold:.2f} s, warm {warm:.2f} s")
    assert expensive_replicas() == 1
    redeploy(endpoint, platform)  # one replica again, the default deadline


def test_a_key_created_or_revoked_applies_to_the_running_ingress_under_load(
    endpoint: Endpoint, test_rows, platform: Platform, tmp_path: Path
) -> None:  # noqa: ANN001
    """Keys live in the keys file that every ingress replica re-reads when it changes:
    a new key is accepted and a revoked one refused within seconds, while other clients
    keep being answered by the same replica (its live report keeps counting)."""
    from app.keys import create_key, revoke_key

    keys_file = tmp_path / "api-keys.txt"
    create_key(keys_file, "predict", "first")
    redeploy(endpoint, platform, keys_file=str(keys_file))  # once: the app reads the file now
    x, _ = test_rows
    body = {"instances": [x[0].tolist()]}
    cost_url = f"{endpoint.base_url}/v1/models/digits/cost"

    def status_with(secret: str) -> int:
        headers = {"Authorization": f"Bearer {secret}"}
        return httpx.post(endpoint.predict_url, json=body, headers=headers, timeout=30).status_code

    def within(seconds: float, secret: str, status: int) -> float:
        started = time.monotonic()
        while status_with(secret) != status and time.monotonic() < started + seconds:
            time.sleep(0.2)
        assert status_with(secret) == status
        return time.monotonic() - started

    with Load(endpoint, x) as load:
        before = httpx.get(cost_url, headers=AUTH).json()
        key, secret = create_key(keys_file, "predict", "new-client")
        accepted = within(15, secret, 200)
        revoke_key(keys_file, key.id)
        refused = within(15, secret, 401)
        after = httpx.get(cost_url, headers=AUTH).json()
    print(f"new key accepted after {accepted:.1f} s, revoked key refused after {refused:.1f} s")
    assert set(load.statuses) == {200}, Counter(load.statuses)
    # The same ingress replica served throughout: its report since it started grew.
    assert after["requests"] > before["requests"] and after["since_s"] >= before["since_s"]
    redeploy(endpoint, platform)
