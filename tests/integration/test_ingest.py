"""Ray Data ingest on real files: versions, reconciliation, quarantine, the gate."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from app.errors import DataContractError
from app.settings import Settings, load_settings
from app.workloads import get_workload
from data.marking import RAW_COLUMN, REASON_COLUMN
from data.metrics import JOB
from data.pipeline import ingest
from data.sources import open_source
from data.splits import read_split
from data.versions import MANIFEST, QUARANTINE, SPLITS, DatasetManifest, DatasetStore
from tests.conftest import corrupt, gateway_samples

DIGITS = get_workload("digits")
pytestmark = pytest.mark.usefixtures("ray_cluster")


def write(frame: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path


def with_gateway(settings: Settings, url: str) -> Settings:
    return load_settings(storage_root=settings.storage_root, ingest={"pushgateway_url": url})


def pushed(url: str, name: str, **labels: str) -> float | None:
    key = (name, tuple(sorted({"job": JOB, "instance": "", **labels}.items())))
    return gateway_samples(url).get(key)


def test_builtin_set_becomes_a_reconciled_version_and_reruns_reuse_it(
    store_settings: Settings, pushgateway: str
) -> None:
    first = ingest(store_settings, DIGITS)
    m = first.manifest
    assert not first.reused
    assert m.rows_in == 1797 == m.rows_valid + m.rows_quarantined
    assert m.rows_quarantined == 0
    assert set(m.splits) == set(SPLITS) and sum(m.splits.values()) == 1797
    assert m.splits["train"] > m.splits["val"] > 0 and m.splits["test"] > 0
    assert {c.name for c in m.columns} >= {"id", "label", "px_00", "px_63"}
    assert (first.path / "manifest.json").is_file()
    for split, n in m.splits.items():
        assert (
            pq.read_table(
                DatasetStore(store_settings.datasets_dir).split_dir("digits", m.version, split)
            ).num_rows
            == n
        )

    again = ingest(store_settings, DIGITS)
    assert again.reused and again.manifest.version == m.version
    assert [x.version for x in DatasetStore(store_settings.datasets_dir).manifests("digits")] == [
        m.version
    ]
    # Where the figures go is not what the version holds: the same version, reused, and
    # its figures and freshness pushed by the rerun.
    rerun = ingest(with_gateway(store_settings, pushgateway), DIGITS)
    assert rerun.reused and (rerun.manifest.version, rerun.manifest.run_id) == (m.version, m.run_id)
    tags = {"workload": "digits", "run_id": m.run_id}
    assert pushed(pushgateway, "scaledl_ingest_records_in", **tags) == 1797
    assert pushed(pushgateway, "scaledl_ingest_quarantine_share", **tags) == 0.0
    fresh = {"workload": "digits", "version": m.version}
    latest = pushed(pushgateway, "scaledl_dataset_latest_timestamp_seconds", **fresh)
    assert latest == m.created_at.timestamp()


def test_each_split_reads_back_whole_and_the_callers_data_context_is_left_alone(
    store_settings: Settings,
) -> None:
    import os

    import ray
    from ray.data import DataContext

    from data.marking import tasks_at_once

    context = DataContext.get_current()
    limits = context.execution_options.resource_limits
    manifest = ingest(store_settings, DIGITS).manifest
    # The pass ran one task a core (the test cluster has 4 CPUs, this host may have 2),
    # under a limit of its own: the caller's is as it was.
    cpus, cores = ray.cluster_resources()["CPU"], os.cpu_count()
    assert tasks_at_once() == (cores if cpus > cores else None)
    assert context.execution_options.resource_limits == limits
    before = context.use_datasource_v2
    try:
        for v2 in (True, False):  # read_split turns Ray's V2 reader off for its read only
            context.use_datasource_v2 = v2
            for split, rows in manifest.splits.items():
                frame = read_split(store_settings, manifest, split).to_pandas()
                assert len(frame) == rows
                assert list(frame.columns) == [*DIGITS.feature_columns, DIGITS.label_column]
                assert context.use_datasource_v2 is v2
    finally:
        context.use_datasource_v2 = before


def test_bad_rows_are_quarantined_with_their_rule_and_counted(
    store_settings: Settings, digits_frame: pd.DataFrame, tmp_path: Path
) -> None:
    bad, broken = corrupt(digits_frame.head(200))
    source = write(bad, tmp_path / "raw" / "batch-1.parquet")
    result = ingest(store_settings, DIGITS, open_source(source))
    m = result.manifest
    assert (m.rows_in, m.rows_valid, m.rows_quarantined) == (200, 195, 5)
    assert m.quarantine_reasons == {rule: 1 for rule in broken.values()}
    quarantine = pq.read_table(result.path / "rows" / f"split={QUARANTINE}").to_pandas()
    # Each quarantined row is kept as it arrived (its text values too), with its rule.
    raw = [json.loads(r) for r in quarantine[RAW_COLUMN]]
    assert {
        r["id"]: reason for r, reason in zip(raw, quarantine[REASON_COLUMN], strict=True)
    } == broken
    assert "smudge" in {r["px_05"] for r in raw}
    # Each quarantined row says where it came from: its file (by SHA-256, which the
    # manifest's sources name) and record number (1-based).
    assert set(quarantine["_source"]) == {m.sources[0].sha256}
    assert Path(m.sources[0].path).name == "batch-1.parquet"
    assert sorted(quarantine["_row"]) == [2, 3, 4, 5, 6]
    assert [(s.rows, s.rows_valid, s.rows_quarantined) for s in m.sources] == [(200, 195, 5)]
    # The run's figures, in the manifest as written.
    written = json.loads((result.path / MANIFEST).read_text())
    assert (written["rows_in"], written["rows_valid"], written["rows_quarantined"]) == (200, 195, 5)
    assert written["quarantine_share"] == 0.025
    assert written["run_id"].startswith(f"{m.version}-")
    assert "pushgateway_url" not in written["config"]["ingest"]
    # A changed input is a new version.
    assert m.version != ingest(store_settings, DIGITS).manifest.version


def test_too_much_quarantine_fails_the_run_and_keeps_its_output(
    store_settings: Settings, digits_frame: pd.DataFrame, tmp_path: Path, pushgateway: str
) -> None:
    bad, _ = corrupt(digits_frame.head(40))  # 5 of 40 = 12.5 % > 5 %
    source = write(bad, tmp_path / "raw" / "noisy.parquet")
    with pytest.raises(
        DataContractError, match=r"12\.5% of rows from noisy\.parquet .* top rules: "
    ) as err:
        ingest(with_gateway(store_settings, pushgateway), DIGITS, open_source(source))
    assert "_rejected" in str(err.value)
    assert DatasetStore(store_settings.datasets_dir).manifests("digits") == []
    # The rejected run's figures: in its manifest, kept with its output, and pushed,
    # which is what the quarantine-share alert reads (its share over the gate).
    (kept,) = (store_settings.datasets_dir / "digits" / "_rejected").glob(f"*/{MANIFEST}")
    m = DatasetManifest.model_validate_json(kept.read_text())
    assert (m.rows_in, m.rows_quarantined, m.quarantine_share) == (40, 5, 0.125)
    assert kept.parent.name == m.run_id and str(kept.parent) in str(err.value)
    tags = {"workload": "digits", "run_id": m.run_id}
    assert pushed(pushgateway, "scaledl_ingest_quarantine_share", **tags) == 0.125
    assert pushed(pushgateway, "scaledl_ingest_max_quarantine_share", workload="digits") == 0.05
    assert pushed(pushgateway, "scaledl_ingest_records", **tags, outcome="valid") == 35


def test_a_file_with_a_missing_column_fails_naming_the_file(
    store_settings: Settings, digits_frame: pd.DataFrame, tmp_path: Path
) -> None:
    source = write(
        digits_frame.head(50).drop(columns=["px_07"]), tmp_path / "raw" / "short.parquet"
    )
    with pytest.raises(DataContractError, match=r"short\.parquet: missing column 'px_07'"):
        ingest(store_settings, DIGITS, open_source(source))


def test_a_truncated_parquet_file_is_refused_before_reading(
    store_settings: Settings, tmp_path: Path
) -> None:
    broken = tmp_path / "raw" / "cut.parquet"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(DataContractError, match=r"cut\.parquet is not a readable Parquet file"):
        ingest(store_settings, DIGITS, open_source(broken))


def test_unreadable_files_are_kept_whole_in_the_quarantine_when_asked_and_the_rest_goes_on(
    store_settings: Settings, digits_frame: pd.DataFrame, tmp_path: Path
) -> None:
    """ingest.on_unreadable_file=quarantine: each file that cannot be read (empty, no
    header, a broken footer, a damaged page behind an intact footer) is kept byte for
    byte in the version with its reason, and the readable files become the version.
    The default refuses the same source, naming a file."""
    raw = tmp_path / "raw"
    write(digits_frame.head(200), raw / "good.parquet")
    damaged = write(digits_frame.head(400), raw / "damaged.parquet")
    body = bytearray(damaged.read_bytes())
    body[200:1200] = b"\x00" * 1000  # the first data page; the footer stays intact
    damaged.write_bytes(bytes(body))
    (raw / "empty.csv").write_bytes(b"")
    (raw / "headerless.csv").write_text("1,2,3\n4,5,6\n")
    (raw / "cut.parquet").write_bytes(b"PAR1 this is not really parquet")
    unreadable = {
        "damaged.parquet": "is damaged after row",
        "empty.csv": "is empty",
        "headerless.csv": "so the file has no header",
        "cut.parquet": "is not a readable Parquet file",
    }

    with pytest.raises(DataContractError, match=r"(damaged|empty|headerless|cut)\.(csv|parquet)"):
        ingest(store_settings, DIGITS, open_source(raw))

    lenient = load_settings(
        storage_root=store_settings.storage_root, ingest={"on_unreadable_file": "quarantine"}
    )
    result = ingest(lenient, DIGITS, open_source(raw))
    m = result.manifest
    assert (m.rows_in, m.rows_valid, m.rows_quarantined) == (200, 200, 0)
    assert sum(pq.read_table(result.path / "rows" / f"split={s}").num_rows for s in SPLITS) == 200
    kept = {Path(s.path).name: s for s in m.sources if s.unreadable}
    assert set(kept) == set(unreadable)
    for name, why in unreadable.items():
        assert name in kept[name].unreadable and why in kept[name].unreadable, kept[name]
        assert (result.path / kept[name].kept).read_bytes() == (raw / name).read_bytes()
        assert kept[name].rows == 0 and kept[name].sha256 in kept[name].kept
    assert not list(store_settings.datasets_dir.glob("digits/_staging/*"))
    # The same bytes are the same version; the unreadable files are among its inputs.
    assert ingest(lenient, DIGITS, open_source(raw)).reused
    assert m.version != ingest(lenient, DIGITS, open_source(raw / "good.parquet")).manifest.version
