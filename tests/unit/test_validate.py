import numpy as np
import pandas as pd
import pytest

from app.errors import DataContractError
from app.workloads import get_workload
from data.validate import check_rows
from serve_graphs.api.contract import CompiledContract
from tests.conftest import corrupt

DIGITS = get_workload("digits")


def test_clean_rows_have_no_reason(digits_frame: pd.DataFrame) -> None:
    valid, reasons = check_rows(digits_frame, DIGITS.contract(), where="digits.parquet")
    assert reasons.isna().all()
    assert len(valid) == len(digits_frame)


def test_each_broken_row_gets_the_rule_it_broke(digits_frame: pd.DataFrame) -> None:
    bad, broken = corrupt(digits_frame.head(20))
    bad.index = bad.index + 1000  # reasons follow position, not the caller's index
    valid, reasons = check_rows(bad, DIGITS.contract(), where="f.parquet")
    got = {int(i): r for i, r in zip(bad["id"], reasons, strict=True) if r is not None}
    assert got == broken
    # The rest come back coerced to the contract's types, at their positions.
    assert list(valid.index) == [i for i in range(20) if reasons[i] is None]
    assert valid["px_05"].dtype == "float64" and valid["label"].dtype == "int64"


@pytest.mark.parametrize(
    ("faults", "passes"),
    [(("nulls", "range", "categories"), 1), (("types", "nulls", "range"), 2)],
)
def test_a_batch_is_validated_once_unless_a_failed_coercion_hides_checks(
    tmp_path, monkeypatch: pytest.MonkeyPatch, faults: tuple[str, ...], passes: int
) -> None:  # noqa: ANN001
    """Bad rows that each fail a check row by row cost one pandera pass: the rest of
    the batch, already coerced, is the answer, the same as validating the good rows
    alone. A value that cannot be coerced (a word for an amount) makes pandera fail
    that column's checks as a whole, so the rest is validated once more."""
    from data.generate import generate_transactions
    from data.readers import read_csv

    transactions = get_workload("transactions")
    contract = transactions.contract().update_column("txn_id", unique=False)
    report = generate_transactions(tmp_path, rows=400, seed=2, fault_rate=0.05, faults=faults,
                                   fmt="csv")  # fmt: skip
    columns = list(contract.columns)
    frame = pd.concat(read_csv(report.files[0].read_bytes(), "t.csv", columns))[columns]
    calls = []
    validate = type(contract).validate

    def counted(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(1)
        return validate(self, *args, **kwargs)

    monkeypatch.setattr(type(contract), "validate", counted)
    valid, reasons = check_rows(frame, contract, where="t.csv")
    assert len(calls) == passes and 0 < reasons.notna().sum() < len(frame)
    expected = validate(contract, frame[reasons.isna().to_numpy()].reset_index(drop=True))
    pd.testing.assert_frame_equal(valid.reset_index(drop=True), expected)
    assert list(valid.index) == list(reasons.index[reasons.isna()])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.drop(columns=["px_10"]), "missing column 'px_10'"),
        (lambda f: f.assign(extra=1), "unexpected column 'extra'"),
    ],
)
def test_a_wrong_set_of_columns_fails_the_file(digits_frame, change, message) -> None:  # noqa: ANN001
    with pytest.raises(DataContractError, match=f"raw/part-3.parquet: .*{message}"):
        check_rows(change(digits_frame.head(5)), DIGITS.contract(), where="raw/part-3.parquet")


def test_compiled_contract_agrees_with_pandera() -> None:
    contract = DIGITS.instance_contract()
    compiled = CompiledContract(contract)
    rng = np.random.default_rng(3)
    values = rng.integers(0, 17, (400, 64)).astype(float)
    for bad_value in (17.0, -1.0, 2.5, np.nan):
        values[rng.random(values.shape) < 0.002] = bad_value
    fast = compiled.row_errors(values)
    _, slow = check_rows(pd.DataFrame(values, columns=compiled.columns), contract, where="x")
    assert sum(r is not None for r in fast) > 50  # the test data really is broken
    assert fast == [None if pd.isna(r) else r for r in slow]  # same rows, same rule named


def test_compiled_contract_agrees_with_pandera_on_checks_that_need_a_series() -> None:
    """Custom checks run on the bare array when they can (numpy arithmetic) and on a
    Series when they need one (its methods); columns in a group need not be all."""
    import pandera.pandas as pa

    even = pa.Check(lambda s: s % 2 == 0, name="even")
    between = pa.Check(lambda s: s.between(1, 3), name="between")  # a Series method
    contract = pa.DataFrameSchema(
        {
            "a": pa.Column(float, pa.Check.in_range(0, 5)),
            "b": pa.Column(float, [pa.Check.in_range(0, 5), even], nullable=True),
            "c": pa.Column(float, between),
        }
    )
    compiled = CompiledContract(contract)
    values = np.random.default_rng(5).integers(-1, 7, (300, 3)).astype(float)
    values[::17, 1] = np.nan
    fast = compiled.row_errors(values)
    _, slow = check_rows(pd.DataFrame(values, columns=compiled.columns), contract, where="x")
    assert {r.split(":")[0] for r in fast if r} == {"a", "b", "c"}  # every rule was broken
    assert fast == [None if pd.isna(r) else r for r in slow]


def test_a_check_that_needs_a_series_gets_one_without_trying_the_array_each_time() -> None:
    import pandera.pandas as pa

    seen: list[str] = []

    def between(s):  # noqa: ANN001, ANN202 - a pandera check
        seen.append(type(s).__name__)
        return s.between(1, 3)

    compiled = CompiledContract(pa.DataFrameSchema({"c": pa.Column(float, pa.Check(between))}))
    verdicts = [compiled.row_errors(np.array([[v]])) for v in (2.0, 5.0, 3.0)]
    assert [v[0] is None for v in verdicts] == [True, False, True]
    assert seen == ["ndarray", "Series", "Series", "Series"]


def test_compiled_contract_names_column_and_rule() -> None:
    compiled = CompiledContract(DIGITS.instance_contract())
    row = np.zeros((1, 64))
    row[0, 12] = 40
    assert compiled.row_errors(row) == ["px_12: in_range(0, 16)"]


def transaction_records(n: int) -> list[dict]:
    tx = get_workload("transactions")
    frame = tx.builtin_source()[list(tx.feature_columns)].head(n)
    return frame.assign(ts=frame["ts"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")).to_dict("records")


# One broken or unusual field each: the fast path must refuse (pandera decides) or agree.
ODD_FIELDS = [
    ("ts", None), ("ts", "yesterday"), ("ts", "2026-03-01 02:10:00"),
    ("ts", "1999-12-31T23:00:00Z"),
    ("ts", "2026-03-01T02:10:00.123456+02:00"), ("ts", 1_700_000_000),
    ("amount", None), ("amount", 0.0), ("amount", -3), ("amount", 1e12), ("amount", "12.5"),
    ("amount", True), ("amount", 7), ("amount", float("nan")),
    ("currency", "gbp"), ("currency", ""), ("currency", 5), ("currency", None),
    ("merchant_category", "casino"), ("country", "GBR"), ("country", "gb"), ("device", "Pos"),
]  # fmt: skip


@pytest.mark.parametrize(("field", "value"), ODD_FIELDS)
def test_the_record_fast_path_never_accepts_what_pandera_would_not(field, value) -> None:  # noqa: ANN001
    from serve_graphs.api.contract import RecordFastPath

    schema = get_workload("transactions").instance_contract()
    records = transaction_records(3)
    records[1] = {**records[1], field: value}
    frame = pd.DataFrame.from_records(records)
    fast = RecordFastPath(schema)(frame)
    valid, reasons = check_rows(frame, schema, where="request")
    if fast is not None:
        assert reasons.isna().all()
        pd.testing.assert_frame_equal(fast, valid)


def test_the_record_fast_path_takes_valid_records_coerced_as_pandera_coerces_them() -> None:
    from serve_graphs.api.contract import RecordFastPath

    schema = get_workload("transactions").instance_contract()
    frame = pd.DataFrame.from_records(transaction_records(200))
    fast = RecordFastPath(schema)(frame)
    assert fast is not None
    valid, reasons = check_rows(frame, schema, where="request")
    assert reasons.isna().all()
    pd.testing.assert_frame_equal(fast, valid)
