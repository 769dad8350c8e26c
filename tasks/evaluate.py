"""Model quality on the holdout: overall and per segment.

Classification: ROC AUC, PR AUC (average precision), log loss, F1, accuracy; multiclass
reports macro and weighted variants. Regression: MAE, RMSE, R².
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl
from prefect import task
from prefect.cache_policies import NONE
from sklearn import metrics as skm

from driftloop.metrics import HIGHER_IS_BETTER, PRIMARY_METRIC  # noqa: F401  (re-exported)
from driftloop.spec import DatasetSpec, TaskKind


def predicted_labels(task: TaskKind, scores: np.ndarray) -> np.ndarray:
    """Binary: probability of class 1 >= 0.5; multiclass: the most probable class."""
    if task == "binary_classification":
        return (scores >= 0.5).astype(np.int32)
    return np.argmax(scores, axis=1).astype(np.int32)


def compute_metrics(task: TaskKind, y_true: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """``scores``: P(class 1) for binary, an (n, k) probability matrix for multiclass, the
    prediction for regression."""
    if task == "regression":
        return {
            "mae": float(skm.mean_absolute_error(y_true, scores)),
            "rmse": float(math.sqrt(skm.mean_squared_error(y_true, scores))),
            "r2": float(skm.r2_score(y_true, scores)) if len(y_true) > 1 else float("nan"),
        }
    labels = predicted_labels(task, scores)
    if task == "binary_classification":
        both = len(np.unique(y_true)) == 2
        return {
            "roc_auc": float(skm.roc_auc_score(y_true, scores)) if both else float("nan"),
            "pr_auc": float(skm.average_precision_score(y_true, scores)) if both else float("nan"),
            "log_loss": float(skm.log_loss(y_true, np.clip(scores, 1e-15, 1 - 1e-15), labels=[0, 1])),
            "f1": float(skm.f1_score(y_true, labels, zero_division=0)),
            "accuracy": float(skm.accuracy_score(y_true, labels)),
        }
    k = scores.shape[1]
    present = np.unique(y_true)
    result = {
        "log_loss": float(skm.log_loss(y_true, np.clip(scores, 1e-15, 1), labels=list(range(k)))),
        "f1_macro": float(skm.f1_score(y_true, labels, average="macro", zero_division=0)),
        "f1_weighted": float(skm.f1_score(y_true, labels, average="weighted", zero_division=0)),
        "accuracy": float(skm.accuracy_score(y_true, labels)),
    }
    if len(present) == k:
        result["roc_auc_macro"] = float(skm.roc_auc_score(y_true, scores, multi_class="ovr", average="macro"))
        result["roc_auc_weighted"] = float(skm.roc_auc_score(y_true, scores, multi_class="ovr", average="weighted"))
    return result


def segment_metrics(task: TaskKind, segments: pl.Series, y_true: np.ndarray, scores: np.ndarray) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    values = segments.cast(pl.String).fill_null("(null)").to_numpy()
    for value in sorted(set(values)):
        mask = values == value
        out[str(value)] = {"rows": int(mask.sum()), **compute_metrics(task, y_true[mask], scores[mask])}
    return out


def evaluate_scores(spec: DatasetSpec, frame: pl.DataFrame, scores: np.ndarray, classes: tuple[str, ...] | None) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Overall and per-segment metrics of ``scores`` against the frame's target."""
    from driftloop.features import target_vector

    y = target_vector(spec, frame, classes)
    overall = compute_metrics(spec.task, y, scores)
    segments = segment_metrics(spec.task, frame[spec.segment], y, scores) if spec.segment else {}
    return overall, segments


def score_with_onnx(onnx_bytes: bytes, frame: pl.DataFrame) -> np.ndarray:
    from driftloop.onnx_model import load_model, predict_scores

    return predict_scores(load_model(onnx_bytes), frame)


@task(name="evaluate", cache_policy=NONE)
def evaluate_task(spec: DatasetSpec, frame: pl.DataFrame, scores: np.ndarray, classes: tuple[str, ...] | None) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    return evaluate_scores(spec, frame, scores, classes)


def same_predictions(onnx_a: bytes, onnx_b: bytes, frame: pl.DataFrame) -> bool:
    """Whether two artifacts give exactly the same prediction for every row (a clone;
    the bytes of two exports of one model may differ)."""
    return onnx_a == onnx_b or bool(np.array_equal(score_with_onnx(onnx_a, frame), score_with_onnx(onnx_b, frame)))


@task(name="evaluate-champion", cache_policy=NONE)
def evaluate_champion_task(spec: DatasetSpec, onnx_bytes: bytes, frame: pl.DataFrame, classes: tuple[str, ...] | None) -> dict[str, float]:
    """The champion's metrics on the challenger's holdout (same rows, same metrics)."""
    return evaluate_scores(spec, frame, score_with_onnx(onnx_bytes, frame), classes)[0]


@task(name="compare-with-champion", cache_policy=NONE)
def same_predictions_task(champion_onnx: bytes, challenger_onnx: bytes, frame: pl.DataFrame) -> bool:
    return same_predictions(champion_onnx, challenger_onnx, frame)
