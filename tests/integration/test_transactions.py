"""The transactions workload end to end on a real Ray cluster: generated files with every
fault, the quarantine and its reconciliation, PII that never leaves the pipeline, versions
and lineage, and training that streams a version's shards."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

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
from data.versions import MANIFEST, PREPROCESSOR, QUARANTINE, DatasetManifest, DatasetStore
from tests.conftest import free_port
from tests.ray_platform import Platform, wait_for_serve_gone

if TYPE_CHECKING:
    from train.run import TrainOutcome

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
    assert quarantine[SOURCE].isin([s.sha256 for s in m.sources]).all()
    assert {Path(s.path).name for s in m.sources} == {f.name for f in report.files}
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


# PII where a name belongs: a JSONL key a client made up, a CSV exported without its header.
HOSTILE = ("4000056655665556", "hostile.key@leak.example", "4000 0566 5566 5556")


def test_hostile_names_leak_no_pii_into_errors_stderr_manifests_or_the_quarantine(
    tmp_path: Path, clean_env: None, capfd: pytest.CaptureFixture[str]
) -> None:
    raw = tmp_path / "raw"
    (shard,) = generate_transactions(raw, rows=200, fmt="jsonl").files
    good = json.loads(shard.read_text().splitlines()[0])
    with shard.open("a") as f:  # 30 of 230 records have a PII key: over the 5 % gate
        for i in range(30):
            f.write(json.dumps({**good, "txn_id": f"h{i}", HOSTILE[i % 3]: 1}) + "\n")
    settings = load_settings(storage_root=tmp_path / "store", pii_key=PII_KEY)
    with pytest.raises(DataContractError) as gate:
        ingest(settings, TRANSACTIONS, open_source(raw))
    assert "top rules: record: unexpected field (" in str(gate.value)

    headless = tmp_path / "headless"
    headless.mkdir()
    lines = shard.read_text().splitlines()[:3]
    header = ",".join(good)
    (headless / "export.csv").write_text(
        "\n".join(",".join(str(v) for v in json.loads(line).values()) for line in lines) + "\n"
    )
    with pytest.raises(DataContractError) as no_header:
        ingest(settings, TRANSACTIONS, open_source(headless))
    assert f"export it with the header row {header}" in str(no_header.value)
    first = json.loads(lines[0])  # its card, email and IP are what must not be echoed
    firsts = [first[c] for c in ("card_number", "email", "ip_address") if first[c]]
    assert firsts

    (rejected,) = (settings.datasets_dir / "transactions" / "_rejected").glob(f"*/{MANIFEST}")
    reasons = json.loads(rejected.read_text())["quarantine_reasons"]
    assert reasons == {
        "record: unexpected field (16 characters, not shown)": 10,
        "record: unexpected field (24 characters, not shown)": 10,
        "record: unexpected field (19 characters, not shown)": 10,
    }
    texts = {"gate error": str(gate.value), "no-header error": str(no_header.value)}
    texts["stderr and stdout"] = "".join(capfd.readouterr())
    for path in (tmp_path / "store").rglob("*"):
        if path.is_file():
            texts[str(path)] = (
                pq.read_table(path).to_pandas().to_csv()
                if path.suffix == ".parquet"
                else path.read_text(errors="replace")
            )
    for where, text in texts.items():
        leaked = [h for h in (*HOSTILE, *firsts) if h in text]
        assert not leaked, f"{where} holds {leaked}"


def test_files_that_hold_no_record_are_refused_with_what_to_fix(
    tmp_path: Path, clean_env: None
) -> None:
    """A CSV of a header only: the pass writes nothing, and the run is refused by the
    gate, saying what to check, not by a missing folder."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "empty.csv").write_text(",".join(TRANSACTIONS.contract().columns) + "\n")
    with pytest.raises(DataContractError, match="hold no rows: check --source"):
        ingest(settings_for(tmp_path), TRANSACTIONS, open_source(raw))


def test_pii_needs_a_key_outside_dev(tmp_path: Path, clean_env: None) -> None:
    raw = tmp_path / "raw"
    generate_transactions(raw, rows=100)
    with pytest.raises(ConfigError, match="SCALEDL_PII_KEY"):
        ingest(load_settings(storage_root=tmp_path / "store"), TRANSACTIONS, open_source(raw))
    dev = load_settings(storage_root=tmp_path / "store", dev=True)
    assert ingest(dev, TRANSACTIONS, open_source(raw)).manifest.rows_valid == 100


def test_renamed_reordered_copies_give_the_same_version_files_rows_and_statistics(
    tmp_path: Path, clean_env: None
) -> None:
    """The same bytes under other names, listed in another order, in another store: the
    same version id, output file names, rows, content hash, statistics and fitted
    preprocessor. Faults (duplicate ids across files among them) make which copy stays
    depend on the order the files are read in."""
    raw, copies = tmp_path / "raw", tmp_path / "copies"
    report = generate_transactions(raw, rows=3000, seed=3, fault_rate=0.1, fmt="csv",
                                   rows_per_shard=1000)  # fmt: skip
    (copies / "nested").mkdir(parents=True)
    # Reversed: the last file by name is the first copy by name.
    for i, f in enumerate(sorted(report.files, reverse=True)):
        shutil.copyfile(f, copies / ("nested" if i % 2 else "") / f"{i}-renamed.csv")
    a = ingest(settings_for(tmp_path / "a"), TRANSACTIONS, open_source(raw))
    b = ingest(settings_for(tmp_path / "b"), TRANSACTIONS, open_source(copies))
    ma, mb = a.manifest, b.manifest
    assert not b.reused and ma.version == mb.version
    assert ma.quarantine_reasons["txn_id: field_uniqueness"] > 0
    assert (ma.splits, ma.quarantine_reasons) == (mb.splits, mb.quarantine_reasons)
    assert ma.content_hash == mb.content_hash and ma.stats == mb.stats
    assert (a.path / PREPROCESSOR).read_text() == (b.path / PREPROCESSOR).read_text()

    def files(version: Path) -> dict[str, pd.DataFrame]:
        found = sorted((version / "rows").rglob("*.parquet"))
        return {
            str(f.relative_to(version)): pq.read_table(f)
            .to_pandas()
            .sort_values([SOURCE, ROW], ignore_index=True)
            for f in found
        }

    fa, fb = files(a.path), files(b.path)
    assert list(fa) == list(fb)
    assert all(
        re.fullmatch(r"rows/split=\w+/(part-[0-9a-f]{16}-\d{12}|duplicates)\.parquet", n)
        for n in fa
    )
    for name, frame in fa.items():
        pd.testing.assert_frame_equal(frame, fb[name], obj=name)
    assert ma.parent is None and mb.parent is None

    # The parent is what a version derives from, not simply the newest: two of the
    # three files extend nothing in store a (test_same_inputs_… has one that extends).
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for f in sorted(report.files)[:2]:
        shutil.copyfile(f, fewer / f.name)
    subset = ingest(settings_for(tmp_path / "a"), TRANSACTIONS, open_source(fewer))
    assert subset.manifest.version != ma.version and subset.manifest.parent is None
    same = ingest(settings_for(tmp_path / "a"), TRANSACTIONS, open_source(copies))
    assert same.reused and same.manifest.version == ma.version


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_one_large_file_in_pieces_and_ids_in_buckets_is_the_version_of_one_read(
    tmp_path: Path, clean_env: None, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """One large file is cut into pieces that run as read tasks of their own (so memory
    holds a piece, and the file uses every core), and the id's uniqueness is checked a
    hash bucket at a time. Cut small here (pieces of 64 KiB, buckets of 1,000 ids): the
    same version, rows, quarantine (ids repeated across pieces included), content hash
    and statistics as one piece and one bucket."""
    from data import pipeline, sources

    raw = tmp_path / "raw"
    generate_transactions(raw, rows=6000, seed=4, fault_rate=0.1, fmt=fmt,
                          rows_per_shard=6000)  # fmt: skip
    whole = ingest(settings_for(tmp_path / "whole"), TRANSACTIONS, open_source(raw))
    monkeypatch.setattr(sources, "PIECE_BYTES", 64 << 10)
    monkeypatch.setattr(pipeline, "ID_BUCKET_ROWS", 1000)
    pieced = ingest(settings_for(tmp_path / "pieced"), TRANSACTIONS, open_source(raw))
    mw, mp = whole.manifest, pieced.manifest
    assert mw.version == mp.version and mw.rows_in == mp.rows_in > 4000
    assert mw.quarantine_reasons["txn_id: field_uniqueness"] > 0
    assert (mp.splits, mp.quarantine_reasons) == (mw.splits, mw.quarantine_reasons)
    assert mp.content_hash == mw.content_hash
    assert mp.stats == mw.stats
    train = [
        len(list((r.path / "rows" / "split=train").glob("*.parquet"))) for r in (whole, pieced)
    ]
    assert train[0] == 1 and train[1] >= 8, train
    assert not (pieced.path / "ids").exists()  # the buckets are not part of the version


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
    # The extra file repeats ids 0-499 of the first. Files are read in content order
    # (their SHA-256), whatever their names: the copies in the later one are quarantined.
    assert m.quarantine_reasons == {"txn_id: field_uniqueness": 500}
    quarantine = pq.read_table(second.path / "rows" / f"split={QUARANTINE}").to_pandas()
    sha = {Path(s.path).name: s.sha256 for s in m.sources}
    later = max(sha["transactions-extra.parquet"], sha["transactions-00000.parquet"])
    assert set(quarantine[SOURCE]) == {later}
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


class Needles:
    """Finds any of many card numbers and emails in megabytes of logs: a candidate of
    either shape at every offset, looked up in a set (one regex alternating thousands of
    values took 35 s over one Ray session's logs; this takes a fraction of a second)."""

    SHAPES = re.compile(r"(?=(\d{16}|[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}))")

    def __init__(self, values: set[str], *, literals: tuple[str, ...]) -> None:
        self.values, self.literals = values, literals
        self.lengths = sorted({len(v) for v in values})

    def search(self, text: str) -> str | None:
        """The first value or literal found in ``text``, else None."""
        for literal in self.literals:
            if literal in text:
                return literal
        for match in self.SHAPES.finditer(text):
            # A value is a prefix of the greedy candidate at its offset ("a@b.com" of
            # "a@b.com.au"), so every value length is tried.
            candidate = match.group(1)
            for n in self.lengths:
                if candidate[:n] in self.values:
                    return candidate[:n]
        return None


@dataclass(frozen=True)
class Trained:
    settings: Settings
    raw: Path
    version: DatasetManifest
    outcome: TrainOutcome
    driver_stderr: str  # what ingest and training wrote to this driver's stderr


@pytest.fixture(scope="module")
def trained(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """6,000 transactions as JSONL with malformed lines, nulls and duplicates (which the
    quarantine keeps), ingested, then the cheap tier trained on the version for 3 epochs,
    streamed (cache 0: the splits are read from the version's Parquet shards every epoch).
    Shared by the training test and the PII scan, which each need a trained version."""
    from train.run import train_tier

    tmp_path = tmp_path_factory.mktemp("trained")
    raw = tmp_path / "raw"
    generate_transactions(
        raw, rows=6000, seed=4, fault_rate=0.03, fmt="jsonl", rows_per_shard=2000,
        faults=("malformed", "nulls", "duplicates"),
    )  # fmt: skip
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as env, contextlib.redirect_stderr(stderr):
        for key in [k for k in os.environ if k.startswith("SCALEDL_") or k == "RAY_ADDRESS"]:
            env.delenv(key)
        settings = settings_for(tmp_path, train={"epochs": 3, "cache_inputs_below_mb": 0})
        version = ingest(settings, TRANSACTIONS, open_source(raw)).manifest
        outcome = train_tier(settings, TRANSACTIONS, "cheap")
    sys.stderr.write(stderr.getvalue())  # still shown when a test fails
    return Trained(settings, raw, version, outcome, stderr.getvalue())


def test_training_streams_a_transactions_version_and_the_model_carries_its_preprocessor(
    trained: Trained,
) -> None:
    from app.model_artifact import load_model
    from app.registry import Registry

    settings, version, outcome = trained.settings, trained.version, trained.outcome
    assert version.rows_quarantined > 0  # the faults are quarantined, the rest trains
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
    rows = transactions_frame(5, seed=4)
    probs = model.predict_proba(rows[list(TRANSACTIONS.feature_columns)])
    assert probs.shape == (5, 2)


def test_no_pii_or_secret_reaches_any_log_or_file_after_ingest_training_and_serving(
    trained: Trained, clean_env: None, platform: Platform, capfd: pytest.CaptureFixture
) -> None:
    """Transactions with PII (and malformed lines, which the quarantine keeps) went
    through ingest and training (the ``trained`` fixture); then the platform's digits
    graph serves requests that carry an email in the routing header and card numbers and
    emails in bodies it refuses, and a wrong bearer token. The transactions model is not
    served: the integration platform has no transactions cascade, and a request's
    features hold no PII anyway. Then every file of the Ray session's logs and of both
    storage roots is scanned for each raw value, the PII key and both bearer secrets, and
    so is the driver's stderr (where ingest's event goes: the job's log under
    ``ray job submit``)."""
    import httpx
    from ray import serve
    from ray._private.worker import global_worker

    from app.keys import dev_key
    from app.serving import deploy

    settings, raw = trained.settings, trained.raw
    original = pd.concat([transactions_frame(2000, seed=4, start_id=s) for s in (0, 2000, 4000)])
    cards = [c for c in original["card_number"].dropna().unique() if re.fullmatch(CARD, c)]
    emails = [e for e in original["email"].dropna().unique() if re.fullmatch(EMAIL, e)]

    secret, wrong = "serving-secret-" + "k" * 24, "wrong-bearer-" + "w" * 24
    served = load_settings(storage_root=platform.settings.storage_root, serve={"port": free_port()})
    endpoint = deploy(served, "digits", [dev_key(secret)])
    try:
        auth = {"Authorization": f"Bearer {secret}"}
        with httpx.Client(timeout=30) as http:
            ok = http.post(
                endpoint.predict_url, json={"instances": [[0.0] * 64]},
                headers={**auth, "x-scaledl-user": emails[0]},
            )  # fmt: skip
            assert ok.status_code == 200, ok.text
            for body in ({"instances": [cards[0]]}, {"instances": [[0.0] * 63 + [emails[1]]]},
                         {emails[2]: cards[1]}):  # fmt: skip
                assert http.post(endpoint.predict_url, json=body, headers=auth).status_code in (
                    400, 422,
                )  # fmt: skip
            denied = http.post(
                endpoint.predict_url, json={"instances": [[0.0] * 64]},
                headers={"Authorization": f"Bearer {wrong}"},
            )  # fmt: skip
            assert denied.status_code == 401
    finally:
        serve.shutdown()
        wait_for_serve_gone()

    leak = Needles({*cards, *emails}, literals=(PII_KEY, secret, wrong))
    assert len(leak.values) > 100
    assert leak.search((raw / "transactions-00000.jsonl").read_text())  # the needles are real
    driver = trained.driver_stderr + capfd.readouterr().err
    assert not leak.search(driver), leak.search(driver)
    roots = [Path(global_worker.node.get_logs_dir_path()), settings.storage_root,
             platform.settings.storage_root]  # fmt: skip
    scanned, lines = 0, driver.splitlines()
    for root in roots:
        for path in root.rglob("*"):
            if not path.is_file() or path.is_relative_to(settings.storage_root / "raw"):
                continue
            text = (
                pq.read_table(path).to_pandas().to_csv()
                if path.suffix == ".parquet"
                else path.read_bytes().decode("latin-1")
            )
            scanned += 1
            found = leak.search(text)
            assert found is None, f"{path} holds raw PII or a secret: {found[:4]}..."
            if path.suffix in (".err", ".log", ".out"):
                lines += text.splitlines()
    assert scanned > 50
    # The stages' own events are there, as JSON lines (app/logs.py).
    kinds = {
        json.loads(line[line.index("{") :]).get("event")
        for line in lines
        if '"event": ' in line and "{" in line
    }
    assert {"ingest.run", "train.epoch", "request"} <= kinds, kinds


def test_a_data_worker_killed_mid_pass_leaves_the_same_version_and_nothing_half_written(
    tmp_path: Path, clean_env: None
) -> None:
    """A Ray Data worker SIGKILLed while it reads, marks and writes a file (an OOM kill, a
    lost node): Ray runs the task again, its output files are named for their first row and
    overwritten, so the version is the one an undisturbed ingest of the same bytes
    makes: the same id, content hash, rows, quarantine and statistics, and in = valid +
    quarantined. Had the run failed instead, no version of it may be published."""
    import signal
    import threading
    import time

    import psutil

    raw = tmp_path / "raw"
    generate_transactions(raw, rows=200_000, seed=5, fault_rate=0.01, fmt="csv",
                          rows_per_shard=50_000)  # fmt: skip
    killed: list[str] = []

    def kill_a_pass_worker() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for proc in psutil.process_iter(["pid", "cmdline"]):
                title = " ".join(proc.info["cmdline"] or [])
                if title.startswith("ray::ReadRawFiles"):  # the pass's fused task
                    time.sleep(0.3)  # into its file
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.info["pid"], signal.SIGKILL)
                        killed.append(title.strip())
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_pass_worker)
    killer.start()
    disturbed_store = settings_for(tmp_path / "disturbed")
    try:
        disturbed = ingest(disturbed_store, TRANSACTIONS, open_source(raw))
    except Exception as exc:  # noqa: BLE001 - a clean failure is allowed; checked below
        disturbed, failure = None, exc
    killer.join()
    assert killed, "no pass worker was seen to kill"
    if disturbed is None:  # failed: it says why, and published nothing
        print(f"the ingest failed after {killed}: {failure}")
        assert str(failure)
        assert not DatasetStore(disturbed_store.datasets_dir).manifests("transactions")
        return
    print(f"killed {killed}; the ingest completed")
    undisturbed = ingest(settings_for(tmp_path / "undisturbed"), TRANSACTIONS, open_source(raw))
    a, b = disturbed.manifest, undisturbed.manifest
    assert a.version == b.version and a.content_hash == b.content_hash
    assert (a.splits, a.quarantine_reasons, a.stats) == (b.splits, b.quarantine_reasons, b.stats)
    assert a.rows_in == b.rows_in == a.rows_valid + a.rows_quarantined
