"""The transactions generator: clean rows follow the contract, faults are exact and counted."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.generate import (
    COLUMNS,
    COUNTRIES,
    CURRENCIES,
    DEVICES,
    FAULTS,
    MERCHANT_CATEGORIES,
    GenerateReport,
    generate_transactions,
    transactions_frame,
)

CARD = r"^\d{16}$"
EMAIL = r"^[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}$"
IP = r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$"
TS = r"^2026-\d\d-\d\dT\d\d:\d\d:\d\dZ$"
NUMBER = r"^-?\d+(\.\d+)?$"
ALLOWED = {
    "currency": CURRENCIES,
    "merchant_category": MERCHANT_CATEGORIES,
    "country": COUNTRIES,
    "device": DEVICES,
}
REQUIRED = [c for c in COLUMNS if c != "note"]


def _ip_ok(s: pd.Series) -> pd.Series:
    octets = s.str.extract(IP)
    valid = octets.notna().all(axis=1)
    return valid & (octets.fillna("0").astype(int) <= 255).all(axis=1)


def broken_rules(frame: pd.DataFrame, *, json_values: bool = False) -> pd.DataFrame:
    """One boolean column per contract rule, True where a row breaks it.

    ``frame`` holds raw values as a reader sees them: text from CSV ("" for null), JSON
    values (None for null; a string amount is not a number), or typed Parquet columns (a
    text amount column is parsed). Rows that did not parse are not here.
    """
    raw = frame.astype(object).where(frame.notna(), None)
    null = raw.isna() | raw.eq("")
    text = raw.astype(str).where(~null, "")
    rules = {f"{c}: null": null[c] for c in REQUIRED}
    ids = pd.to_numeric(text["txn_id"], errors="coerce")
    rules["txn_id: unique"] = ~null["txn_id"] & ids.duplicated() & ids.notna()
    if pd.api.types.is_datetime64_any_dtype(frame["ts"]):
        ts = frame["ts"]
    else:
        ts = pd.to_datetime(text["ts"].where(text["ts"].str.match(TS), None), utc=True)
    in_range = (ts >= pd.Timestamp("2026-01-01", tz="UTC")) & (
        ts < pd.Timestamp("2026-07-01", tz="UTC")
    )
    rules["ts: range"] = ~null["ts"] & ~in_range
    numeric = text["amount"].str.match(NUMBER)
    if json_values:  # a JSON string is not a number even when it reads like one
        numeric &= ~raw["amount"].map(lambda v: isinstance(v, str)).astype(bool)
    rules["amount: type"] = ~null["amount"] & ~numeric
    amount = pd.to_numeric(text["amount"].where(numeric, None), errors="coerce")
    rules["amount: range"] = numeric & ~((amount > 0) & (amount <= 50_000))
    for column, allowed in ALLOWED.items():
        rules[f"{column}: isin"] = ~null[column] & ~text[column].isin(allowed)
    rules["card_number: regex"] = ~null["card_number"] & ~text["card_number"].str.match(CARD)
    rules["email: regex"] = ~null["email"] & ~text["email"].str.match(EMAIL)
    rules["ip_address: regex"] = ~null["ip_address"] & ~_ip_ok(text["ip_address"])
    rules["is_fraud: isin"] = ~null["is_fraud"] & ~text["is_fraud"].isin(["0", "1"])
    return pd.DataFrame(rules)


def read_records(files: list[Path], fmt: str) -> tuple[pd.DataFrame, int, int]:
    """(parsed records, malformed records, physical record lines) of CSV or JSONL shards."""
    records, malformed, lines = [], 0, 0
    for path in files:
        body = path.read_text().split("\n")
        if body[-1] == "":
            body.pop()
        if fmt == "csv":
            assert body[0] == ",".join(COLUMNS)
            body = body[1:]
        lines += len(body)
        for line in body:
            if fmt == "csv":
                fields = next(csv.reader([line]))
                if len(fields) != len(COLUMNS):
                    malformed += 1
                    continue
                records.append(fields)
            else:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    malformed += 1
                    continue
                assert list(obj) == list(COLUMNS)
                records.append(list(obj.values()))
    return pd.DataFrame(records, columns=list(COLUMNS), dtype=object), malformed, lines


def _gen(tmp_path: Path, name: str = "out", **kw) -> GenerateReport:
    kw.setdefault("rows", 3_000)
    kw.setdefault("rows_per_shard", 1_000)
    return generate_transactions(tmp_path / name, **kw)


# --- clean data -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean() -> pd.DataFrame:
    return transactions_frame(100_000, seed=3)


def test_clean_frame_follows_every_rule(clean: pd.DataFrame) -> None:
    assert list(clean.columns) == list(COLUMNS)
    assert clean["txn_id"].dtype == "int64" and clean["is_fraud"].dtype == "int64"
    assert clean["amount"].dtype == "float64"
    assert str(clean["ts"].dtype) == "datetime64[us, UTC]"
    assert not broken_rules(clean).to_numpy().any()
    assert clean["txn_id"].tolist() == list(range(len(clean)))
    assert (clean["amount"].round(2) == clean["amount"]).all()
    assert 30 < clean["amount"].median() < 50
    assert clean["country"].str.fullmatch(r"[A-Z]{2}").all()


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
    assert not broken_rules(drifted.head(20_000)).to_numpy().any()


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
    frame = pd.concat([pq.read_table(f).to_pandas() for f in report.files], ignore_index=True)
    assert frame["txn_id"].tolist() == list(range(2_500))
    assert not broken_rules(frame).to_numpy().any()
    assert frame.head(1_000).equals(transactions_frame(1_000, seed=0))


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_clean_text_files_follow_the_contract(tmp_path: Path, fmt: str) -> None:
    report = _gen(tmp_path, fmt=fmt, rows=2_000)
    records, malformed, lines = read_records(report.files, fmt)
    assert malformed == 0 and lines == report.rows == len(records) == 2_000
    assert not broken_rules(records, json_values=fmt == "jsonl").to_numpy().any()
    expected = transactions_frame(1_000, seed=0)
    head = records.head(1_000)
    assert head["txn_id"].astype(int).tolist() == expected["txn_id"].tolist()
    assert np.allclose(head["amount"].astype(float), expected["amount"])
    iso = expected["ts"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert head["ts"].tolist() == iso.tolist()
    assert head["note"].replace("", None).isna().tolist() == expected["note"].isna().tolist()


def _check_faults(report: GenerateReport, fmt: str) -> tuple[pd.DataFrame, int]:
    """Every faulty row breaks exactly one rule; broken rows == sum(injected)."""
    records, malformed, lines = read_records(report.files, fmt)
    assert lines == report.rows
    assert not records.isin(["nan", "NaN", "None"]).any().any()  # nulls are "" or null
    broken = broken_rules(records, json_values=fmt == "jsonl")
    per_row = broken.sum(axis=1)
    assert per_row.max() <= 1
    assert malformed + int((per_row == 1).sum()) == sum(report.injected.values())
    return broken, malformed


RULES = {
    "nulls": ": null",
    "range": "amount: range",
    "types": "amount: type",
    "categories": ": isin",
    "duplicates": "txn_id: unique",
}


@pytest.mark.parametrize("kind", [k for k in FAULTS if k != "truncated"])
def test_each_fault_alone_in_csv_is_counted_and_real(tmp_path: Path, kind: str) -> None:
    report = _gen(tmp_path, fmt="csv", fault_rate=0.2, faults=[kind])
    assert set(report.injected) == {kind}
    assert 450 < report.injected[kind] < 750  # ~0.2 * 3000
    broken, malformed = _check_faults(report, "csv")
    if kind == "malformed":
        assert malformed == report.injected[kind]
        assert not broken.to_numpy().any()
        return
    assert malformed == 0
    hit = broken.columns[broken.any()]
    assert all(RULES[kind] in rule for rule in hit), list(hit)
    if kind == "nulls":  # every required column but the id and the label gets emptied
        assert len(hit) == 9
    if kind == "categories":
        assert set(hit) == {"merchant_category: isin", "device: isin"}


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_all_faults_together_with_truncation(tmp_path: Path, fmt: str) -> None:
    report = _gen(tmp_path, fmt=fmt, fault_rate=0.3)
    assert set(report.injected) == set(FAULTS)
    assert report.injected["truncated"] == 1
    assert 2_000 < report.rows < 3_000  # the last shard lost (part of) its last third
    _check_faults(report, fmt)
    last = report.files[-1].read_bytes()
    assert not last.endswith(b"\n")
    for path in report.files[:-1]:
        assert path.read_bytes().endswith(b"\n")


def test_truncated_csv_ends_in_a_partial_line(tmp_path: Path) -> None:
    report = _gen(tmp_path, fmt="csv", fault_rate=0.2, faults=["truncated"])
    assert report.injected == {"truncated": 1}
    text = report.files[-1].read_text()
    full = (report.files[0].stat().st_size, report.files[-1].stat().st_size)
    assert full[1] < full[0] and full[1] > 0.6 * full[0]  # cut in its last third
    last = text.split("\n")[-1]
    assert last and len(next(csv.reader([last]))) < len(COLUMNS)
    records, malformed, lines = read_records(report.files, "csv")
    assert malformed == 1 and lines == report.rows == len(records) + 1
    assert not broken_rules(records).to_numpy().any()


def test_a_csv_cut_never_leaves_a_whole_record_or_an_open_quote() -> None:
    from data.generate import _truncate_text

    header = ",".join(COLUMNS) + "\n"
    # A malformed 13-field line whose note holds quotes and commas: the cut must stay
    # before its 11th separator and outside the quotes.
    line = "7,2026-01-01T00:00:00Z,1.5,USD,fuel,US,pos,4111111111111111,a@b.com,1.2.3.4,"
    line += '"x, ""y"", z",0,USD;fuel;US;pos'
    data = (header + line + "\n").encode()
    cuts = {
        _truncate_text(data, np.array([len(header)]), True, np.random.default_rng(s))
        for s in range(300)
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
    frame = pd.concat([pq.read_table(f).to_pandas() for f in report.files[:-1]])
    # A shard with `types` faults stores amount as text; the valid ones read as numbers.
    assert frame["amount"].map(type).eq(str).all()
    broken = broken_rules(frame.reset_index(drop=True))
    assert broken.sum(axis=1).max() == 1
    assert int(broken.to_numpy().sum()) == report.injected["types"]
    assert set(broken.columns[broken.any()]) == {"amount: type"}


def test_parquet_faults_are_exact(tmp_path: Path) -> None:
    report = _gen(tmp_path, fault_rate=0.25, faults=["nulls", "range", "categories", "duplicates"])
    frame = pd.concat([pq.read_table(f).to_pandas() for f in report.files], ignore_index=True)
    assert frame["amount"].dtype == "float64" and len(frame) == report.rows
    broken = broken_rules(frame)
    assert broken.sum(axis=1).max() == 1
    assert int(broken.to_numpy().sum()) == sum(report.injected.values())
    assert frame["ts"].isna().any()  # a null timestamp is one of the nulls


def test_fault_rate_one_makes_every_row_faulty(tmp_path: Path) -> None:
    report = _gen(tmp_path, fmt="jsonl", rows=500, fault_rate=1.0, faults=["range", "types"])
    assert sum(report.injected.values()) == report.rows == 500
    _check_faults(report, "jsonl")


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
