"""The workload registry: name -> workload. Platform code looks workloads up here."""

from __future__ import annotations

from app.errors import UnknownWorkload
from app.workloads.base import TIERS, Workload
from app.workloads.digits import Digits

_WORKLOADS: dict[str, type[Workload]] = {cls.name: cls for cls in (Digits,)}


def workload_names() -> list[str]:
    return sorted(_WORKLOADS)


def get_workload(name: str) -> Workload:
    """The workload called ``name``, or an error that lists the known ones."""
    try:
        return _WORKLOADS[name]()
    except KeyError:
        raise UnknownWorkload(
            f"unknown workload {name!r}: use one of {', '.join(workload_names())}"
        ) from None


__all__ = ["TIERS", "Workload", "get_workload", "workload_names"]
