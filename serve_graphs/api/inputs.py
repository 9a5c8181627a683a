"""The /v1 request body and what it becomes, free of Ray and of FastAPI's app: parsed in
one pass, shaped into the model's matrix (or frame of records), and checked against the
workload's input contract. Each bad instance is a 4xx that names it and says what to fix.
"""

from __future__ import annotations

from numbers import Real
from typing import Annotated, Any, TypeVar

import numpy as np
import pandas as pd
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema

from app.errors import DataContractError, InvalidRequest, PayloadTooLarge
from app.workloads import Workload
from data.validate import check_rows, mismatch
from serve_graphs.api.contract import CompiledContract, RecordFastPath
from serve_graphs.decide.cascade import Instances

# Instances are checked by to_matrix / to_frame rather than by a pydantic union, whose
# errors list every branch that failed; the schema still tells clients what to send.
Instance = Annotated[
    list[Any] | dict[str, Any],
    WithJsonSchema(
        {
            "anyOf": [
                {
                    "type": "array",
                    "items": {
                        "anyOf": [
                            {"type": "number"},
                            {"type": "array", "items": {"type": "number"}},
                        ]
                    },
                },
                {
                    "type": "object",
                    "description": "A record (workloads of records): feature -> value.",
                },
            ]
        }
    ),
]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instances: list[Instance] = Field(
        min_length=1,
        description="Raw inputs, one per prediction: a flat list of the model's features "
        "or a 2-D array of them (an 8x8 digits image, say), or for workloads of records "
        "(transactions) an object of feature -> value.",
        examples=[[[0, 0, 5, 13, 9, 1, 0, 0] * 8]],
    )


Body = TypeVar("Body", bound=BaseModel)


class InputCheck:
    """The workload's contract, applied to every request: the same rules as at ingest.

    Numbers (digits) go through the compiled contract, well under a millisecond.
    Records (transactions) that are plainly valid take pandera's checks without its
    per-call overhead (:class:`RecordFastPath`); any other goes through pandera itself,
    which also coerces types (a number as text) and words the error. Either way a
    broken instance is a 400 naming the instance and the rule, never the value (it may
    be PII).
    """

    def __init__(self, workload: Workload) -> None:
        self.contract = workload.instance_contract()
        self.compiled = None if workload.fitted else CompiledContract(self.contract)
        self.fast = RecordFastPath(self.contract)

    def __call__(self, instances: Instances) -> Instances:
        if isinstance(instances, pd.DataFrame):
            fast = self.fast(instances)
            if fast is not None:  # plainly valid: pandera's checks, without its overhead
                return fast
            try:
                valid, reasons = check_rows(instances, self.contract, where="request")
            except DataContractError:  # a value no rule could even be applied to
                raise InvalidRequest(
                    "instances hold values the input contract cannot check: send one "
                    "number or string per field"
                ) from None
            errors, checked = reasons.tolist(), valid
        else:
            errors, checked = self.compiled.row_errors(instances), instances
        broken = [(i, r) for i, r in enumerate(errors) if r is not None]
        if broken:
            shown = "; ".join(f"instance {i}: {r}" for i, r in broken[:5])
            raise InvalidRequest(f"instances break the input contract: {shown}")
        return checked


def parse_body(model: type[Body], raw: bytes) -> Body:
    """The request body as ``model``, parsed and checked in one pass by pydantic (a
    third of FastAPI's cost for a body parameter); a bad one is FastAPI's own 4xx."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body that :func:`parse_body` reads (the route has no body parameter)."""
    schema = model.model_json_schema()
    assert "$defs" not in schema, f"{model.__name__}: inline its nested models"
    content = {"application/json": {"schema": schema}}
    return {"requestBody": {"required": True, "content": content}}


def _check_count(n: int, max_instances: int) -> None:
    if n > max_instances:
        raise PayloadTooLarge(
            f"{n} instances in one request; the limit is {max_instances}: split the request"
        )


def to_frame(instances: list[Instance], workload: Workload, max_instances: int) -> pd.DataFrame:
    """Record instances -> a frame of the feature columns, or a 4xx naming what is wrong."""
    _check_count(len(instances), max_instances)
    columns = list(workload.feature_columns)
    for i, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise InvalidRequest(
                f"instance {i} is not an object: send one object of {', '.join(columns)} "
                "per instance"
            )
        problem = mismatch(instance, columns, "field")
        if problem:
            raise InvalidRequest(f"instance {i}: {problem}")
        for field, value in instance.items():
            if isinstance(value, list | dict | bool):
                raise InvalidRequest(
                    f"instance {i}: field {field!r} holds a {type(value).__name__}; send one "
                    "number or string"
                )
            if isinstance(value, int) and not _fits_float64(value):
                raise InvalidRequest(
                    f"instance {i}: field {field!r} holds a number too large for a float64"
                )
    return pd.DataFrame.from_records(instances, columns=columns)


def to_matrix(instances: list[Instance], n_features: int, max_instances: int) -> np.ndarray:
    """Instances -> a float matrix (n, F), or a 4xx naming what is wrong."""
    _check_count(len(instances), max_instances)
    rows = []
    for i, instance in enumerate(instances):
        if isinstance(instance, dict):
            raise InvalidRequest(
                f"instance {i} is an object; this model takes {n_features} numbers per "
                "instance (a flat list, or a 2-D array of them)"
            )
        values = _flatten(instance, i)
        try:
            row = np.asarray(values, dtype=np.float64)
        except OverflowError:  # a JSON integer past float64's range
            raise InvalidRequest(
                f"instance {i} holds a number too large for a float64: send values in range"
            ) from None
        if not np.isfinite(row).all():
            raise InvalidRequest(f"instance {i} holds NaN or infinity: send finite numbers")
        if row.size != n_features:
            raise InvalidRequest(
                f"instance {i} has {row.size} values; the model takes {n_features} "
                f"(a flat list, or a 2-D array of that many values)"
            )
        rows.append(row)
    return np.stack(rows)


def _flatten(instance: list[Any], i: int) -> list[float]:
    """Numbers of a flat or 2-D instance; rows of a 2-D one must be equally long."""
    if all(type(v) is float or type(v) is int for v in instance):  # JSON numbers, flat
        return instance
    nested = [isinstance(item, list) for item in instance]
    if any(nested):
        if not all(nested) or len({len(row) for row in instance}) > 1:
            raise InvalidRequest(f"instance {i} is a ragged array: its rows must be equally long")
        instance = [v for row in instance for v in row]
        if all(type(v) is float or type(v) is int for v in instance):  # JSON numbers, 2-D
            return instance
    return [_number(v, i) for v in instance]


def _number(value: Any, i: int) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InvalidRequest(f"instance {i} holds {value!r}, which is not a number")
    if not _fits_float64(value):
        raise InvalidRequest(f"instance {i} holds a number too large for a float64")
    return float(value)


def _fits_float64(value: Real) -> bool:
    """Whether ``value`` converts to a float64 (a JSON integer may be any size)."""
    try:
        float(value)
    except OverflowError:
        return False
    return True
