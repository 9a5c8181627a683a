from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from app.errors import DatasetVersionNotFound
from app.workloads import get_workload
from data.split import assign_split
from data.versions import DatasetManifest, DatasetStore, version_id


def test_split_is_deterministic_and_close_to_the_fractions() -> None:
    ids = pd.Series(np.arange(20_000))
    a = assign_split(ids, (0.7, 0.15, 0.15), seed=0)
    b = assign_split(ids.sample(frac=1, random_state=1).sort_index(), (0.7, 0.15, 0.15), seed=0)
    assert (a == b).all()
    shares = pd.Series(a).value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.7, abs=0.02)
    assert shares["test"] == pytest.approx(0.15, abs=0.02)


def test_a_row_keeps_its_split_whatever_batch_it_is_in() -> None:
    ids = pd.Series(np.arange(1000))
    whole = assign_split(ids, (0.7, 0.15, 0.15), seed=0)
    parts = np.concatenate(
        [assign_split(ids[i : i + 7], (0.7, 0.15, 0.15), 0) for i in range(0, 1000, 7)]
    )
    assert (whole == parts).all()


def test_the_seed_changes_the_assignment() -> None:
    ids = pd.Series(np.arange(1000))
    assert (
        assign_split(ids, (0.7, 0.15, 0.15), 0) != assign_split(ids, (0.7, 0.15, 0.15), 1)
    ).any()


def test_version_id_depends_on_content_not_key_order() -> None:
    assert version_id({"a": 1, "b": [1, 2]}) == version_id({"b": [1, 2], "a": 1})
    assert version_id({"a": 1}) != version_id({"a": 2})


def published(root: Path, version: str, created: datetime | None = None) -> DatasetManifest:
    """A (content-free) version published in a store at ``root``."""
    store = DatasetStore(root)
    manifest = _manifest(version, created or datetime.now(UTC))
    store.publish(store.staging_dir("digits"), manifest)
    return manifest


def _manifest(version: str, created: datetime) -> DatasetManifest:
    return DatasetManifest(
        version=version,
        workload="digits",
        created_at=created,
        parent=None,
        sources=[],
        rows_in=1,
        rows_valid=1,
        rows_quarantined=0,
        splits={"train": 1},
        quarantine_reasons={},
        columns=[],
        content_hash="x",
        config={},
        libraries={},
    )


def test_store_resolves_latest_prefix_and_explains_misses(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    with pytest.raises(DatasetVersionNotFound, match="run `scaledl data ingest --workload digits`"):
        store.get("digits")
    now = datetime.now(UTC)
    for version, age in (("aaa111", 2), ("aab222", 1)):
        published(tmp_path, version, now - timedelta(hours=age))
    assert store.get("digits").version == "aab222"
    assert store.get("digits", "aaa").version == "aaa111"
    with pytest.raises(DatasetVersionNotFound, match="ambiguous"):
        store.get("digits", "aa")
    with pytest.raises(DatasetVersionNotFound, match="pick one of: aab222, aaa111"):
        store.get("digits", "zzz")


def test_publishing_the_same_version_twice_keeps_the_first_and_drops_the_copy(
    tmp_path: Path,
) -> None:
    store = DatasetStore(tmp_path)
    first = published(tmp_path, "ccc333")
    staging = store.staging_dir("digits")
    (staging / "shard.parquet").write_bytes(b"second copy")
    final = store.publish(staging, first)  # a concurrent run with the same inputs
    assert not staging.exists()
    assert not (final / "shard.parquet").exists()
    assert store.get("digits", "ccc333") == first


def test_a_failed_publish_raises_and_keeps_the_staged_data(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    manifest = _manifest("ddd444", datetime.now(UTC))
    blocker = store.version_dir("digits", "ddd444")
    blocker.mkdir(parents=True)
    (blocker / "stray-file").write_text("not a published version")  # no manifest
    staging = store.staging_dir("digits")
    (staging / "shard.parquet").write_bytes(b"rows")
    with pytest.raises(OSError):
        store.publish(staging, manifest)
    assert (staging / "shard.parquet").read_bytes() == b"rows"


def test_files_are_read_in_content_order_and_the_same_bytes_twice_are_refused() -> None:
    from app.errors import DataContractError
    from data.pipeline import in_content_order
    from data.versions import SourceFile

    def source(path: str, sha: str) -> SourceFile:
        return SourceFile(path=path, size=1, sha256=sha * 64, rows=1)

    ordered = in_content_order([source("a.csv", "c"), source("b.csv", "a"), source("c.csv", "b")])
    assert [s.path for s in ordered] == ["b.csv", "c.csv", "a.csv"]
    with pytest.raises(DataContractError, match=r"copy\.csv holds the same bytes as a\.csv"):
        in_content_order([source("a.csv", "a"), source("b.csv", "b"), source("copy.csv", "a")])


def test_an_unreadable_file_is_copied_whole_unless_the_workload_holds_pii(tmp_path: Path) -> None:
    from data.pipeline import _kept
    from data.sources import local_source
    from data.versions import SourceFile

    path = tmp_path / "broken.csv"
    path.write_bytes(b"\x00\xff jane.doe@example.com")
    unreadable = SourceFile(path=str(path), size=24, sha256="ab" * 32, rows=0, unreadable="x")
    source = local_source(path)
    digits = _kept(source, unreadable, tmp_path / "v1", get_workload("digits"))
    assert (tmp_path / "v1" / digits.kept).read_bytes() == path.read_bytes()
    assert digits.kept == f"quarantine_files/{'ab' * 32}.csv"
    pii = _kept(source, unreadable, tmp_path / "v2", get_workload("transactions"))
    assert pii.kept is None and not (tmp_path / "v2").exists()  # named, never copied


def test_workers_read_equal_slices_of_a_split_in_stored_order(tmp_path: Path) -> None:
    """rows_of_split: what a worker that keeps its share of a split reads (train/feeds.py)
    and the head a calibration takes. Files in name order, then their row groups; the
    shares of any number of workers cover every row once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.splits import rows_of_split

    def write(name: str, ids: range, row_group_size: int) -> None:
        table = pa.table({"id": list(ids), "x": [float(i) for i in ids]})
        pq.write_table(table, tmp_path / name, row_group_size=row_group_size)

    write("part-b.parquet", range(10, 17), 4)  # listed after part-a whatever its content
    write("part-a.parquet", range(10), 3)
    whole = rows_of_split(tmp_path, ["id"], 0, 100)
    assert whole["id"].tolist() == list(range(17)) and list(whole.columns) == ["id"]
    assert rows_of_split(tmp_path, ["id", "x"], 2, 12)["id"].tolist() == list(range(2, 12))
    for workers in (1, 2, 3, 5):
        shares = [
            rows_of_split(tmp_path, ["id"], i * 17 // workers, (i + 1) * 17 // workers)
            for i in range(workers)
        ]
        assert pd.concat(shares)["id"].tolist() == list(range(17))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    empty = rows_of_split(tmp_path, ["id", "x"], 5, 5)
    assert empty.empty and list(empty.columns) == ["id", "x"]
