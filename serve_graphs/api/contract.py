"""A workload's contract, checked at request speed (the ingress's records and tensors).

pandera (data/validate.py, ``check_rows``) is the reference: its fixed cost per call
(15-50 ms) is fine for a block of thousands of rows, not for one request. These run the
same rules without it, and any doubt goes back to pandera; parity with it is a unit test
(tests/unit/test_validate.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from data.validate import NOT_NULLABLE

if TYPE_CHECKING:
    import pandera.pandas as pa


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
