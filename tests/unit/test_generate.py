"""The transactions generator: clean rows follow the contract, faults are exact and counted.

The contract is the workload's own: :func:`check_rows` says which rule each row breaks.
CSV and JSONL shards are read by the pipeline's readers, which keep the lines they cannot
parse (with ``_error`` set), so every line of a file is accounted for.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.workloads import get_workload
from data.generate import (
    COLUMNS,
    FAULTS,
    GenerateReport,
    generate_transactions,
    transactions_frame,
)
from data.readers import ERROR, ROW, SOURCE, read_csv, read_jsonl
from data.validate import check_rows

CONTRACT = get_workload("transactions").contract()

# The rule (column: check) that a row with each fault breaks, as check_rows words it.
RULES = {
    "nulls": r"\w+: not_nullable",
    "range": r"amount: (greater_than\(0\)|less_than_or_equal_to\(50000\.0\))",
    "types": r"amount: coerce_dtype\('float64'\)",
    "categories": r"(merchant_category|device): isin\(.*\)",
    "duplicates": r"txn_id: field_uniqueness",
}


def reasons(frame: pd.DataFrame) -> pd.Series:
    """Per row, the first contract rule it breaks, or None."""
    _, why = check_rows(frame[list(COLUMNS)], CONTRACT, where="test")
    return why.set_axis(frame.index)


def read_text(files: list[Path], fmt: str) -> pd.DataFrame:
    """Every record line of CSV or JSONL shards, as the pipeline reads them."""
    read = read_csv if fmt == "csv" else read_jsonl
    blocks = [b for f in files for b in read(f.read_bytes(), str(f), list(COLUMNS))]
    return pd.concat(blocks, ignore_index=True)


def read_parquet(files: list[Path]) -> pd.DataFrame:
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)


def changed_columns(faulty: pd.DataFrame, clean: pd.DataFrame) -> pd.Series:
    """Per record of ``faulty``, the columns ("a,b") where it differs from its clean self.

    Records are matched by file name and line (CSV/JSONL) or by position (Parquet).
    """

    def keyed(frame: pd.DataFrame) -> pd.DataFrame:
        if ROW not in frame:
            return frame[list(COLUMNS)].astype(object)
        key = [frame[SOURCE].map(lambda s: Path(s).name), frame[ROW]]
        return frame.set_index(key)[list(COLUMNS)].astype(object)

    a = keyed(faulty)
    b = keyed(clean).loc[a.index]
    differs = ~((a == b) | (a.isna() & b.isna()))
    return pd.Series([",".join(a.columns[d]) for d in differs.to_numpy()], index=faulty.index)


def assert_one_rule_per_fault(faulty: pd.DataFrame, clean: pd.DataFrame) -> pd.Series:
    """A faulty record differs from its clean self in one field, the one the contract
    blames; a record the contract passes is its clean self. Returns the reasons."""
    why = reasons(faulty)
    changed = changed_columns(faulty, clean)
    assert not changed.str.contains(",").any()
    assert (changed.ne("") == why.notna()).all()
    assert why.dropna().str.split(":").str[0].tolist() == changed[why.notna()].tolist()
    return why


def _gen(tmp_path: Path, name: str = "out", **kw) -> GenerateReport:
    kw.setdefault("rows", 3_000)
    kw.setdefault("rows_per_shard", 1_000)
    return generate_transactions(tmp_path / name, **kw)


def _with_clean_twin(tmp_path: Path, **kw) -> tuple[GenerateReport, GenerateReport]:
    """The faulty shards and the clean ones of the same seed: the same rows before faults."""
    return _gen(tmp_path, "faulty", **kw), _gen(tmp_path, "clean", **{**kw, "fault_rate": 0.0})


# --- clean data -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean() -> pd.DataFrame:
    return transactions_frame(100_000, seed=3)


def test_clean_frame_follows_the_contract(clean: pd.DataFrame) -> None:
    assert list(clean.columns) == list(COLUMNS)
    assert clean["txn_id"].dtype == "int64" and clean["is_fraud"].dtype == "int64"
    assert clean["amount"].dtype == "float64"
    assert str(clean["ts"].dtype) == "datetime64[us, UTC]"
    assert reasons(clean).isna().all()
    assert clean["txn_id"].tolist() == list(range(len(clean)))
    assert (clean["amount"].round(2) == clean["amount"]).all()
    assert 30 < clean["amount"].median() < 50
    in_range = (clean["ts"] >= "2026-01-01T00:00:00Z") & (clean["ts"] < "2026-07-01T00:00:00Z")
    assert in_range.all()


def test_cards_are_reused_with_one_email_each(clean: pd.DataFrame) -> None:
    per_card = clean.groupby("card_number")["email"].nunique()
    assert 1_000 < len(per_card) <= 5_000
    assert (per_card == 1).all()
    assert clean["email"].nunique() == len(per_card)


def test_notes_are_mostly_null_and_some_quote_the_rows_pii(clean: pd.DataFrame) -> None:
    notes = clean["note"]
    assert 0.55 < notes.isna().mean() < 0.65
    has = clean[notes.notna()]
    # Card numbers written in groups of four, joined again, so each PII value is one word.
    words = has["note"].str.replace(r"(?<=\d{4})[ -](?=\d{4})", "", regex=True).str.split()

    def quoted(column: str) -> pd.Series:
        pairs = zip(has[column], words, strict=True)
        return pd.Series([value in ws for value, ws in pairs], index=has.index)

    email, card, ip = quoted("email"), quoted("card_number"), quoted("ip_address")
    assert 0.15 < (email | card | ip).mean() < 0.25
    assert email.any() and card.any() and ip.any()
    assert has["note"].str.contains(r"\d{4} \d{4} \d{4} \d{4}").any()  # spaced card numbers
    assert has["note"].str.contains(r"\d{4}-\d{4}-\d{4}-\d{4}").any()  # dashed ones
    assert has["note"].str.contains(r"^order #\d+$").any()  # a memo with its number
    assert has["note"].str.contains(r" declined at (?:mobile|desktop|tablet|pos|atm)$").any()


def test_fraud_depends_on_the_features(clean: pd.DataFrame) -> None:
    fraud = clean["is_fraud"]
    base = fraud.mean()
    assert 0.09 < base < 0.16
    night = clean["ts"].dt.hour < 6
    risky = clean["country"].isin(["NG", "RU", "CN"])
    big = clean["amount"] > clean["amount"].quantile(0.8)
    small = clean["amount"] < clean["amount"].quantile(0.2)
    gambling = clean["merchant_category"] == "gambling"
    assert fraud[night].mean() > 2 * fraud[~night].mean()
    assert fraud[risky].mean() > 2 * fraud[~risky].mean()
    assert fraud[big].mean() > 3 * fraud[small].mean()
    assert fraud[gambling].mean() > 2 * base
    worst = gambling & night & (clean["amount"] > 100)
    assert worst.sum() >= 20 and fraud[worst].mean() > 0.6


def test_drift_shifts_amounts_categories_hours_and_devices(clean: pd.DataFrame) -> None:
    drifted = transactions_frame(100_000, seed=3, drift=1.0)
    shift = np.log(drifted["amount"]).mean() - np.log(clean["amount"]).mean()
    assert shift > 0.45

    def shares(frame: pd.DataFrame) -> list[float]:
        return [
            frame["merchant_category"].isin(["online_retail", "electronics"]).mean(),
            (frame["ts"].dt.hour < 6).mean(),
            (frame["device"] == "mobile").mean(),
        ]

    for before, after in zip(shares(clean), shares(drifted), strict=True):
        assert after > 1.3 * before
    assert reasons(drifted.head(20_000)).isna().all()


def test_frames_are_deterministic_and_seeded() -> None:
    a = transactions_frame(2_000, seed=7)
    assert a.equals(transactions_frame(2_000, seed=7))
    assert not a.drop(columns="txn_id").equals(
        transactions_frame(2_000, seed=8).drop(columns="txn_id")
    )
    shifted = transactions_frame(10, seed=7, start_id=500)
    assert shifted["txn_id"].tolist() == list(range(500, 510))


# --- files ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path, fmt: str) -> None:
    kw = dict(rows=2_500, fmt=fmt, fault_rate=0.1)
    a = _gen(tmp_path, "a", **kw)
    b = _gen(tmp_path, "b", **kw)
    c = _gen(tmp_path, "c", seed=1, **kw)
    assert [f.name for f in a.files] == [f"transactions-0000{i}.{fmt}" for i in range(3)]
    assert a.rows == b.rows and a.injected == b.injected
    for x, y, z in zip(a.files, b.files, c.files, strict=True):
        assert x.read_bytes() == y.read_bytes() != z.read_bytes()


def test_rows_and_shards_and_shards_depend_on_their_index_only(tmp_path: Path) -> None:
    report = _gen(tmp_path, "a", rows=2_500, rows_per_shard=1_000)
    assert len(report.files) == 3 and report.rows == 2_500 and report.injected == {}
    assert report.seconds > 0 and report.rows_per_s > 0
    table = pq.read_table(report.files[2])
    assert table.num_rows == 500 and table.column_names == list(COLUMNS)
    assert table.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    shorter = _gen(tmp_path, "b", rows=1_700, rows_per_shard=1_000)
    assert shorter.files[0].read_bytes() == report.files[0].read_bytes()
    frame = read_parquet(report.files)
    assert frame["txn_id"].tolist() == list(range(2_500))
    assert reasons(frame).isna().all()
    assert frame.head(1_000).equals(transactions_frame(1_000, seed=0))


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_clean_text_files_follow_the_contract(tmp_path: Path, fmt: str) -> None:
    report = _gen(tmp_path, fmt=fmt, rows=2_000)
    records = read_text(report.files, fmt)
    assert records[ERROR].isna().all() and len(records) == report.rows == 2_000
    assert reasons(records).isna().all()
    expected = transactions_frame(1_000, seed=0)
    head = records.head(1_000)
    assert head["txn_id"].astype(int).tolist() == expected["txn_id"].tolist()
    assert np.allclose(head["amount"].astype(float), expected["amount"])
    iso = expected["ts"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert head["ts"].tolist() == iso.tolist()
    assert head["note"].isna().tolist() == expected["note"].isna().tolist()
    assert head["note"].dropna().equals(expected["note"].dropna().astype(object))


@pytest.mark.parametrize("kind", [k for k in FAULTS if k != "truncated"])
def test_each_fault_alone_breaks_its_rule(tmp_path: Path, kind: str) -> None:
    report, twin = _with_clean_twin(tmp_path, fmt="csv", fault_rate=0.2, faults=[kind])
    assert set(report.injected) == {kind}
    assert 450 < report.injected[kind] < 750  # ~0.2 * 3000
    lines = read_text(report.files, "csv")
    assert len(lines) == report.rows == 3_000
    unparsed = lines[ERROR].notna()
    if kind == "malformed":  # 11, 1 or 13 fields
        assert unparsed.sum() == report.injected[kind]
        assert lines.loc[unparsed, ERROR].eq("unparseable: expected 12 fields").all()
        assert reasons(lines[~unparsed]).isna().all()
        return
    assert not unparsed.any()
    why = assert_one_rule_per_fault(lines, read_text(twin.files, "csv")).dropna()
    assert len(why) == report.injected[kind]
    assert why.str.fullmatch(RULES[kind]).all(), why.unique()
    if kind == "nulls":  # every required column but the id and the label gets emptied
        assert why.nunique() == 9
    if kind == "categories":
        assert set(why.str.split(":").str[0]) == {"merchant_category", "device"}


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_all_faults_together_with_truncation(tmp_path: Path, fmt: str) -> None:
    report, twin = _with_clean_twin(tmp_path, fmt=fmt, fault_rate=0.3)
    assert set(report.injected) == set(FAULTS)
    assert report.injected["truncated"] == 1
    assert 2_000 < report.rows < 3_000  # the last shard lost (part of) its last third
    lines = read_text(report.files, fmt)
    assert len(lines) == report.rows
    unparsed = lines[ERROR].notna()
    assert unparsed.sum() == report.injected["malformed"] + 1  # and the cut line
    records = lines[~unparsed]
    why = assert_one_rule_per_fault(records, read_text(twin.files, fmt)).dropna()
    assert unparsed.sum() + len(why) == sum(report.injected.values())
    assert why.str.fullmatch("|".join(RULES.values())).all()
    assert not report.files[-1].read_bytes().endswith(b"\n")
    for path in report.files[:-1]:
        assert path.read_bytes().endswith(b"\n")


def test_truncated_csv_ends_in_a_partial_line(tmp_path: Path) -> None:
    report = _gen(tmp_path, fmt="csv", fault_rate=0.2, faults=["truncated"])
    assert report.injected == {"truncated": 1}
    full = (report.files[0].stat().st_size, report.files[-1].stat().st_size)
    assert full[1] < full[0] and full[1] > 0.6 * full[0]  # cut in its last third
    lines = read_text(report.files, "csv")
    assert len(lines) == report.rows
    broken = lines[lines[ERROR].notna()]
    assert len(broken) == 1 and broken[SOURCE].iloc[0] == str(report.files[-1])
    assert broken[ROW].iloc[0] == lines.loc[lines[SOURCE] == str(report.files[-1]), ROW].max()
    assert reasons(lines[lines[ERROR].isna()]).isna().all()


def test_a_csv_cut_never_leaves_a_whole_record_or_an_open_quote() -> None:
    from data.generate.files import text_cut

    header = ",".join(COLUMNS) + "\n"
    # A malformed 13-field line whose note holds quotes and commas: the cut must stay
    # before its 11th separator and outside the quotes.
    line = "7,2026-01-01T00:00:00Z,1.5,USD,fuel,US,pos,4111111111111111,a@b.com,1.2.3.4,"
    line += '"x, ""y"", z",0,USD;fuel;US;pos'
    data = (header + line + "\n").encode()
    cuts = {
        text_cut(data, np.array([len(header)]), True, np.random.default_rng(s)) for s in range(300)
    }
    assert len(cuts) > 5
    for cut in cuts:
        partial = data[len(header) : cut].decode()
        assert 1 <= len(partial) < len(line) and partial.count('"') % 2 == 0
        assert len(next(csv.reader([partial]))) < len(COLUMNS)


def test_truncated_parquet_is_unreadable(tmp_path: Path) -> None:
    report = _gen(tmp_path, fault_rate=0.2, faults=["truncated", "malformed", "types"])
    assert report.rows == 2_000  # the truncated shard's rows are not counted
    assert set(report.injected) == {"truncated", "types"}  # no malformed lines in Parquet
    with pytest.raises(pa.ArrowInvalid):
        pq.read_table(report.files[-1])
    frame = read_parquet(report.files[:-1])
    # A shard with `types` faults stores amount as text; the valid ones read as numbers.
    assert frame["amount"].map(type).eq(str).all()
    why = reasons(frame).dropna()
    assert len(why) == report.injected["types"]
    assert why.str.fullmatch(RULES["types"]).all()


def test_parquet_faults_are_exact(tmp_path: Path) -> None:
    faults = ["nulls", "range", "categories", "duplicates"]
    report, twin = _with_clean_twin(tmp_path, fault_rate=0.25, faults=faults)
    frame = read_parquet(report.files)
    assert frame["amount"].dtype == "float64" and len(frame) == report.rows
    why = assert_one_rule_per_fault(frame, read_parquet(twin.files)).dropna()
    assert len(why) == sum(report.injected.values())
    assert frame["ts"].isna().any()  # a null timestamp is one of the nulls


def test_fault_rate_one_makes_every_row_faulty(tmp_path: Path) -> None:
    report = _gen(tmp_path, fmt="jsonl", rows=500, fault_rate=1.0, faults=["range", "types"])
    assert sum(report.injected.values()) == report.rows == 500
    why = reasons(read_text(report.files, "jsonl"))
    assert why.notna().all()
    assert why.str.fullmatch(f"{RULES['range']}|{RULES['types']}").all()


# --- arguments --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"rows": 0}, "rows"),
        ({"fault_rate": 1.5}, "fault_rate"),
        ({"fault_rate": math.nan}, "fault_rate"),
        ({"drift": -0.1}, "drift"),
        ({"fmt": "xml"}, "fmt"),
        ({"faults": ["nulls", "bogus"]}, "bogus"),
        ({"faults": "nulls"}, "sequence"),
        ({"rows_per_shard": 0}, "rows_per_shard"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_say_what_to_pass(tmp_path: Path, kw: dict, words: str) -> None:
    args = {"rows": 10, **kw}
    with pytest.raises(ValueError, match=words):
        generate_transactions(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_refuses_a_folder_that_holds_shards(tmp_path: Path) -> None:
    _gen(tmp_path, rows=10)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "out"))):
        _gen(tmp_path, rows=10, fmt="csv")
    with pytest.raises(ValueError, match="rows"):
        transactions_frame(0)
