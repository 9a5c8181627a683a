"""The preprocessor fitted on the training split, and the column statistics."""

from __future__ import annotations

import numpy as np
import pandas as pd

from data.features import OOV, Preprocessor, column_stats, fit_preprocessor


def batches() -> list[pd.DataFrame]:
    rng = np.random.default_rng(0)
    return [
        pd.DataFrame(
            {
                "x": rng.normal(5.0, 2.0, 5000),
                "colour": rng.choice(["red", "red", "blue", "green", "teal"], 5000),
            }
        )
        for _ in range(4)
    ]


def test_fit_in_batches_standardises_and_keeps_the_most_frequent_values() -> None:
    prep = fit_preprocessor("w", iter(batches()), numeric=("x",), categorical={"colour": 2})
    mean, std = prep.numeric["x"]
    assert abs(mean - 5.0) < 0.05 and abs(std - 2.0) < 0.05
    assert prep.vocabularies["colour"][:2] == [OOV, "red"]  # most frequent first
    assert len(prep.vocabularies["colour"]) == 3 and prep.width == 1 + 3
    out = prep.transform(pd.DataFrame({"x": [5.0, 9.0], "colour": ["red", "purple"]}))
    assert out.dtype == np.float32 and out.shape == (2, 4)
    np.testing.assert_allclose(out[:, 0], [(5 - mean) / std, (9 - mean) / std], rtol=1e-5)
    assert out[0, 1:].tolist() == [0, 1, 0]  # red: its own slot
    assert out[1, 1:].tolist() == [1, 0, 0]  # never seen: the out-of-vocabulary slot


def test_the_width_is_fixed_by_the_workload_not_by_the_data() -> None:
    small = [pd.DataFrame({"x": [1.0, 2.0], "colour": ["red", "red"]})]
    prep = fit_preprocessor("w", iter(small), numeric=("x",), categorical={"colour": 5})
    assert prep.width == 1 + 6 and prep.sizes == {"colour": 6}
    assert Preprocessor.model_validate_json(prep.model_dump_json()) == prep  # the artifact


def test_column_stats_are_streamed_with_counts_quantiles_and_top_values() -> None:
    data = batches()
    data[0].loc[:9, "x"] = np.nan
    stats = column_stats(iter(data), numeric=["x"], categorical=["colour"], rows=20_000)
    x, colour = stats["x"], stats["colour"]
    assert (x.rows, x.nulls) == (20_000, 10)
    assert abs(x.quantiles["0.5"] - 5.0) < 0.1
    assert sum(x.histogram["counts"]) == 19_990 and len(x.histogram["edges"]) == 21
    assert colour.top_values["red"] > colour.top_values["blue"] and colour.distinct == 4
