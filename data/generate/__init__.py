"""Seeded generator of raw card transactions for the ``transactions`` workload.

Writes realistic Parquet, CSV or JSONL shards, optionally with faults of known kinds and
exact counts, to exercise the ingest pipeline (validation, pseudonymization, sharded
reads) at scale. A row's way to a file, one module a step:

- :mod:`~data.generate.rows`: clean rows, drawn from a seeded set of cards (the vocabularies
  and :data:`SCHEMA` live here); their free-text notes in :mod:`~data.generate.notes`;
- :mod:`~data.generate.faults`: some rows made to break exactly one contract rule each;
- :mod:`~data.generate.files`: the rows written as shards, some lines malformed, the last
  shard maybe truncated.
"""

from data.generate.faults import FAULTS
from data.generate.files import FORMATS, GenerateReport, generate_transactions
from data.generate.rows import (
    COLUMNS,
    COUNTRIES,
    CURRENCIES,
    DEVICES,
    MAX_AMOUNT,
    MERCHANT_CATEGORIES,
    SCHEMA,
    TS_END,
    TS_START,
    transactions_frame,
)

__all__ = [
    "COLUMNS",
    "COUNTRIES",
    "CURRENCIES",
    "DEVICES",
    "FAULTS",
    "FORMATS",
    "MAX_AMOUNT",
    "MERCHANT_CATEGORIES",
    "SCHEMA",
    "TS_END",
    "TS_START",
    "GenerateReport",
    "generate_transactions",
    "transactions_frame",
]
