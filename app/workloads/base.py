"""What a workload is: one task's raw schema, contract, features and model tiers.

The platform code never names a workload; it asks the registry in
``app.workloads`` for one and talks to it through this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

from app.errors import ConfigError

if TYPE_CHECKING:
    import pandera.pandas as pa
    from torch import nn

    from data.features import Preprocessor

TIERS: tuple[str, ...] = ("cheap", "expensive")


@dataclass(frozen=True)
class LayerSpec:
    """One layer, not yet built: its class and constructor arguments."""

    cls: type
    args: tuple[Any, ...] = ()

    def build(self) -> nn.Module:
        return self.cls(*self.args)


class Workload(ABC):
    """One task. Subclasses fill in the class attributes and the abstract methods."""

    name: ClassVar[str]
    description: ClassVar[str]
    id_column: ClassVar[str]
    label_column: ClassVar[str]
    feature_columns: ClassVar[tuple[str, ...]]
    num_classes: ClassVar[int]
    input_name: ClassVar[str] = "features"  # the input tensor's name in the OIP v2 API
    # PII: identifier columns get keyed pseudonyms, free-text columns get redacted.
    pii_identifiers: ClassVar[tuple[str, ...]] = ()
    pii_text: ClassVar[tuple[str, ...]] = ()
    # A fitted workload's features need the preprocessor fitted on its training split:
    # derive() gives these columns, the Preprocessor scales and one-hot encodes them.
    numeric_features: ClassVar[tuple[str, ...]] = ()
    categorical_features: ClassVar[dict[str, int]] = {}  # feature -> largest vocabulary

    def __init__(self, preprocessor: Preprocessor | None = None) -> None:
        self.preprocessor = preprocessor

    @property
    def fitted(self) -> bool:
        """Whether features need a preprocessor fitted on the data (see data/features.py)."""
        return bool(self.numeric_features or self.categorical_features)

    @property
    def has_pii(self) -> bool:
        return bool(self.pii_identifiers or self.pii_text)

    @property
    def input_width(self) -> int:
        """Columns of the model's input matrix."""
        if self.fitted:
            return len(self.numeric_features) + sum(
                n + 1 for n in self.categorical_features.values()
            )
        return len(self.feature_columns)

    def derive(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Raw rows -> the columns the preprocessor transforms (fitted workloads only)."""
        raise NotImplementedError(f"{self.name} has no fitted features")

    @abstractmethod
    def contract(self) -> pa.DataFrameSchema:
        """The data contract of one raw row: types, nullability, ranges, allowed values."""

    def id_contract(self) -> pa.Column:
        """The id column's rules: a non-negative integer, unique across a whole ingest
        run (checked after the pass: data.pipeline.duplicates_moved)."""
        import pandera.pandas as pa

        return pa.Column(
            int,
            pa.Check.ge(0),
            nullable=False,
            unique=True,
            report_duplicates="exclude_first",
            coerce=True,
        )

    @abstractmethod
    def builtin_source(self) -> pd.DataFrame:
        """The raw data set that ships with the workload (used when no source is given)."""

    @abstractmethod
    def layers(self, tier: str) -> list[LayerSpec]:
        """The model of ``tier`` as a sequence of layers: float features (n, F) -> logits.

        A sequence, so that the same definition builds the plain model and a DeepSpeed
        pipeline split into stages.
        """

    def build_model(self, tier: str) -> nn.Module:
        """A fresh, untrained model of ``tier``."""
        from torch import nn

        return nn.Sequential(*(spec.build() for spec in self.layers(self.check_tier(tier))))

    def features(self, frame: pd.DataFrame | np.ndarray) -> np.ndarray:
        """Raw rows -> model inputs. Training and serving both call this, so they agree.

        A workload of plain numbers also takes the values themselves, (n, F) in
        feature-column order as a request carries them: no frame per request."""
        if isinstance(frame, np.ndarray) and not self.fitted:
            return np.asarray(frame, dtype=np.float32)
        if isinstance(frame, np.ndarray):
            frame = pd.DataFrame(frame, columns=list(self.feature_columns))
        if self.fitted:
            if self.preprocessor is None:
                raise ConfigError(
                    f"the {self.name} workload's features need the preprocessor fitted on "
                    "its dataset version: load the model (or dataset version) it belongs to"
                )
            return self.preprocessor.transform(self.derive(frame))
        return frame.loc[:, list(self.feature_columns)].to_numpy(dtype=np.float32)

    def instance_contract(self) -> pa.DataFrameSchema:
        """The contract restricted to what a prediction request carries (the features)."""
        contract = self.contract()
        return contract.remove_columns(
            [c for c in contract.columns if c not in self.feature_columns]
        )

    def check_tier(self, tier: str) -> str:
        if tier not in TIERS:
            raise ConfigError(f"unknown tier {tier!r}: use one of {', '.join(TIERS)}")
        return tier

    def registered_model_name(self, tier: str) -> str:
        """The registry name of a tier's models: ``<workload>-<tier>``."""
        return f"{self.name}-{self.check_tier(tier)}"
