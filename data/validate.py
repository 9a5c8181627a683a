"""Check rows against a workload's contract and say, per row, which rule it broke.

Pure functions over pandas batches: Ray Data calls them per block, the ingress per
request, tests directly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from app.errors import DataContractError
from data.pii import shown_name

if TYPE_CHECKING:
    import pandera.pandas as pa
    import pyarrow

NOT_NULLABLE = "not_nullable"  # pandera's name for a null in a non-nullable column

# A batch whose row errors hide other row errors (a failed type coercion makes the range
# checks of that column fail as a whole) is re-checked without the rows already caught.
_MAX_PASSES = 3
_COERCION = r"coerce_dtype\(|dtype\("  # pandera's names for a failed or wrong type


def check_rows(
    frame: pd.DataFrame, schema: pa.DataFrameSchema, *, where: str
) -> tuple[pd.DataFrame, pd.Series]:
    """Split a batch by the contract.

    Returns the valid rows coerced to the contract's types (indexed by their position in
    ``frame``) and, for every row, the first rule it broke (``"<column>: <check>"``) or
    None. Problems of the whole batch (a missing or unexpected column) are not row
    problems: they raise :class:`DataContractError` naming ``where`` and the columns.
    """
    import pandera.errors

    pending = frame.reset_index(drop=True)
    reasons = pd.Series([None] * len(pending), dtype=object)
    for position, reason in _precoerce(pending, schema).items():
        reasons.loc[position] = reason
    pending = pending.drop(index=reasons.index[reasons.notna()])
    for _ in range(_MAX_PASSES):
        try:
            return schema.validate(pending, lazy=True), reasons
        except pandera.errors.SchemaErrors as exc:
            cases, checked = exc.failure_cases, exc.data
        by_row = cases[cases["index"].notna()]
        if by_row.empty:
            raise DataContractError(f"{where}: {_describe_table_errors(cases)}")
        # A null in a text column also fails coercion; "not_nullable" is the real cause.
        by_row = by_row.sort_values("check", key=lambda c: c != NOT_NULLABLE, kind="stable")
        first = by_row.groupby("index", sort=False).first()
        checks = first["check"].map(_short)
        reasons.loc[first.index.astype(int)] = (first["column"] + ": " + checks).to_numpy()
        pending = pending.drop(index=first.index.astype(int))
        if len(by_row) == len(cases) and not by_row["check"].str.match(_COERCION).any():
            # Every column was coerced and every check judged row by row, so the rows
            # not named broke nothing: the coerced rest is the answer, with no second
            # pass (the usual case: a batch with a few bad rows).
            return checked.drop(index=first.index.astype(int)), reasons
    rules = sorted({f"{c}: {k}" for c, k in cases[["column", "check"]].itertuples(index=False)})
    raise DataContractError(  # rules only: the failing values may be PII
        f"{where}: rows still break the contract after {_MAX_PASSES} passes; the contract "
        f"may contradict itself: {'; '.join(rules[:8])}"
    )


MAX_RULE_CHARS = 60


def _short(check: str) -> str:
    """A check's name as a rule; a long list of allowed values is summarised (the
    contract holds the list): ``isin(12 values)``."""
    if len(check) <= MAX_RULE_CHARS or not check.startswith("isin("):
        return check
    return f"isin({check.count(',') + 1} values)"


def _precoerce(pending: pd.DataFrame, schema: pa.DataFrameSchema) -> dict[int, str]:
    """Coercions pandera does not judge row by row, done here (in place, on ``pending``).

    A text timestamp in another layout (a space for the T, fractions of a second) makes
    pandera fail the whole column, so times are parsed as ISO 8601 here, and what does
    not parse is that row's fault. A fraction where an integer belongs (``0.5`` as a
    label) would be silently truncated by the cast, so it is refused here. Returns the
    position -> rule of every row that cannot be coerced.
    """
    broken: dict[int, str] = {}
    for name, column in schema.columns.items():
        if name not in pending.columns or not column.coerce:
            continue
        values, target = pending[name], column.dtype.type
        rule = f"{name}: coerce_dtype('{column.dtype}')"
        if isinstance(target, pd.DatetimeTZDtype) and not isinstance(
            values.dtype, pd.DatetimeTZDtype
        ):
            parsed = pd.to_datetime(values, utc=True, format="ISO8601", errors="coerce")
            bad = parsed.isna() & values.notna()
            pending[name] = parsed
        elif pd.api.types.is_integer_dtype(target) and not pd.api.types.is_integer_dtype(
            values.dtype
        ):
            numbers = pd.to_numeric(values, errors="coerce")
            bad = numbers.notna() & (numbers != np.floor(numbers))
        else:
            continue
        broken.update(dict.fromkeys(values.index[bad.to_numpy()], rule))
    return broken


def arrow_schema(schema: pa.DataFrameSchema) -> pyarrow.Schema:
    """The Arrow types a contract's columns have once coerced."""
    import pyarrow

    fields = []
    for name, column in schema.columns.items():
        dtype = column.dtype.type  # the pandas/numpy dtype the column is coerced to
        if isinstance(dtype, pd.DatetimeTZDtype):
            arrow = pyarrow.timestamp(dtype.unit, tz=str(dtype.tz))
        elif is_text(column):
            arrow = pyarrow.string()
        else:
            arrow = pyarrow.from_numpy_dtype(np.dtype(str(column.dtype)))
        fields.append((name, arrow))
    return pyarrow.schema(fields)


def mismatch(found: Iterable[str], expected: Iterable[str], what: str) -> str | None:
    """``missing <what> 'a'; unexpected <what> 'b'`` (a repeat counts too), or None.

    ``found`` is untrusted: a name is echoed only where :func:`shown_name` allows."""
    found, expected = list(found), list(expected)
    missing = [c for c in expected if c not in found]
    extra = sorted({c for c in found if c not in expected or found.count(c) > 1})
    parts = [f"missing {what} {c!r}" for c in missing]  # the contract's own names
    parts += [
        f"{'repeated' if c in expected else 'unexpected'} {what} {shown_name(c)}" for c in extra
    ]
    return "; ".join(parts) or None


def is_text(column: pa.Column) -> bool:
    return pd.api.types.is_string_dtype(column.dtype.type) or str(column.dtype) == "str"


def _describe_table_errors(cases: pd.DataFrame) -> str:
    wording = {
        "column_in_schema": "unexpected column",
        "column_in_dataframe": "missing column",
    }
    parts = []
    for check, case in cases[["check", "failure_case"]].drop_duplicates().itertuples(index=False):
        parts.append(f"{wording.get(check, check)} {shown_name(case)}")
    shown = "; ".join(parts[:8]) + (f"; and {len(parts) - 8} more" if len(parts) > 8 else "")
    return f"{shown} (fix the file or the workload's contract)"
