"""What a rollout is asked to do and what it has done, as they cross boundaries: the
:class:`RolloutSpec` a CLI or HTTP request starts it with (validated, with errors that
name the flag to fix), and the :class:`RolloutState` and :class:`Event` s it persists and
reports. The machine that moves them is :mod:`actors.rollout`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from actors.gates import GateConfig, Judgement, Verdict
from app.errors import InvalidRequest

Status = Literal["shadowing", "stepping", "paused", "promoted", "rolled_back", "aborted"]
ACTIVE: frozenset[str] = frozenset({"shadowing", "stepping", "paused"})
SHADOW = -1  # the step index of the shadow phase
EventKind = Literal[
    "started", "shadow", "step", "passed", "extended", "paused", "resumed",
    "rolled_back", "promoted", "aborted",
]  # fmt: skip
DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?")
FLAGS = {  # spec field -> the CLI flag a person fixes
    "model": "<model>",
    "champion": "--champion",
    "challenger": "--challenger",
    "steps": "--steps",
    "hold_s": "--hold",
    "min_requests": "--min-requests",
    "shadow_first_s": "--shadow-first",
    "deadline_s": "--deadline",
}


class RolloutSpec(BaseModel):
    """What ``scaledl rollout start`` asks for. Versions are cascade version numbers:
    aliases are resolved before, so a later alias move cannot change what is rolled out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, description="The model (workload), e.g. digits.")
    champion: str = Field(description="The cascade version serving now (the champion).")
    challenger: str = Field(description="The cascade version to roll out.")
    steps: list[int] = Field(
        [5, 25, 50, 100],
        description="The challenger's percent of traffic at each step; strictly increasing, "
        "1..100, ending at 100 (a pass at 100 promotes).",
    )
    hold_s: float = Field(120.0, description="Seconds each step runs before it is judged.")
    min_requests: int = Field(
        500, description="Fewest requests (or shadow comparisons) per arm a verdict needs."
    )
    shadow_first_s: float = Field(
        0.0,
        description="Seconds of shadow traffic (champion serves all, the challenger gets "
        "copies) judged on label disagreement before any weight moves; 0: no shadow phase.",
    )
    deadline_s: float | None = Field(
        None,
        description="Seconds after a step's start by which it must have the data for a "
        "verdict; past it the step is extended once, then paused. Default: 3 x its hold.",
    )
    gates: GateConfig = Field(default_factory=GateConfig, description="Gate thresholds.")

    @field_validator("champion", "challenger", mode="before")
    @classmethod
    def _version(cls, v: object, info: ValidationInfo) -> str:
        text = str(v).strip()
        bare = text[1:] if text[:1] in ("v", "V") else text
        if not bare.isdigit():
            raise ValueError(
                f"{FLAGS[info.field_name]}: {text!r} is not a cascade version number "
                "(resolve an alias such as 'challenger' to its version first)"
            )
        return bare

    @field_validator("steps", mode="before")
    @classmethod
    def _steps_text(cls, v: object) -> object:
        if isinstance(v, str):  # "5,25,50,100", as the CLI takes it
            parts = [p.strip() for p in v.split(",") if p.strip()]
            bad = [p for p in parts if not p.isdigit()]
            if bad:
                raise ValueError(f"--steps: {bad[0]!r} is not a whole percent (e.g. 5,25,50,100)")
            return [int(p) for p in parts]
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: list[int]) -> list[int]:
        shown = ",".join(map(str, steps))
        if not steps:
            raise ValueError("--steps: give at least one step, ending at 100 (e.g. 5,25,50,100)")
        if any(not 1 <= w <= 100 for w in steps):
            raise ValueError(f"--steps: each step is a percent from 1 to 100, got {shown}")
        if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError(f"--steps must strictly increase (e.g. 5,25,50,100), got {shown}")
        if steps[-1] != 100:
            raise ValueError(f"--steps must end at 100 (a pass there promotes), got {shown}")
        return steps

    @field_validator("hold_s", "shadow_first_s", "deadline_s", mode="before")
    @classmethod
    def _duration(cls, v: object, info: ValidationInfo) -> object:
        """``90``, ``"90s"``, ``"2m"``, ``"1m30s"``, ``"1h"`` -> seconds, as the CLI writes them."""
        if not isinstance(v, str):
            return v
        text = v.strip().lower()
        match = DURATION.fullmatch(text)
        if not text or match is None:
            raise ValueError(
                f"{FLAGS[info.field_name]}: {v!r} is not a duration (write 90, 90s, 2m or 1h)"
            )
        h, m, sec = (float(g) if g else 0.0 for g in match.groups())
        return 3600 * h + 60 * m + sec

    @field_validator("hold_s")
    @classmethod
    def _hold(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"--hold must be more than 0 seconds, got {v:g}")
        return v

    @field_validator("shadow_first_s")
    @classmethod
    def _shadow_first(cls, v: float) -> float:
        if v < 0:
            raise ValueError(f"--shadow-first must be 0 (off) or more seconds, got {v:g}")
        return v

    @field_validator("min_requests")
    @classmethod
    def _min_requests(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"--min-requests must be at least 1, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RolloutSpec:
        if self.deadline_s is not None and self.deadline_s < max(self.hold_s, self.shadow_first_s):
            raise ValueError(
                f"--deadline ({self.deadline_s:g} s) must be at least --hold and --shadow-first"
            )
        if self.challenger == self.champion:
            raise ValueError(
                f"--challenger: v{self.challenger} is the champion already; "
                "name another version to roll out"
            )
        return self

    @classmethod
    def parse(cls, data: dict[str, Any]) -> RolloutSpec:
        """A spec from a request or the CLI: bad input is an InvalidRequest (400) whose
        message names each flag to fix."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            lines = []
            for err in exc.errors():
                msg = err["msg"].removeprefix("Value error, ")
                loc = [str(p) for p in err["loc"]]
                where = FLAGS.get(loc[0], ".".join(loc)) if loc else ""
                lines.append(msg if not where or msg.startswith(where) else f"{where}: {msg}")
            raise InvalidRequest("invalid rollout: " + "; ".join(lines)) from None

    def hold_of(self, step: int) -> float:
        return self.shadow_first_s if step == SHADOW else self.hold_s

    def deadline_of(self, step: int) -> float:
        return self.deadline_s if self.deadline_s is not None else 3 * self.hold_of(step)

    def weight_of(self, step: int) -> int:
        """The challenger's percent of routed traffic at a step (0 while shadowing)."""
        return 0 if step == SHADOW else self.steps[step]


class Event(BaseModel):
    """One decision of a rollout, with the figures and thresholds it was made on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    time: float
    model: str
    kind: EventKind
    step: int = Field(description="Step index; -1 is the shadow phase.")
    weight: int = Field(description="The challenger's percent of traffic at that step.")
    verdict: Verdict | None = None
    reason: str = ""
    judgement: Judgement | None = None


class RolloutState(BaseModel):
    """A rollout as persisted: enough to resume it at the same point after a restart."""

    model_config = ConfigDict(extra="forbid")

    spec: RolloutSpec
    status: Status
    step: int = Field(description="Current step index; -1 is the shadow phase.")
    step_started: float = Field(description="When the current step's hold and window began.")
    deadline: float = Field(description="When too little data makes the step inconclusive.")
    extended: bool = Field(False, description="Whether this step's deadline was extended.")
    reason: str = ""
    routes_text: str | None = Field(None, description="The routing table text last written.")
    baseline: tuple[float, float] | None = Field(
        None,
        description="The champion's window while it takes no traffic (the 100 % step): the "
        "step before's, or the hold before the rollout when 100 is the first step.",
    )
    judgements: dict[int, Judgement] = Field(default_factory=dict, description="Latest per step.")
    events: list[Event] = Field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE
