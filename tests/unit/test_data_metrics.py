"""The data stage's figures: in the manifest always, and on a real pushgateway (the
distribution's binary) when one is set, where Prometheus scrapes them after the job."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from app.sections import IngestConfig
from data.metrics import JOB, ingest_registry, push_ingest_figures, without_credentials
from data.versions import MANIFEST, DatasetManifest, DatasetStore
from tests.conftest import free_port, gateway_samples

CREATED = datetime(2026, 11, 28, 14, 1, 2, tzinfo=UTC)


def manifest(
    version: str = "a1b2c3d4e5f6",
    *,
    rows: tuple[int, int, int] = (200, 195, 5),
    created: datetime = CREATED,
    workload: str = "digits",
) -> DatasetManifest:
    rows_in, valid, quarantined = rows
    return DatasetManifest(
        version=version,
        workload=workload,
        created_at=created,
        parent=None,
        sources=[],
        rows_in=rows_in,
        rows_valid=valid,
        rows_quarantined=quarantined,
        splits={"train": valid},
        quarantine_reasons={"px_03: in_range(0, 16)": quarantined} if quarantined else {},
        columns=[],
        content_hash="x",
        config={},
        libraries={},
    )


def test_the_manifest_holds_the_runs_quarantine_share_and_run_id() -> None:
    m = manifest(rows=(200, 195, 5))
    assert m.quarantine_share == 0.025
    assert m.run_id == "a1b2c3d4e5f6-20261128T140102"
    written = json.loads(m.model_dump_json())
    assert (written["quarantine_share"], written["run_id"]) == (0.025, m.run_id)
    assert manifest(rows=(0, 0, 0)).quarantine_share == 0.0


def test_a_manifest_written_before_these_fields_reads_with_them_derived() -> None:
    old = json.loads(manifest(rows=(40, 35, 5)).model_dump_json())
    del old["quarantine_share"], old["run_id"]
    m = DatasetManifest.model_validate(old)
    assert (m.quarantine_share, m.run_id) == (0.125, "a1b2c3d4e5f6-20261128T140102")


def test_a_stored_share_that_disagrees_with_the_counts_is_not_believed() -> None:
    tampered = {**json.loads(manifest(rows=(40, 35, 5)).model_dump_json()), "quarantine_share": 0}
    assert DatasetManifest.model_validate(tampered).quarantine_share == 0.125


def test_a_rejected_run_keeps_its_manifest_under_its_run_id_and_is_no_version(
    tmp_path: Path,
) -> None:
    store = DatasetStore(tmp_path)
    rejected = manifest(rows=(40, 35, 5))
    kept = store.reject(store.staging_dir("digits"), rejected)
    assert kept == tmp_path / "digits" / "_rejected" / rejected.run_id
    assert DatasetManifest.model_validate_json((kept / MANIFEST).read_text()) == rejected
    assert store.manifests("digits") == []


def value(registry, name: str, **labels: str) -> float | None:  # noqa: ANN001
    return registry.get_sample_value(name, labels)


def test_a_run_pushes_its_records_its_share_the_gate_and_the_workloads_freshness() -> None:
    run = manifest(rows=(200, 195, 5))
    newest = manifest("0f0f0f0f0f0f", created=CREATED + timedelta(hours=1))
    cfg = IngestConfig(max_quarantine_share=0.05, max_dataset_age_s=3600)
    registry = ingest_registry(run, newest, cfg)
    tags = {"workload": "digits", "run_id": run.run_id}
    assert value(registry, "scaledl_ingest_records_in", **tags) == 200
    assert value(registry, "scaledl_ingest_records", **tags, outcome="valid") == 195
    assert value(registry, "scaledl_ingest_records", **tags, outcome="quarantined") == 5
    assert value(registry, "scaledl_ingest_quarantine_share", **tags) == 0.025
    assert value(registry, "scaledl_ingest_max_quarantine_share", workload="digits") == 0.05
    fresh = {"workload": "digits", "version": newest.version}
    assert (
        value(registry, "scaledl_dataset_latest_timestamp_seconds", **fresh)
        == (CREATED + timedelta(hours=1)).timestamp()
    )
    assert value(registry, "scaledl_dataset_max_age_seconds", workload="digits") == 3600
    # The fixed tag set: workload, run id, version, outcome; nothing from the records.
    keys = {k for metric in registry.collect() for s in metric.samples for k in s.labels}
    assert keys == {"workload", "run_id", "version", "outcome"}


def test_no_freshness_before_a_first_version_and_no_max_age_when_unset() -> None:
    registry = ingest_registry(manifest(), None, IngestConfig(max_dataset_age_s=None))
    names = {m.name for m in registry.collect()}
    assert "scaledl_dataset_latest_timestamp_seconds" not in names
    assert "scaledl_dataset_max_age_seconds" not in names
    assert "scaledl_ingest_quarantine_share" in names


def test_the_pushgateway_holds_the_latest_run_of_each_workload(pushgateway: str) -> None:
    cfg = IngestConfig()
    first = manifest("111111111111", rows=(40, 35, 5))
    assert push_ingest_figures(pushgateway, first, None, cfg)
    group = {"job": JOB, "workload": "digits", "instance": ""}

    def key(name: str, **labels: str) -> tuple:
        return (name, tuple(sorted({**group, **labels}.items())))

    seen = gateway_samples(pushgateway)
    assert seen[key("scaledl_ingest_quarantine_share", run_id=first.run_id)] == 0.125
    assert seen[key("scaledl_ingest_max_quarantine_share")] == 0.05
    assert seen[key("scaledl_ingest_records", run_id=first.run_id, outcome="quarantined")] == 5
    assert seen[key("scaledl_dataset_max_age_seconds")] == 7 * 86400
    assert not any(name == "scaledl_dataset_latest_timestamp_seconds" for name, _ in seen)

    later = CREATED + timedelta(days=1)
    second = manifest("222222222222", rows=(1797, 1797, 0), created=later)
    other = manifest("333333333333", workload="transactions")
    assert push_ingest_figures(pushgateway, other, other, cfg)
    assert push_ingest_figures(pushgateway, second, second, cfg)
    seen = gateway_samples(pushgateway)
    # The second run replaced the first one's figures: one run per workload, no pile-up.
    shares = {
        dict(labels)["run_id"]: v
        for (name, labels), v in seen.items()
        if name == "scaledl_ingest_quarantine_share" and dict(labels)["workload"] == "digits"
    }
    assert shares == {second.run_id: 0.0}
    fresh = key("scaledl_dataset_latest_timestamp_seconds", version=second.version)
    assert seen[fresh] == later.timestamp()
    assert seen[key("scaledl_ingest_records_in", run_id=second.run_id)] == 1797
    # Another workload's group is its own.
    assert any(dict(labels)["workload"] == "transactions" for _, labels in seen)


def test_an_unreachable_pushgateway_warns_and_does_not_fail(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"http://scaledl:s3cret-token@127.0.0.1:{free_port()}"  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="scaledl.data"):
        assert push_ingest_figures(url, manifest(), None, IngestConfig()) is False
    (line,) = [r.getMessage() for r in caplog.records]
    assert "not pushed to the pushgateway" in line and "ingest.pushgateway_url" in line
    assert "manifest has them" in line
    assert "s3cret-token" not in line and "127.0.0.1" in line


def test_a_pushgateway_that_refuses_the_push_warns_and_does_not_fail(
    pushgateway: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="scaledl.data"):
        # Not a pushgateway's path: it answers 404 (or 405), which is a failed push.
        assert push_ingest_figures(f"{pushgateway}/nope", manifest(), None, IngestConfig()) is False
    assert "not pushed to the pushgateway" in caplog.text


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://127.0.0.1:9091", "http://127.0.0.1:9091"),
        ("http://me:pw@gw.example:9091/x", "http://***@gw.example:9091/x"),
        ("me:pw@gw.example:9091", "***@gw.example:9091"),
    ],
)
def test_messages_name_the_gateway_without_its_credentials(url: str, shown: str) -> None:
    assert without_credentials(url) == shown
