"""A calibrated cascade: which cheap and expensive versions pair up, and the threshold.

Calibration writes it, the registry stores it as a version of ``<workload>-cascade``,
serving reads it. Nothing about the pair is hard-coded in serving.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from app.registry import ModelRef, Registry

SPEC_FILE = "cascade.json"
ALWAYS_ESCALATE = 1.01  # a threshold above any probability: every request escalates


class SplitResult(BaseModel):
    cascade_accuracy: float
    escalated_share: float
    cheap_accuracy: float
    expensive_accuracy: float


class CascadeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    workload: str
    cheap_version: str
    expensive_version: str
    threshold: float = Field(
        ge=0, le=ALWAYS_ESCALATE, description="The cheap tier answers when its confidence >= this."
    )
    margin: float = Field(description="Allowed accuracy loss against the expensive tier alone.")
    val: SplitResult
    test: SplitResult

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / SPEC_FILE).write_text(self.model_dump_json(indent=2))
        return directory


def cascade_name(workload: str) -> str:
    return f"{workload}-cascade"


def load_cascade(registry: Registry, workload: str, ref: str) -> tuple[CascadeSpec, ModelRef]:
    """The cascade ``ref`` (alias or version) of ``workload``, or ModelNotFound with a fix."""
    from app.errors import ModelNotFound

    try:
        version = registry.resolve(cascade_name(workload), ref)
    except ModelNotFound:
        raise ModelNotFound(
            f"no calibrated cascade {ref!r} for {workload}: train both tiers, then run "
            f"`scaledl calibrate --workload {workload}`"
        ) from None
    spec = CascadeSpec.model_validate_json((registry.download(version) / SPEC_FILE).read_text())
    return spec, version


def promote_cascade(registry: Registry, spec: CascadeSpec, ref: ModelRef) -> None:
    """Serving follows the cascade's champion; its two tiers become their champions too."""
    registry.promote(ref.name, ref.version)
    registry.promote(f"{spec.workload}-cheap", spec.cheap_version)
    registry.promote(f"{spec.workload}-expensive", spec.expensive_version)
