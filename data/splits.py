"""Reading a published dataset version: its splits, and its preprocessor.

A split is read as a lazy Ray Dataset where it is large (training streams it, scoring
maps over it), and in the reading process where it fits the cache limit (a training
worker's slice, a test split scored in the driver, a calibration sample). Training,
evaluation and calibration read versions through here; data/pipeline.py writes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.errors import DataContractError
from app.settings import Settings
from app.workloads import get_workload
from data.features import Preprocessor
from data.versions import PREPROCESSOR, DatasetManifest, DatasetStore


def load_preprocessor(settings: Settings, manifest: DatasetManifest) -> Preprocessor | None:
    """The preprocessor fitted with a dataset version (None for workloads without one)."""
    path = DatasetStore(settings.datasets_dir).version_dir(manifest.workload, manifest.version)
    file = path / PREPROCESSOR
    return Preprocessor.model_validate_json(file.read_text()) if file.is_file() else None


def read_split(settings: Settings, manifest: DatasetManifest, split: str) -> Any:
    """A lazy Ray Dataset of one split's feature and label columns (streamed, never pulled)."""
    return read_parquet_v1(str(_split_path(settings, manifest, split)), _columns(manifest))


def split_in_row_groups(settings: Settings, manifest: DatasetManifest, split: str) -> Any:
    """One split's feature and label columns, read in this process a row group at a time
    (pandas frames; :func:`row_groups_of_split`): no Ray Data executor to start."""
    path = _split_path(settings, manifest, split)
    return row_groups_of_split(path, _columns(manifest), 0, manifest.splits[split])


def _split_path(settings: Settings, manifest: DatasetManifest, split: str) -> Path:
    if not manifest.splits.get(split):
        raise DataContractError(
            f"split {split!r} of dataset {manifest.workload} {manifest.version} has no rows: "
            "ingest more data or change ingest.split_fractions"
        )
    return DatasetStore(settings.datasets_dir).split_dir(manifest.workload, manifest.version, split)


def _columns(manifest: DatasetManifest) -> list[str]:
    workload = get_workload(manifest.workload)
    return [*workload.feature_columns, workload.label_column]


def head_of_split(settings: Settings, manifest: DatasetManifest, split: str, rows: int) -> Any:
    """The first ``rows`` rows of a split's feature columns, as a pandas frame, read in
    this process (:func:`rows_of_split`: no Ray Data executor to start for a few
    thousand rows)."""
    workload = get_workload(manifest.workload)
    path = DatasetStore(settings.datasets_dir).split_dir(manifest.workload, manifest.version, split)
    return rows_of_split(path, list(workload.feature_columns), 0, rows)


def rows_of_split(path: str | Path, columns: list[str], start: int, stop: int) -> Any:
    """Rows ``start`` to ``stop`` (excluded) of a split as one pandas frame (see
    :func:`row_groups_of_split`)."""
    import pandas as pd

    pieces = list(row_groups_of_split(path, columns, start, stop))
    return pd.concat(pieces, ignore_index=True) if pieces else pd.DataFrame(columns=columns)


def row_groups_of_split(
    path: str | Path, columns: list[str], start: int, stop: int
) -> Iterator[Any]:
    """Rows ``start`` to ``stop`` (excluded) of a split, in its stored order (its files by
    name, then their row groups), read in this process one row group at a time: a pandas
    frame for each row group that holds some of them. Only those row groups are read, so
    a slice costs the same on a split of any size."""
    import pyarrow.dataset

    dataset = pyarrow.dataset.dataset(str(path), format="parquet")
    groups = (
        (fragment, group)
        for fragment in sorted(dataset.get_fragments(), key=lambda f: f.path)
        for group in fragment.row_groups
    )
    offset = 0
    for fragment, group in groups:
        if offset >= stop:
            return
        first, end = max(start, offset), min(stop, offset + group.num_rows)
        if first < end:
            table = fragment.subset(row_group_ids=[group.id]).to_table(columns=columns)
            yield table.slice(first - offset, end - first).to_pandas()
        offset += group.num_rows


def read_parquet_v1(path: str, columns: list[str]) -> Any:
    """``ray.data.read_parquet`` through Ray Data's V1 Parquet reader.

    Ray 2.60 reads Parquet with DataSourceV2 by default, whose listing starts a pool of
    32 footer-reading actors (``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS``) for every read,
    however few the files. On the 2-core machine a split of one file took 4.2 s to read
    that way and 0.19 s with V1 (bench/read_split.py). A training run that streams reads
    two splits this way, a scoring pass above the cache limit one. The switch is
    ``DataContext.use_datasource_v2``, read when the read is planned: it is turned off
    for this call only.
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(path, columns=columns, partitioning=None)
    finally:
        context.use_datasource_v2 = v2
