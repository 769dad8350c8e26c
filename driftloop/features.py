"""From validated rows to the float32 matrix the tree models see.

Numeric features are cast to float32, bools to 0/1, categorical features to the index
of their level (levels: the spec's ``allowed`` list, else the sorted training values);
an unseen level becomes NaN, which the trees treat as missing. The ONNX export builds
the same encoding into the graph (``tasks.export``), so the artifact scores raw rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from driftloop.spec import DatasetSpec


@dataclass(frozen=True)
class FeatureEncoding:
    features: tuple[str, ...]
    categories: dict[str, tuple[str, ...]]

    def matrix(self, frame: pl.DataFrame) -> np.ndarray:
        """The rows as one contiguous float32 matrix in C order (row-major: what XGBoost
        and LightGBM read without a copy), built in one pass by polars."""
        columns = []
        for name in self.features:
            if name in self.categories:
                levels = pl.Series(self.categories[name], dtype=pl.String)
                codes = pl.col(name).cast(pl.String).replace_strict(
                    levels, pl.int_range(0, len(levels), eager=True), default=None, return_dtype=pl.Float32
                )
                columns.append(codes.fill_null(float("nan")))
            else:
                columns.append(pl.col(name).cast(pl.Float32).fill_null(float("nan")))
        x = frame.select(columns).to_numpy(order="c") if columns else np.empty((frame.height, 0))
        return np.ascontiguousarray(x, dtype=np.float32)

    def to_dict(self) -> dict[str, object]:
        return {"features": list(self.features), "categories": {k: list(v) for k, v in self.categories.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> FeatureEncoding:
        return cls(tuple(data["features"]), {k: tuple(v) for k, v in data["categories"].items()})  # type: ignore[union-attr]


def fit_encoding(spec: DatasetSpec, train: pl.DataFrame) -> FeatureEncoding:
    categories: dict[str, tuple[str, ...]] = {}
    for name in spec.feature_columns:
        col_spec = spec.column_spec(name)
        if not col_spec.is_categorical:
            continue
        if col_spec.allowed is not None:
            categories[name] = tuple(str(v) for v in col_spec.allowed)
        else:
            categories[name] = tuple(sorted(train[name].drop_nulls().cast(pl.String).unique().to_list()))
    return FeatureEncoding(tuple(spec.feature_columns), categories)


def target_vector(spec: DatasetSpec, frame: pl.DataFrame, classes: tuple[str, ...] | None = None) -> np.ndarray:
    """Labels as the models want them: 0..k-1 for classification, float for regression."""
    y = frame[spec.target]
    if spec.task == "regression":
        return y.cast(pl.Float64).to_numpy()
    if spec.task == "binary_classification" and classes is None:
        return y.cast(pl.Int32).to_numpy()
    assert classes is not None
    return y.cast(pl.String).replace_strict(list(classes), list(range(len(classes))), return_dtype=pl.Int32).to_numpy()


def class_labels(spec: DatasetSpec, frame: pl.DataFrame) -> tuple[str, ...] | None:
    """The ordered class labels of a multiclass target (None for binary and regression)."""
    if spec.task != "multiclass_classification":
        return None
    allowed = spec.column_spec(spec.target).allowed
    if allowed is not None:
        return tuple(str(v) for v in allowed)
    return tuple(sorted(frame[spec.target].cast(pl.String).unique().drop_nulls().to_list()))
