import numpy as np
import pandas as pd
import pytest

from app.errors import DataContractError
from app.workloads import get_workload
from data.validate import CompiledContract, check_rows
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


def test_compiled_contract_names_column_and_rule() -> None:
    compiled = CompiledContract(DIGITS.instance_contract())
    row = np.zeros((1, 64))
    row[0, 12] = 40
    assert compiled.row_errors(row) == ["px_12: in_range(0, 16)"]
