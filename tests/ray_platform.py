"""One local Ray cluster for the integration and chaos tiers, and one trained platform.

A pytest plugin (tests/conftest.py loads it), so that tests/integration and
tests/chaos, run in one pytest session, share the cluster and the training.

The session fixture ingests digits and trains both tiers with Ray Train + DeepSpeed
(a few epochs), so the training, registry and serving tests share the real artifacts,
and keeps what the node's metrics export showed while the cheap tier trained.
Each serving module deploys the calibrated cascade once (``endpoint``), and may
redeploy it with other settings (:func:`redeploy`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from app.cascade_spec import CascadeSpec
from app.keys import dev_key
from app.serving import Endpoint, deploy
from app.settings import Settings, load_settings
from app.workloads import get_workload
from data.versions import DatasetStore
from tests.conftest import free_port

KEY = "integration-test-key"  # the serving tests' key, with both scopes
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import os

    import ray

    from app.runtime import FAST_TRANSPORT

    # Replicas and handles report their load every half second (default 10 s), so an
    # autoscaling test sees a scale-down in seconds, and metrics reach the node's export
    # every second (default 10 s); the cluster's processes inherit them.
    for name, value in (
        ("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5"),
        ("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5"),
        ("RAY_metrics_report_interval_ms", "1000"),
    ):
        os.environ.setdefault(name, value)
    # The transport users get: a local cluster of `scaledl serve` starts with it
    # (serve.fast_transport, on by default), so the serving tests run on it too.
    os.environ.update(FAST_TRANSPORT)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def store_settings(tmp_path: Path, clean_env: None) -> Settings:
    return load_settings(storage_root=tmp_path / "store")


@dataclass(frozen=True)
class Scraped:
    at: float  # unix time of the scrape
    name: str
    labels: dict[str, str]
    value: float


def export_samples(prefix: str) -> list[Scraped]:
    """The samples of the node's metrics export whose name starts with ``prefix``."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{metrics_port()}/metrics", timeout=10).text
    now = time.time()
    mine = "".join(f"{line}\n" for line in text.splitlines() if prefix in line)  # parse less
    return [
        Scraped(now, s.name, s.labels, s.value)
        for family in text_string_to_metric_families(mine)
        for s in family.samples
        if s.name.startswith(prefix)
    ]


@dataclass
class ExportWatch:
    """Scrapes the node's export every ``every_s`` on a thread while its block runs, as
    a Prometheus would: gauges that live only while their process does are seen."""

    prefix: str
    every_s: float = 0.5
    seen: list[Scraped] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> ExportWatch:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        import httpx

        while not self._stop.wait(self.every_s):
            try:
                self.seen.extend(export_samples(self.prefix))
            except httpx.HTTPError:  # a scrape that failed is a gap, as for Prometheus
                continue


@dataclass(frozen=True)
class Platform:
    settings: Settings
    dataset_version: str
    outcomes: dict  # tier -> TrainOutcome
    cascade: CascadeSpec
    cheap_training_export: ExportWatch  # ray_scaledl_train_* while the cheap tier trained


@pytest.fixture(scope="session")
def platform(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Platform:
    from app.cascade_spec import promote_cascade
    from app.registry import Registry
    from data.pipeline import ingest
    from train.calibrate import calibrate
    from train.run import train_tier

    settings = load_settings(
        storage_root=tmp_path_factory.mktemp("platform"), train={"epochs": 6}, ray_address=None
    )
    workload = get_workload("digits")
    version = ingest(settings, workload).manifest.version
    # ZeRO-1 for the cheap tier, ZeRO-2 for the expensive one: both stages in one go.
    zero2 = load_settings(storage_root=settings.storage_root, train={"epochs": 6, "zero_stage": 2})
    with ExportWatch("ray_scaledl_train_") as watch:
        cheap = train_tier(settings, workload, "cheap")
    outcomes = {"cheap": cheap, "expensive": train_tier(zero2, workload, "expensive")}
    spec, ref = calibrate(settings, workload, cheap="challenger", expensive="challenger")
    promote_cascade(Registry(settings.tracking_uri), spec, ref)
    return Platform(settings, version, outcomes, spec, watch)


@pytest.fixture(scope="module")
def endpoint(platform: Platform) -> Iterator[Endpoint]:
    from ray import serve

    settings = load_settings(
        storage_root=platform.settings.storage_root, serve={"port": free_port()}
    )
    yield deploy(settings, "digits", [dev_key(KEY)])
    serve.shutdown()
    wait_for_serve_gone()


def wait_for_serve_gone(timeout_s: float = 60) -> None:
    """Until Serve's controller is gone: with HAProxy its shutdown ends after
    serve.shutdown() returns, and a serve.start() meanwhile gets the dying controller."""
    import time

    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        except ValueError:
            return
        time.sleep(0.5)


@pytest.fixture(scope="module")
def test_rows(platform: Platform) -> tuple[np.ndarray, np.ndarray]:
    path = DatasetStore(platform.settings.datasets_dir).split_dir(
        "digits", platform.dataset_version, "test"
    )
    frame = pq.read_table(path).to_pandas()
    return frame[list(get_workload("digits").feature_columns)].to_numpy(), frame["label"].to_numpy()


def metrics_port() -> int:
    """The node's metrics export, the port Prometheus scrapes (ray.nodes() names it)."""
    import ray

    return int(ray.nodes()[0]["MetricsExportPort"])


def redeploy(
    endpoint: Endpoint, platform: Platform, keys_file: str | None = None, **serve: object
) -> None:
    """The same application on the same port, with some serve settings changed (and
    ``keys_file``, the keys file its replicas read, if given)."""
    port = int(endpoint.base_url.rsplit(":", 1)[1])
    settings = load_settings(
        storage_root=platform.settings.storage_root, serve={"port": port, **serve}
    )
    deploy(settings, "digits", [dev_key(KEY)], keys_file=keys_file)
