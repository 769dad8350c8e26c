"""Fitting one booster: the encoded training matrices, the fixed parameters per
algorithm and task, early stopping on the validation set, pruning callbacks for a trial,
and LightGBM's float32-exact thresholds (so the ONNX export makes the same decisions).

The objective is the validation loss (log loss, multiclass log loss or RMSE) at the best
round.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna

from driftloop.errors import DriftloopError
from driftloop.spec import TaskKind
from driftloop.tasks.search_space import Algorithm

MAX_ROUNDS = 600
EARLY_STOPPING = 30
# Each pruning report is a write to the study's database; one every few rounds keeps a
# SQL-backed study from spending more time writing than training.
REPORT_EVERY = 10


@dataclass
class TrainingData:
    """Encoded float32 matrices and 0..k-1 (or float) targets."""

    task: TaskKind
    x_train: np.ndarray
    y_train: np.ndarray
    x_valid: np.ndarray
    y_valid: np.ndarray
    n_classes: int = 2


@dataclass
class FittedModel:
    algorithm: Algorithm
    booster: Any  # xgboost.Booster or lightgbm.Booster, cut at its best round
    params: dict[str, Any]
    best_iteration: int
    valid_loss: float


def check_device(device: str) -> None:
    """Fail before any training when CUDA is asked for and none is visible."""
    if device == "cpu":
        return
    if device != "cuda":
        raise DriftloopError(f"device {device!r} is not supported; use cpu or cuda")
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        raise DriftloopError(
            "device is cuda but no NVIDIA driver (libcuda.so.1) is present on this machine; "
            "set DRIFTLOOP_DEVICE=cpu or run on the gpu work pool"
        ) from None
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        raise DriftloopError(
            "device is cuda but no CUDA device is visible; check CUDA_VISIBLE_DEVICES or set DRIFTLOOP_DEVICE=cpu"
        )


# Objective and validation metric, per algorithm and task.
_OBJECTIVES: dict[str, dict[str, dict[str, str]]] = {
    "xgboost": {
        "binary_classification": {"objective": "binary:logistic", "eval_metric": "logloss"},
        "multiclass_classification": {"objective": "multi:softprob", "eval_metric": "mlogloss"},
        "regression": {"objective": "reg:squarederror", "eval_metric": "rmse"},
    },
    "lightgbm": {
        "binary_classification": {"objective": "binary", "metric": "binary_logloss"},
        "multiclass_classification": {"objective": "multiclass", "metric": "multi_logloss"},
        "regression": {"objective": "regression", "metric": "rmse"},
    },
}


def _objective(algorithm: Algorithm, data: TrainingData) -> dict[str, Any]:
    objective: dict[str, Any] = dict(_OBJECTIVES[algorithm][data.task])
    if data.task == "multiclass_classification":
        objective["num_class"] = data.n_classes
    return objective


def _xgb_fixed(data: TrainingData, seed: int, device: str, threads: int | None) -> dict[str, Any]:
    fixed: dict[str, Any] = {"tree_method": "hist", "device": device, "seed": seed, "verbosity": 0}
    if threads:
        fixed["nthread"] = threads
    return fixed | _objective("xgboost", data)


def _lgb_fixed(data: TrainingData, seed: int, device: str, threads: int | None) -> dict[str, Any]:
    fixed: dict[str, Any] = {
        "seed": seed, "deterministic": True, "force_row_wise": True, "verbose": -1, "bagging_freq": 1,
        "device_type": "gpu" if device == "cuda" else "cpu",
    }
    if threads:
        fixed["num_threads"] = threads
    return fixed | _objective("lightgbm", data)


def fit_model(
    algorithm: Algorithm, params: dict[str, Any], data: TrainingData, *, seed: int = 0,
    device: str = "cpu", threads: int | None = None, trial: optuna.Trial | None = None,
) -> FittedModel:
    """Train with early stopping on the validation set; the booster is cut at its best round."""
    if algorithm == "xgboost":
        import xgboost as xgb

        full = _xgb_fixed(data, seed, device, threads) | params
        dtrain = xgb.DMatrix(data.x_train, label=data.y_train)
        dvalid = xgb.DMatrix(data.x_valid, label=data.y_valid)
        callbacks = []
        if trial is not None:
            callbacks.append(_xgboost_pruning(trial, f"valid-{full['eval_metric']}"))
        booster = xgb.train(
            full, dtrain, num_boost_round=MAX_ROUNDS, evals=[(dvalid, "valid")],
            early_stopping_rounds=EARLY_STOPPING, verbose_eval=False, callbacks=callbacks,
        )
        best = int(booster.best_iteration)
        loss = float(booster.best_score)
        booster = booster[: best + 1]
        return FittedModel(algorithm, booster, full, best + 1, loss)

    import lightgbm as lgb

    full = _lgb_fixed(data, seed, device, threads) | params
    dtrain = lgb.Dataset(data.x_train, label=data.y_train, free_raw_data=False)
    dvalid = lgb.Dataset(data.x_valid, label=data.y_valid, reference=dtrain, free_raw_data=False)
    callbacks = [lgb.early_stopping(EARLY_STOPPING, verbose=False)]
    if trial is not None:
        callbacks.append(_lightgbm_pruning(trial, full["metric"]))
    booster = lgb.train(
        full, dtrain, num_boost_round=MAX_ROUNDS, valid_sets=[dvalid], valid_names=["valid"], callbacks=callbacks,
    )
    best = int(booster.best_iteration) or booster.current_iteration()
    loss = float(booster.best_score["valid"][full["metric"]])
    booster = round_lightgbm_thresholds(booster.model_to_string(num_iteration=best))
    return FittedModel(algorithm, booster, full, best, loss)


def round_lightgbm_thresholds(model_text: str) -> Any:
    """A LightGBM booster with every split threshold rounded down to the largest float32
    not above it. LightGBM goes left when ``x <= t`` with ``t`` a double; ONNX (and the
    float32 features we train on) compare in float32. For float32 ``x``, ``x <= t`` and
    ``x <= f32_down(t)`` agree exactly: native predictions are unchanged, and the ONNX
    export (which stores float32 thresholds) makes the same decisions."""
    import lightgbm as lgb

    def round_line(match: re.Match[str]) -> str:
        values = np.array(match.group(2).split(), dtype=np.float64)
        as32 = values.astype(np.float32)
        above = as32.astype(np.float64) > values
        as32[above] = np.nextafter(as32[above], np.float32(-np.inf))
        return match.group(1) + " ".join(repr(float(v)) for v in as32.astype(np.float64))

    text = re.sub(r"^(threshold=)(.*)$", round_line, model_text, flags=re.MULTILINE)
    # tree_sizes holds each tree's byte length, which the edit changes; without the line
    # LightGBM parses the trees one after another.
    text = re.sub(r"^tree_sizes=.*\n", "", text, flags=re.MULTILINE)
    return lgb.Booster(model_str=text)




def _xgboost_pruning(trial: optuna.Trial, observation_key: str) -> Any:
    from optuna_integration import XGBoostPruningCallback

    class EveryFewRounds(XGBoostPruningCallback):
        def after_iteration(self, model: Any, epoch: int, evals_log: dict) -> bool:
            return super().after_iteration(model, epoch, evals_log) if epoch % REPORT_EVERY == 0 else False

    return EveryFewRounds(trial, observation_key)


def _lightgbm_pruning(trial: optuna.Trial, metric: str) -> Any:
    from optuna_integration import LightGBMPruningCallback

    class EveryFewRounds(LightGBMPruningCallback):
        def __call__(self, env: Any) -> None:
            if env.iteration % REPORT_EVERY == 0:
                super().__call__(env)

    return EveryFewRounds(trial, metric, valid_name="valid")

def prepare_training_data(spec: Any, train: Any, valid: Any) -> tuple[TrainingData, Any, tuple[str, ...] | None]:
    """Encoding fitted on the training part, matrices and targets for train and valid."""
    from driftloop.features import class_labels, fit_encoding, target_vector

    encoding = fit_encoding(spec, train)
    classes = class_labels(spec, train)
    data = TrainingData(
        task=spec.task,
        x_train=encoding.matrix(train), y_train=target_vector(spec, train, classes),
        x_valid=encoding.matrix(valid), y_valid=target_vector(spec, valid, classes),
        n_classes=len(classes) if classes else 2,
    )
    return data, encoding, classes
