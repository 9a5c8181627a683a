"""The cascade decision, free of Ray: the cheap tier answers when it is sure enough,
the expensive tier answers the rest."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TierAnswer:
    """Class probabilities (n, C) from one tier, and the model version that made them."""

    probs: np.ndarray
    version: str


TierFn = Callable[[np.ndarray], Awaitable[TierAnswer]]


@dataclass(frozen=True)
class Prediction:
    label: int
    confidence: float
    tier: str
    model_version: str


class Cascade:
    def __init__(self, cheap: TierFn, expensive: TierFn, threshold: float) -> None:
        self.cheap = cheap
        self.expensive = expensive
        self.threshold = threshold

    async def predict(self, instances: np.ndarray) -> list[Prediction]:
        """One prediction per instance; only the unsure ones reach the expensive tier."""
        cheap = await self.cheap(instances)
        confidence = cheap.probs.max(axis=1)
        escalate = np.flatnonzero(confidence < self.threshold)
        answers = [
            Prediction(int(p.argmax()), float(p.max()), "cheap", cheap.version) for p in cheap.probs
        ]
        if escalate.size:
            expensive = await self.expensive(instances[escalate])
            for i, p in zip(escalate, expensive.probs, strict=True):
                answers[i] = Prediction(
                    int(p.argmax()), float(p.max()), "expensive", expensive.version
                )
        return answers
