"""The transactions workload end to end on a real Ray cluster: generated files with every
fault, the quarantine and its reconciliation, PII that never leaves the pipeline, versions
and lineage, and training that streams a version's shards."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from app.errors import ConfigError, DataContractError
from app.settings import Settings, load_settings
from app.workloads import get_workload
from app.workloads.transactions import CARD, EMAIL, IPV4
from data.generate import generate_transactions, transactions_frame
from data.marking import RAW_COLUMN, REASON_COLUMN
from data.pii import PiiKey
from data.pipeline import ingest
from data.readers import ROW, SOURCE
from data.sources import open_source
from data.versions import PREPROCESSOR, QUARANTINE, DatasetStore

TRANSACTIONS = get_workload("transactions")
PII_KEY = "test-pii-key-0123456789abcdef"
pytestmark = pytest.mark.usefixtures("ray_cluster")

# The rule each fault breaks, as the quarantine words it (a prefix of the reason).
RULES = {
    "nulls": ("not_nullable",),
    "range": ("amount: greater_than(0)", "amount: less_than_or_equal_to(50000"),
    "types": ("amount: coerce_dtype",),
    "categories": ("merchant_category: isin", "device: isin"),
    "duplicates": ("txn_id: field_uniqueness",),
    "malformed": ("unparseable", "record:"),
    "truncated": ("unparseable", "record:"),
}


def settings_for(tmp_path: Path, **overrides: object) -> Settings:
    return load_settings(
        storage_root=tmp_path / "store",
        pii_key=PII_KEY,
        ingest={"max_quarantine_share": 1.0},
        **overrides,
    )


def kind_of(reason: str) -> set[str]:
    return {k for k, rules in RULES.items() if any(r in reason for r in rules)}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_every_fault_is_quarantined_with_its_rule_and_every_record_reconciles(
    tmp_path: Path, clean_env: None, fmt: str
) -> None:
    faults = ("nulls", "range", "types", "categories", "duplicates", "malformed")
    if fmt != "parquet":
        faults += ("truncated",)
    raw = tmp_path / "raw"
    report = generate_transactions(
        raw, rows=3000, seed=1, fault_rate=0.2, faults=faults, fmt=fmt, rows_per_shard=1000
    )
    result = ingest(settings_for(tmp_path), TRANSACTIONS, open_source(raw))
    m = result.manifest
    assert m.rows_in == report.rows == m.rows_valid + m.rows_quarantined
    assert m.rows_quarantined == sum(report.injected.values())
    for source in m.sources:  # per file too, each against its own count of records
        assert source.rows == source.rows_valid + source.rows_quarantined
    assert len(m.sources) == len(report.files)

    quarantine = pq.read_table(result.path / "rows" / f"split={QUARANTINE}").to_pandas()
    assert len(quarantine) == m.rows_quarantined
    assert quarantine[SOURCE].map(lambda p: Path(p).name).isin([f.name for f in report.files]).all()
    assert (quarantine[ROW] >= 1).all() and quarantine[RAW_COLUMN].notna().all()
    seen = Counter(k for reason in quarantine[REASON_COLUMN] for k in kind_of(reason))
    for kind, n in report.injected.items():
        if kind in ("malformed", "truncated"):
            continue  # both show as unparseable records; counted together below
        assert seen[kind] >= n > 0, (kind, seen, report.injected)
    unparseable = report.injected.get("malformed", 0) + report.injected.get("truncated", 0)
    assert seen["malformed"] == unparseable


def test_a_truncated_parquet_file_is_refused_naming_it(tmp_path: Path, clean_env: None) -> None:
    raw = tmp_path / "raw"
    report = generate_transactions(
        raw, rows=2000, fault_rate=0.01, faults=("truncated",), rows_per_shard=1000
    )
    with pytest.raises(DataContractError, match=rf"{report.files[-1].name} is not a readable"):
        ingest(settings_for(tmp_path), TRANSACTIONS, open_source(raw))


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_no_pii_reaches_any_output(tmp_path: Path, clean_env: None, fmt: str) -> None:
    raw = tmp_path / "raw"
    generate_transactions(raw, rows=4000, seed=3, fault_rate=0.05, fmt=fmt, rows_per_shard=2000)
    original = pd.concat(  # every record, the malformed ones too, as far as they parse
        [transactions_frame(2000, seed=3, start_id=start) for start in (0, 2000)]
    ).astype({"txn_id": str})
    patterns = {"card_number": CARD, "email": EMAIL, "ip_address": IPV4}
    secrets = {  # a malformed line shifts its fields: keep what really looks like PII
        v
        for column, pattern in patterns.items()
        for v in original[column].dropna().unique()
        if re.fullmatch(pattern, v) and len(v) >= 9
    }
    # A malformed line is cut anywhere: the part of an email before the @ must go too.
    secrets |= {e.split("@")[0] for e in original["email"] if len(e.split("@")[0]) >= 8}
    assert len(secrets) > 100
    result = ingest(settings_for(tmp_path), TRANSACTIONS, open_source(raw))

    every_output = list((tmp_path / "store").rglob("*"))
    assert any(p.name == PREPROCESSOR for p in every_output)
    for path in every_output:
        if not path.is_file() or path.is_relative_to(tmp_path / "store" / "raw"):
            continue
        text = (
            pq.read_table(path).to_pandas().to_csv()
            if path.suffix == ".parquet"
            else path.read_text(errors="replace")
        )
        leaked = [s for s in secrets if s in text]
        assert not leaked, f"{path} holds raw PII, e.g. {leaked[:2]}"
    # Joins still work: one card's rows share one pseudonym.
    valid = pq.read_table(result.path / "rows" / "split=train").to_pandas()
    assert valid["card_number"].str.fullmatch(r"[0-9a-f]{32}").all()
    assert valid["card_number"].nunique() < len(valid)  # cards repeat, and so do pseudonyms
    by_id = original.drop_duplicates("txn_id").set_index("txn_id")["card_number"]
    raw_cards = by_id.reindex(valid["txn_id"].astype(str)).to_numpy()
    expected = [PiiKey(PII_KEY.encode()).pseudonym(c) for c in raw_cards]
    assert (valid["card_number"].to_numpy() == expected).mean() > 0.99  # the key's pseudonym
    assert valid["note"].dropna().str.contains(r"\[(EMAIL|CARD|IP)\]").any()
    # Raw values in free text and in the quarantine's kept records are gone too.
    quarantine = pq.read_table(result.path / "rows" / f"split={QUARANTINE}").to_pandas()
    for record in quarantine[RAW_COLUMN]:
        assert not any(s in record for s in secrets)
    assert any(json.loads(r).get("card_number") for r in quarantine[RAW_COLUMN] if r[0] == "{")


def test_too_many_broken_records_fail_the_run_naming_files_and_rules(
    tmp_path: Path, clean_env: None
) -> None:
    raw = tmp_path / "raw"
    generate_transactions(raw, rows=1000, fault_rate=0.3, faults=("range",), fmt="csv")
    settings = load_settings(storage_root=tmp_path / "store", pii_key=PII_KEY)
    with pytest.raises(DataContractError) as err:
        ingest(settings, TRANSACTIONS, open_source(raw))
    message = str(err.value)
    assert "transactions-00000.csv (" in message and "top rules: amount: " in message
    assert "ingest.max_quarantine_share" in message and "_rejected" in message
    assert DatasetStore(settings.datasets_dir).manifests("transactions") == []


def test_pii_needs_a_key_outside_dev(tmp_path: Path, clean_env: None) -> None:
    raw = tmp_path / "raw"
    generate_transactions(raw, rows=100)
    with pytest.raises(ConfigError, match="SCALEDL_PII_KEY"):
        ingest(load_settings(storage_root=tmp_path / "store"), TRANSACTIONS, open_source(raw))
    dev = load_settings(storage_root=tmp_path / "store", dev=True)
    assert ingest(dev, TRANSACTIONS, open_source(raw)).manifest.rows_valid == 100


def test_same_inputs_same_version_changed_inputs_a_child_version(
    tmp_path: Path, clean_env: None
) -> None:
    raw = tmp_path / "raw"
    generate_transactions(raw, rows=2000, rows_per_shard=1000)
    settings = settings_for(tmp_path)
    first = ingest(settings, TRANSACTIONS, open_source(raw))
    again = ingest(settings, TRANSACTIONS, open_source(raw))
    assert again.reused and again.manifest.version == first.manifest.version

    generate_transactions(tmp_path / "more", rows=500, seed=9)
    (tmp_path / "more" / "transactions-00000.parquet").rename(raw / "transactions-extra.parquet")
    second = ingest(settings, TRANSACTIONS, open_source(raw))
    m = second.manifest
    assert m.version != first.manifest.version and m.parent == first.manifest.version
    assert m.rows_in == 2500 and len(m.sources) == 3
    # The extra file repeats ids 0-499 of the first: those later copies are quarantined.
    assert m.quarantine_reasons == {"txn_id: field_uniqueness": 500}
    quarantine = pq.read_table(second.path / "rows" / f"split={QUARANTINE}").to_pandas()
    assert {Path(p).name for p in quarantine[SOURCE]} == {"transactions-extra.parquet"}
    assert all(len(s.sha256) == 64 and s.size > 0 for s in m.sources)
    amount = m.stats["amount"]
    assert amount.quantiles["0.5"] > 0 and len(amount.histogram["counts"]) == 20
    assert set(m.stats["merchant_category"].top_values) <= set(
        TRANSACTIONS.contract().columns["merchant_category"].checks[0].statistics["allowed_values"]
    )
    assert m.pii_key and PII_KEY not in second.path.joinpath("manifest.json").read_text()
    # Another PII key means other pseudonyms: another version.
    other = load_settings(
        storage_root=tmp_path / "store",
        pii_key="another-key-0123456789",
        ingest={"max_quarantine_share": 1.0},
    )
    assert ingest(other, TRANSACTIONS, open_source(raw)).manifest.version != m.version


def test_training_streams_a_transactions_version_and_the_model_carries_its_preprocessor(
    tmp_path: Path, clean_env: None
) -> None:
    from app.model_artifact import load_model
    from app.registry import Registry
    from train.run import train_tier

    raw = tmp_path / "raw"
    generate_transactions(raw, rows=6000, seed=4, rows_per_shard=2000)
    # cache 0: the splits are streamed from the version's Parquet shards every epoch.
    settings = settings_for(tmp_path, train={"epochs": 3, "cache_inputs_below_mb": 0})
    version = ingest(settings, TRANSACTIONS, open_source(raw)).manifest
    outcome = train_tier(settings, TRANSACTIONS, "cheap")
    fraud_rate = (
        pq.read_table(
            DatasetStore(settings.datasets_dir).split_dir("transactions", version.version, "test"),
            columns=["is_fraud"],
        )
        .column(0)
        .to_pandas()
        .mean()
    )
    assert outcome.metrics["test_accuracy"] > 1 - fraud_rate + 0.02  # beats "never fraud"

    registry = Registry(settings.tracking_uri)
    model = load_model(registry.download(outcome.model))
    assert model.workload.preprocessor is not None
    assert (
        registry.client.get_model_version(outcome.model.name, outcome.model.version).tags[
            "dataset_version"
        ]
        == version.version
    )
    rows = pd.read_parquet(raw / "transactions-00000.parquet").head(5)
    probs = model.predict_proba(rows[list(TRANSACTIONS.feature_columns)])
    assert probs.shape == (5, 2)
