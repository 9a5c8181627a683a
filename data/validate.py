"""Check rows against a workload's contract and say, per row, which rule it broke.

Pure functions over pandas batches: Ray Data calls them per block, the ingress per
request, tests directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from app.errors import DataContractError
from data.pii import shown_name

if TYPE_CHECKING:
    import pandera.pandas as pa
    import pyarrow

# A batch whose row errors hide other row errors (a failed type coercion makes the range
# checks of that column fail as a whole) is re-checked without the rows already caught.
_MAX_PASSES = 3


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
            cases = exc.failure_cases
        by_row = cases[cases["index"].notna()]
        if by_row.empty:
            raise DataContractError(f"{where}: {_describe_table_errors(cases)}")
        # A null in a text column also fails coercion; "not_nullable" is the real cause.
        by_row = by_row.sort_values("check", key=lambda c: c != "not_nullable", kind="stable")
        first = by_row.groupby("index", sort=False).first()
        checks = first["check"].map(_short)
        reasons.loc[first.index.astype(int)] = (first["column"] + ": " + checks).to_numpy()
        pending = pending.drop(index=first.index.astype(int))
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


NOT_NULLABLE = "not_nullable"  # pandera's name for a null in a non-nullable column


class CompiledContract:
    """A contract's row checks as vectorised numpy over a numeric matrix.

    The online path cannot afford pandera's per-call overhead (~50 ms for one digits
    row); this runs the same rules in well under a millisecond. Columns that share a
    check are checked together; built-in checks are translated from their statistics,
    custom checks call their own function on the flattened values. Parity with pandera
    is a unit test.
    """

    def __init__(self, schema: pa.DataFrameSchema) -> None:
        self.columns = list(schema.columns)
        groups: dict[tuple[str, ...], tuple[list[int], _Rule]] = {}
        for i, column in enumerate(schema.columns.values()):
            if not column.nullable:
                groups.setdefault((NOT_NULLABLE,), ([], _not_null))[0].append(i)
            for check in column.checks:
                label = check.error or check.name  # as pandera words it: in_range(0, 16)
                # A built-in check is its name and statistics (pandera makes a new
                # dispatcher per column); a custom one is its own function.
                fn = "" if check.name in BUILT_IN else str(id(check._check_fn))
                key = (label, repr(check.statistics), fn)
                if key not in groups:
                    groups[key] = ([], _compile(check))
                groups[key][0].append(i)
        every = list(range(len(self.columns)))
        self._groups = [
            (key[0], slice(None) if cols == every else np.asarray(cols), rule)
            for key, (cols, rule) in groups.items()
        ]

    def row_errors(self, values: np.ndarray) -> list[str | None]:
        """The first broken rule per row of ``values`` (n, len(columns)), None where valid.

        "First" as pandera reports it: a null before any check, then the leftmost broken
        column. ``values`` columns must be in the schema's column order.
        """
        if values.ndim != 2 or values.shape[1] != len(self.columns):
            raise ValueError(f"expected (n, {len(self.columns)}) values, got {values.shape}")
        verdicts = []
        for name, cols, rule in self._groups:
            block = values[:, cols]
            verdicts.append((name, cols, rule(block.ravel()).reshape(block.shape)))
        if all(ok.all() for _, _, ok in verdicts):  # the common case: nothing to word
            return [None] * len(values)
        first: dict[int, tuple[bool, int, int, str]] = {}  # row -> its first broken rule
        positions = np.arange(len(self.columns))
        for order, (name, cols, ok) in enumerate(verdicts):
            for row, col in zip(*np.nonzero(~ok), strict=True):
                column = int(positions[cols][col])
                found = (name != NOT_NULLABLE, column, order, f"{self.columns[column]}: {name}")
                first[row] = min(first.get(row, found), found)
        return [first[row][3] if row in first else None for row in range(len(values))]


_Rule = Callable[[np.ndarray], np.ndarray]
BUILT_IN = {
    "in_range",
    "greater_than_or_equal_to",
    "greater_than",
    "less_than_or_equal_to",
    "less_than",
    "equal_to",
    "isin",
}


def _not_null(v: np.ndarray) -> np.ndarray:
    return ~np.isnan(v)


def _compile(check: pa.Check) -> _Rule:
    s = check.statistics or {}
    bounds: dict[str, _Rule] = {
        "in_range": lambda v: (
            (v >= s["min_value"] if s.get("include_min", True) else v > s["min_value"])
            & (v <= s["max_value"] if s.get("include_max", True) else v < s["max_value"])
        ),
        "greater_than_or_equal_to": lambda v: v >= s["min_value"],
        "greater_than": lambda v: v > s["min_value"],
        "less_than_or_equal_to": lambda v: v <= s["max_value"],
        "less_than": lambda v: v < s["max_value"],
        "equal_to": lambda v: v == s["value"],
        "isin": lambda v: np.isin(v, list(s["allowed_values"])),
    }
    rule = bounds.get(check.name)
    if rule is None and check.element_wise:
        fn = check._check_fn
        rule = lambda v: np.fromiter((bool(fn(x)) for x in v), dtype=bool, count=len(v))  # noqa: E731
    elif rule is None:
        rule = _vectorised(check._check_fn)
    # Nulls are the nullable rule's business, as in pandera.
    return lambda v: np.isnan(v) | rule(v)


def _vectorised(fn: Callable[[pd.Series], Any]) -> _Rule:
    """A custom check written for a Series, on a flat array. Most are numpy arithmetic
    (``np.floor(s) == s``) and give the same verdict on the bare array, without the cost
    of a Series per call (half the check's time for one row). One that needs the Series
    (its methods, its index) fails on the array or answers in another form: it gets one,
    from then on without trying the array first."""
    needs_series = False

    def rule(v: np.ndarray) -> np.ndarray:
        nonlocal needs_series
        if not needs_series:
            try:
                ok = fn(v)
            except Exception:  # noqa: BLE001 - any failure: the check needs a Series
                ok = None
            if isinstance(ok, np.ndarray) and ok.dtype == bool and ok.shape == v.shape:
                return ok
            needs_series = True
        return np.asarray(fn(pd.Series(v)), dtype=bool)

    return rule


class RecordFastPath:
    """Records that surely keep the contract, coerced as pandera coerces them, without
    pandera's fixed cost per call (15-50 ms per request of records).

    A batch qualifies when every value already has its column's kind (text as ``str``,
    numbers as numbers, times as ISO-8601 text), nothing is null, and the contract's own
    pandera checks pass on the coerced columns. Any doubt returns None: the caller then
    asks pandera itself, whose verdict and wording are the reference. So a valid request
    takes the fast path and a broken one gets pandera's exact message; parity of the
    coerced frames is a unit test.
    """

    def __init__(self, schema: pa.DataFrameSchema) -> None:
        self.columns = list(schema.columns.items())

    def __call__(self, frame: pd.DataFrame) -> pd.DataFrame | None:
        coerced = {}
        for name, column in self.columns:
            values = _as_kind(frame[name], column.dtype.type)
            if values is None:
                return None
            try:
                values = column.coerce_dtype(values)
            except Exception:  # pandera would say why; ask it  # noqa: BLE001
                return None
            if not all(check(values).check_passed for check in column.checks):
                return None
            coerced[name] = values
        return pd.DataFrame(coerced, index=pd.RangeIndex(len(frame)))


def _as_kind(values: pd.Series, target: object) -> pd.Series | None:
    """``values`` parsed for the target dtype when they plainly have its kind, else None."""
    if values.isna().any():
        return None
    if isinstance(target, pd.DatetimeTZDtype):
        if not all(type(v) is str for v in values):
            return None
        parsed = pd.to_datetime(values, utc=True, format="ISO8601", errors="coerce")
        return None if parsed.isna().any() else parsed
    if pd.api.types.is_numeric_dtype(target):
        if pd.api.types.is_bool_dtype(values.dtype) or not pd.api.types.is_numeric_dtype(
            values.dtype
        ):
            return None
        if pd.api.types.is_integer_dtype(target) and (values != np.floor(values)).any():
            return None
        return values
    if target in (str, np.str_) or pd.api.types.is_string_dtype(target):
        return values if all(type(v) is str for v in values) else None
    return None
