"""The data stage's Prometheus series, in one place, with fixed tag keys.

Ingest is a batch job: its figures must outlive it, so it pushes them to the Prometheus
pushgateway when ``ingest.pushgateway_url`` is set, and the same figures are always in
the version's manifest (data/versions.py). One group per workload (``job="scaledl_ingest"``,
``workload``): each push replaces the workload's earlier figures, so the gateway holds the
latest run of every workload and nothing piles up there. Prometheus scrapes it with
``honor_labels: true`` (cluster/prometheus/prometheus.yml) to keep these labels.

The names have no ``ray_`` prefix (prometheus_client writes them, not Ray). Labels are
the workload, the run id and the dataset version: nothing from the records, nor the
gateway's URL, which may carry credentials.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

from app.sections import IngestConfig
from data.versions import DatasetManifest

JOB = "scaledl_ingest"
PUSH_TIMEOUT_S = 5.0  # an unreachable gateway delays the ingest by at most this

log = logging.getLogger("scaledl.data")


def ingest_registry(
    run: DatasetManifest, latest: DatasetManifest | None, cfg: IngestConfig
) -> CollectorRegistry:
    """The series one ingest run pushes: its figures (``run``: the version it published,
    reused or had rejected), the gate it was held to, and the workload's freshness
    (``latest``: its newest published version, if any)."""
    registry = CollectorRegistry()
    workload, run_id = run.workload, run.run_id

    def gauge(name: str, doc: str, labels: tuple[str, ...]) -> Gauge:
        return Gauge(name, doc, labels, registry=registry)

    records_in = gauge(
        "scaledl_ingest_records_in",
        "Records the ingest run read from its sources.",
        ("workload", "run_id"),
    )
    records_in.labels(workload, run_id).set(run.rows_in)
    records = gauge(
        "scaledl_ingest_records",
        "Records of the ingest run by outcome: valid (in a split) or quarantined.",
        ("workload", "run_id", "outcome"),
    )
    records.labels(workload, run_id, "valid").set(run.rows_valid)
    records.labels(workload, run_id, "quarantined").set(run.rows_quarantined)
    share = gauge(
        "scaledl_ingest_quarantine_share",
        "Share of the ingest run's records quarantined; over the gate, the run is rejected.",
        ("workload", "run_id"),
    )
    share.labels(workload, run_id).set(run.quarantine_share)
    gate = gauge(
        "scaledl_ingest_max_quarantine_share",
        "The gate: ingest.max_quarantine_share, the largest quarantine share published.",
        ("workload",),
    )
    gate.labels(workload).set(cfg.max_quarantine_share)
    if latest is not None:
        newest = gauge(
            "scaledl_dataset_latest_timestamp_seconds",
            "Unix time the workload's newest published dataset version was created.",
            ("workload", "version"),
        )
        newest.labels(workload, latest.version).set(latest.created_at.timestamp())
    if cfg.max_dataset_age_s is not None:
        max_age = gauge(
            "scaledl_dataset_max_age_seconds",
            "ingest.max_dataset_age_s: the newest version's age past which the dataset "
            "freshness alert fires.",
            ("workload",),
        )
        max_age.labels(workload).set(cfg.max_dataset_age_s)
    return registry


def push_ingest_figures(
    url: str, run: DatasetManifest, latest: DatasetManifest | None, cfg: IngestConfig
) -> bool:
    """Push one run's series to the gateway, replacing the workload's group. A failure
    is a warning, never the ingest's failure: the figures are in the manifest anyway."""
    registry = ingest_registry(run, latest, cfg)
    try:
        push_to_gateway(
            url,
            job=JOB,
            grouping_key={"workload": run.workload},
            registry=registry,
            timeout=PUSH_TIMEOUT_S,
        )
    except (OSError, ValueError) as exc:  # refused, timed out, a non-2xx answer, a bad URL
        log.warning(
            "ingest figures of %s run %s not pushed to the pushgateway at %s (%s): the "
            "manifest has them; check ingest.pushgateway_url (SCALEDL_INGEST__PUSHGATEWAY_URL)",
            run.workload,
            run.run_id,
            without_credentials(url),
            _reason(exc, url),
        )
        return False
    return True


def without_credentials(url: str) -> str:
    """``url`` without a user or password, for messages."""
    parts = urlsplit(url if "//" in url else f"//{url}")
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=f"***@{netloc}")).removeprefix("//")


def _reason(exc: Exception, url: str) -> str:
    reason = str(getattr(exc, "reason", None) or exc)
    return reason.replace(url, without_credentials(url))
