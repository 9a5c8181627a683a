"""The workload registry: name -> workload. Platform code looks workloads up here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.errors import UnknownWorkload
from app.workloads.base import TIERS, Workload
from app.workloads.digits import Digits
from app.workloads.transactions import Transactions

if TYPE_CHECKING:
    from data.features import Preprocessor

_WORKLOADS: dict[str, type[Workload]] = {cls.name: cls for cls in (Digits, Transactions)}


def workload_names() -> list[str]:
    return sorted(_WORKLOADS)


def get_workload(name: str, preprocessor: Preprocessor | dict | None = None) -> Workload:
    """The workload called ``name`` (with the fitted ``preprocessor`` its features need,
    if any), or an error that lists the known ones."""
    if isinstance(preprocessor, dict):
        from data.features import Preprocessor

        preprocessor = Preprocessor.model_validate(preprocessor)
    try:
        return _WORKLOADS[name](preprocessor)
    except KeyError:
        raise UnknownWorkload(
            f"unknown workload {name!r}: use one of {', '.join(workload_names())}"
        ) from None


__all__ = ["TIERS", "Workload", "get_workload", "workload_names"]
