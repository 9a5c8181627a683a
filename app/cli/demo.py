"""`scaledl demo`: the whole path on the embedded default, with a report.

ingest digits -> train cheap + expensive (Ray Train + DeepSpeed) -> register and promote
-> serve the cascade -> send the held-out test split over HTTP -> print what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from app.cli import reports
from app.cli.traffic import TrafficReport, send_instances
from app.registry import Registry
from app.settings import Settings
from app.workloads import get_workload

WORKLOAD = "digits"


def run_demo(
    settings: Settings,
    console: Console,
    *,
    keep: bool,
    verbose: bool,
    concurrency: int,
    monitor_port: int | None = None,
) -> TrafficReport:
    """The demo; ``monitor_port``: also run Prometheus with scaledl's rules there for its
    duration (``scaledl monitor``), and point the local cluster's dashboard at it."""
    from app.cascade_spec import promote_cascade
    from app.runtime import ray_session
    from app.serving import deploy, resolve_access, serve_until_interrupted
    from data.pipeline import ingest
    from train.calibrate import calibrate
    from train.run import train_tier

    workload = get_workload(WORKLOAD)
    registry = Registry(settings.tracking_uri, settings.artifacts_dir)
    access = resolve_access(settings, dev=True, need_client_key=True)
    key = access.client_key
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    monitoring = _monitor(settings, monitor_port) if monitor_port else None
    if monitoring is not None:  # read by the dashboard when the local head starts
        os.environ.update(monitoring.env)
    with (
        ray_session(settings, verbose=verbose) as ray_info,
        monitoring.running() if monitoring else contextlib.nullcontext(),
    ):
        with Progress(*columns, console=console) as progress:
            step = progress.add_task("ingest digits", total=None)
            dataset = ingest(settings, workload)
            progress.update(step, total=1, completed=1)
            outcomes = []
            for tier in ("cheap", "expensive"):
                step = progress.add_task(f"train {tier} tier (Ray Train + DeepSpeed)", total=None)
                outcome = train_tier(settings, workload, tier, dataset_ref=dataset.manifest.version)
                outcomes.append(outcome)
                progress.update(step, total=1, completed=1)
            step = progress.add_task("calibrate the cascade", total=None)
            spec, cascade = calibrate(
                settings,
                workload,
                cheap=outcomes[0].model.version,
                expensive=outcomes[1].model.version,
            )
            promote_cascade(registry, spec, cascade)
            progress.update(step, total=1, completed=1)
            step = progress.add_task("deploy the Serve application", total=None)
            endpoint = deploy(
                settings, workload.name, access.static_keys, keys_file=access.keys_file
            )
            progress.update(step, total=1, completed=1)
            instances, labels = _test_split(settings, dataset.manifest)
            step = progress.add_task("send the test split over HTTP", total=len(instances))
            report = asyncio.run(
                send_instances(
                    endpoint.predict_url,
                    key,
                    instances,
                    labels,
                    concurrency=concurrency,
                    on_done=lambda: progress.advance(step),
                )
            )
        console.print(reports.training_table(outcomes))
        console.print(reports.calibration_table(spec, cascade))
        console.print(reports.traffic_table(outcomes, report, concurrency))
        if monitoring is not None:
            console.print(f"Prometheus {monitoring.plan.url}   (/alerts, /rules)")
        if keep:
            generated = key if access.generated else None  # never echo a configured key
            for line in reports.url_lines(endpoint, ray_info.dashboard_url, generated):
                console.print(line, soft_wrap=True)

            console.print("serving; press Ctrl-C to stop")
            serve_until_interrupted()
    return report


def _test_split(settings: Settings, manifest) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """The test split's raw rows, read on the driver (fine for the demo's 270 rows)."""
    import pyarrow.parquet as pq

    from data.versions import DatasetStore

    workload = get_workload(manifest.workload)
    path = DatasetStore(settings.datasets_dir).split_dir(
        manifest.workload, manifest.version, "test"
    )
    frame = pq.read_table(
        path, columns=[*workload.feature_columns, workload.label_column]
    ).to_pandas()
    return (
        frame[list(workload.feature_columns)].to_numpy(dtype=np.float64),
        frame[workload.label_column].to_numpy(),
    )


class _Monitoring:
    """`scaledl monitor`'s Prometheus, checked before the demo starts anything."""

    def __init__(self, plan, env: dict[str, str]) -> None:  # noqa: ANN001 - a MonitorPlan
        self.plan, self.env = plan, env

    @contextlib.contextmanager
    def running(self):  # noqa: ANN202
        from app.cli import monitor

        with monitor.exclusive(self.plan), monitor.running(self.plan):
            yield


def _monitor(settings: Settings, port: int) -> _Monitoring:
    from app.cli import monitor

    prometheus, promtool = monitor.find_binaries()
    plan = monitor.plan(
        prometheus,
        promtool,
        port=port,
        prometheus_dir=monitor.PROMETHEUS_DIR,
        ray_temp_dir=monitor.default_ray_temp_dir(),
        storage_root=settings.storage_root,
    )
    return _Monitoring(plan, monitor.dashboard_env(plan.url, None))
