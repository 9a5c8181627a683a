"""Card transactions with a fraud label: tabular, categorical, full of PII.

The raw rows come from ``data.generate`` (or from files in the same shape); the PII
columns never reach the model: identifiers are pseudonymized and the note is redacted at
ingest, and the features use only amount, time of day, currency, merchant category,
device and country.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from app.workloads.base import LayerSpec, Workload

if TYPE_CHECKING:
    import pandera.pandas as pa

MAX_AMOUNT = 50_000.0
CARD = r"^\d{16}$"
EMAIL = r"^[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}$"
_OCTET = r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = rf"^({_OCTET}\.){{3}}{_OCTET}$"
COUNTRY = r"^[A-Z]{2}$"


class Transactions(Workload):
    name = "transactions"
    description = "card transactions (generated), fraud or not"
    id_column = "txn_id"
    label_column = "is_fraud"
    feature_columns = ("ts", "amount", "currency", "merchant_category", "country", "device")
    num_classes = 2
    pii_identifiers = ("card_number", "email", "ip_address")
    pii_text = ("note",)
    numeric_features = ("log_amount", "hour_sin", "hour_cos")
    categorical_features = {"currency": 6, "merchant_category": 12, "device": 5, "country": 24}

    def contract(self) -> pa.DataFrameSchema:
        import pandera.pandas as pa

        from data.generate import CURRENCIES, DEVICES, MERCHANT_CATEGORIES

        def text(*checks: pa.Check, nullable: bool = False) -> pa.Column:
            return pa.Column(str, list(checks), nullable=nullable, coerce=True)

        return pa.DataFrameSchema(
            {
                self.id_column: self.id_contract(),
                "ts": pa.Column(
                    pd.DatetimeTZDtype("us", "UTC"),
                    pa.Check.in_range(
                        pd.Timestamp("2000-01-01", tz="UTC"), pd.Timestamp("2100-01-01", tz="UTC")
                    ),
                    nullable=False,
                    coerce=True,
                ),
                "amount": pa.Column(
                    float,
                    [pa.Check.gt(0), pa.Check.le(MAX_AMOUNT)],
                    nullable=False,
                    coerce=True,
                ),
                "currency": text(pa.Check.isin(CURRENCIES)),
                "merchant_category": text(pa.Check.isin(MERCHANT_CATEGORIES)),
                "country": text(pa.Check.str_matches(COUNTRY)),
                "device": text(pa.Check.isin(DEVICES)),
                "card_number": text(pa.Check.str_matches(CARD)),
                "email": text(pa.Check.str_matches(EMAIL)),
                "ip_address": text(pa.Check.str_matches(IPV4)),
                "note": text(nullable=True),
                self.label_column: pa.Column(
                    int, pa.Check.isin([0, 1]), nullable=False, coerce=True
                ),
            },
            strict=True,
            ordered=False,
            name="transactions",
        )

    def builtin_source(self) -> pd.DataFrame:
        from data.generate import transactions_frame

        return transactions_frame(20_000, seed=0)

    def derive(self, frame: pd.DataFrame) -> pd.DataFrame:
        ts = pd.to_datetime(frame["ts"], utc=True)
        angle = (ts.dt.hour + ts.dt.minute / 60.0).to_numpy(dtype=np.float64) * (2 * np.pi / 24)
        derived = pd.DataFrame(
            {
                "log_amount": np.log1p(frame["amount"].to_numpy(dtype=np.float64)),
                "hour_sin": np.sin(angle),
                "hour_cos": np.cos(angle),
            },
            index=frame.index,
        )
        for column in self.categorical_features:
            derived[column] = frame[column].astype(object)
        return derived

    def layers(self, tier: str) -> list[LayerSpec]:
        from torch import nn

        width = self.input_width
        if self.check_tier(tier) == "cheap":
            return [
                LayerSpec(nn.Linear, (width, 16)),
                LayerSpec(nn.ReLU),
                LayerSpec(nn.Linear, (16, self.num_classes)),
            ]
        return [
            LayerSpec(nn.Linear, (width, 128)),
            LayerSpec(nn.ReLU),
            LayerSpec(nn.Linear, (128, 64)),
            LayerSpec(nn.ReLU),
            LayerSpec(nn.Dropout, (0.1,)),
            LayerSpec(nn.Linear, (64, self.num_classes)),
        ]
