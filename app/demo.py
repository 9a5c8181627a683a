"""`scaledl demo`: the whole path on the embedded default, with a report.

ingest digits -> train cheap + expensive (Ray Train + DeepSpeed) -> register and promote
-> serve the cascade -> send the held-out test split over HTTP -> print what happened.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.registry import Registry
from app.settings import Settings
from app.workloads import get_workload

WORKLOAD = "digits"


@dataclass
class HttpReport:
    latencies_ms: list[float] = field(default_factory=list)
    correct: int = 0
    escalated: int = 0
    errors: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def answered(self) -> int:
        return len(self.latencies_ms)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


async def send_instances(
    url: str,
    api_key: str,
    instances: np.ndarray,
    labels: np.ndarray,
    *,
    concurrency: int,
    on_done: callable = lambda: None,
) -> HttpReport:
    """One request per instance, ``concurrency`` in flight; latency measured per request."""
    import httpx

    report = HttpReport()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(instances)):
        queue.put_nowait(i)
    headers = {"Authorization": f"Bearer {api_key}"}

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            started = time.perf_counter()
            resp = await http.post(url, json={"instances": [instances[i].tolist()]}, headers=headers)
            if resp.status_code == 200:
                report.latencies_ms.append((time.perf_counter() - started) * 1000)
                prediction = resp.json()["predictions"][0]
                report.correct += int(prediction["label"] == labels[i])
                report.escalated += int(prediction["tier"] == "expensive")
            else:
                report.errors[resp.status_code] = report.errors.get(resp.status_code, 0) + 1
            on_done()

    started = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    report.seconds = time.perf_counter() - started
    return report


def run_demo(
    settings: Settings, console: Console, *, keep: bool, verbose: bool, concurrency: int
) -> HttpReport:
    from app.cli import api_key, print_training, print_urls, wait_for_interrupt
    from app.runtime import ray_session
    from app.serving import deploy
    from data.pipeline import ingest
    from train.run import train_tier

    workload = get_workload(WORKLOAD)
    registry = Registry(settings.tracking_uri, settings.artifacts_dir)
    key = api_key(settings, dev=True)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with ray_session(settings, verbose=verbose) as ray_info:
        with Progress(*columns, console=console) as progress:
            step = progress.add_task("ingest digits", total=None)
            dataset = ingest(settings, workload)
            progress.update(step, total=1, completed=1)
            outcomes = []
            for tier in ("cheap", "expensive"):
                step = progress.add_task(f"train {tier} tier (Ray Train + DeepSpeed)", total=None)
                outcome = train_tier(settings, workload, tier, dataset_ref=dataset.manifest.version)
                registry.promote(outcome.model.name, outcome.model.version)
                outcomes.append(outcome)
                progress.update(step, total=1, completed=1)
            step = progress.add_task("deploy the Serve application", total=None)
            endpoint = deploy(settings, workload.name, key, model_ref="champion")
            progress.update(step, total=1, completed=1)
            instances, labels = _test_split(settings, dataset.manifest)
            step = progress.add_task("send the test split over HTTP", total=len(instances))
            report = asyncio.run(
                send_instances(
                    endpoint.predict_url, key, instances, labels, concurrency=concurrency,
                    on_done=lambda: progress.advance(step),
                )
            )
        print_training(outcomes)
        _print_report(console, outcomes, report, concurrency)
        if keep:
            print_urls(endpoint, ray_info.dashboard_url, key)
            wait_for_interrupt()
    return report


def _test_split(settings: Settings, manifest) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """The test split's raw rows, read on the driver (fine for the demo's 270 rows)."""
    import pyarrow.parquet as pq

    from data.versions import DatasetStore

    workload = get_workload(manifest.workload)
    path = DatasetStore(settings.datasets_dir).split_dir(manifest.workload, manifest.version, "test")
    frame = pq.read_table(path, columns=[*workload.feature_columns, workload.label_column]).to_pandas()
    return (
        frame[list(workload.feature_columns)].to_numpy(dtype=np.float64),
        frame[workload.label_column].to_numpy(),
    )


def _print_report(console: Console, outcomes: list, report: HttpReport, concurrency: int) -> None:
    n = report.answered
    table = Table(title=f"digits test split over HTTP ({n} requests, {concurrency} concurrent)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for o in outcomes:
        table.add_row(f"{o.tier} tier accuracy ({o.model.label})", f"{o.metrics['test_accuracy']:.4f}")
    table.add_row("cascade accuracy (HTTP)", f"{report.correct / n:.4f}" if n else "—")
    table.add_row("share escalated to expensive", f"{report.escalated / n:.1%}" if n else "—")
    table.add_row("latency p50", f"{report.percentile(50):.1f} ms")
    table.add_row("latency p99", f"{report.percentile(99):.1f} ms")
    table.add_row("requests/s", f"{n / report.seconds:.0f}" if report.seconds else "—")
    table.add_row("failed requests", str(sum(report.errors.values())) + (f" {report.errors}" if report.errors else ""))
    console.print(table)
