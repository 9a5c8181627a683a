"""The handwritten digits that scikit-learn ships: 8x8 images, pixel values 0-16."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from app.workloads.base import LayerSpec, Workload

if TYPE_CHECKING:
    import pandera.pandas as pa

SIDE = 8
PIXELS = tuple(f"px_{i:02d}" for i in range(SIDE * SIDE))
MAX_PIXEL = 16


class Digits(Workload):
    name = "digits"
    description = "8x8 handwritten digits (scikit-learn), 10 classes"
    id_column = "id"
    label_column = "label"
    feature_columns = PIXELS
    input_name = "pixels"
    num_classes = 10

    def contract(self) -> pa.DataFrameSchema:
        import pandera.pandas as pa

        pixel = pa.Column(
            float,
            checks=[
                pa.Check.in_range(0, MAX_PIXEL),
                pa.Check(lambda s: np.floor(s) == s, element_wise=False, name="is_integer"),
            ],
            nullable=False,
            coerce=True,
        )
        return pa.DataFrameSchema(
            {
                self.id_column: self.id_contract(),
                **{px: pixel for px in PIXELS},
                self.label_column: pa.Column(
                    int, pa.Check.isin(list(range(self.num_classes))), nullable=False, coerce=True
                ),
            },
            strict=True,
            ordered=False,
            name="digits",
        )

    def builtin_source(self) -> pd.DataFrame:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        frame = pd.DataFrame(bunch.data.astype(np.int64), columns=list(PIXELS))
        frame.insert(0, self.id_column, np.arange(len(frame), dtype=np.int64))
        frame[self.label_column] = bunch.target.astype(np.int64)
        return frame

    def features(self, frame: pd.DataFrame | np.ndarray) -> np.ndarray:
        return super().features(frame) / np.float32(MAX_PIXEL)

    def layers(self, tier: str) -> list[LayerSpec]:
        from torch import nn

        if self.check_tier(tier) == "cheap":
            return [
                LayerSpec(nn.Linear, (len(PIXELS), 64)),
                LayerSpec(nn.ReLU),
                LayerSpec(nn.Linear, (64, self.num_classes)),
            ]
        return [
            LayerSpec(nn.Unflatten, (1, (1, SIDE, SIDE))),
            LayerSpec(nn.Conv2d, (1, 32, 3, 1, 1)),
            LayerSpec(nn.ReLU),
            LayerSpec(nn.Conv2d, (32, 64, 3, 1, 1)),
            LayerSpec(nn.ReLU),
            LayerSpec(nn.MaxPool2d, (2,)),
            LayerSpec(nn.Flatten),
            LayerSpec(nn.Linear, (64 * (SIDE // 2) ** 2, 128)),
            LayerSpec(nn.ReLU),
            LayerSpec(nn.Dropout, (0.2,)),
            LayerSpec(nn.Linear, (128, self.num_classes)),
        ]
