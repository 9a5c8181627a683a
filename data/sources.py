"""Where raw rows come from: the workload's built-in set or files the user names."""

from __future__ import annotations

import hashlib
from pathlib import Path

from app.errors import ConfigError
from app.workloads import Workload

_CHUNK = 1 << 20


def builtin_raw_file(workload: Workload, raw_dir: Path) -> Path:
    """Write the workload's shipped data set as a raw Parquet file (once) and return it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = raw_dir / workload.name / f"{workload.name}.parquet"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(pa.Table.from_pandas(workload.builtin_source(), preserve_index=False), tmp)
        tmp.replace(path)
    return path


def list_source_files(source: Path) -> list[Path]:
    """The Parquet files of ``source`` (a file or a folder), sorted, or a ConfigError."""
    if source.is_file():
        files = [source]
    elif source.is_dir():
        files = sorted(p for p in source.rglob("*.parquet") if p.is_file())
    else:
        raise ConfigError(
            f"source {source} does not exist: pass a Parquet file or a folder of them"
        )
    if not files:
        raise ConfigError(f"source {source} holds no *.parquet files: point --source at raw data")
    unsupported = [f for f in files if f.suffix != ".parquet"]
    if unsupported:
        raise ConfigError(f"{unsupported[0]} is not a .parquet file: convert it or pass Parquet")
    return [f.resolve() for f in files]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
