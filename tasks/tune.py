"""Hyper-parameter tuning with Optuna for XGBoost and LightGBM, and the final fit.

Search spaces (every trial also early-stops on the validation set, at most
``MAX_ROUNDS`` rounds, patience ``EARLY_STOPPING``):

XGBoost (``hist``): max_depth 3-10, learning_rate 0.01-0.3 (log), subsample 0.5-1,
colsample_bytree 0.5-1, min_child_weight 1-20 (log), reg_lambda and reg_alpha 1e-3-10
(log).

LightGBM: num_leaves 15-255 (log), learning_rate 0.01-0.3 (log), feature_fraction 0.5-1,
bagging_fraction 0.5-1 (bagging every round), min_child_samples 5-100 (log), lambda_l1
and lambda_l2 1e-3-10 (log).

The objective is the validation loss (log loss, multiclass log loss or RMSE) at the best
round. A ``MedianPruner`` stops poor trials early, fed by optuna-integration's pruning
callbacks. Studies live in a SQL database (default: the registry's), so several workers
can tune one study: each opens it with ``load_if_exists`` and its own sampler seed.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import optuna
from prefect import task
from prefect.cache_policies import NONE

from driftloop.errors import DriftloopError
from driftloop.spec import TaskKind

logger = logging.getLogger(__name__)

Algorithm = Literal["xgboost", "lightgbm"]
ALGORITHMS: tuple[Algorithm, ...] = ("xgboost", "lightgbm")
MAX_ROUNDS = 600
EARLY_STOPPING = 30


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


@dataclass
class TuneResult:
    algorithm: Algorithm
    study_name: str
    best_params: dict[str, Any]
    best_value: float
    trials_run: int
    trials_total: int


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


def search_space(trial: optuna.Trial, algorithm: Algorithm) -> dict[str, Any]:
    if algorithm == "xgboost":
        return {
            "max_depth": trial.suggest_int("max_depth", 3, 10),
            "learning_rate": trial.suggest_float("learning_rate", 0.01, 0.3, log=True),
            "subsample": trial.suggest_float("subsample", 0.5, 1.0),
            "colsample_bytree": trial.suggest_float("colsample_bytree", 0.5, 1.0),
            "min_child_weight": trial.suggest_float("min_child_weight", 1.0, 20.0, log=True),
            "reg_lambda": trial.suggest_float("reg_lambda", 1e-3, 10.0, log=True),
            "reg_alpha": trial.suggest_float("reg_alpha", 1e-3, 10.0, log=True),
        }
    return {
        "num_leaves": trial.suggest_int("num_leaves", 15, 255, log=True),
        "learning_rate": trial.suggest_float("learning_rate", 0.01, 0.3, log=True),
        "feature_fraction": trial.suggest_float("feature_fraction", 0.5, 1.0),
        "bagging_fraction": trial.suggest_float("bagging_fraction", 0.5, 1.0),
        "min_child_samples": trial.suggest_int("min_child_samples", 5, 100, log=True),
        "lambda_l1": trial.suggest_float("lambda_l1", 1e-3, 10.0, log=True),
        "lambda_l2": trial.suggest_float("lambda_l2", 1e-3, 10.0, log=True),
    }


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


# Each pruning report is a write to the study's database; one every few rounds keeps a
# SQL-backed study from spending more time writing than training.
REPORT_EVERY = 10


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


def open_study(study_name: str, storage: str, *, seed: int, attempts: int = 5) -> optuna.Study:
    """Create or join the study. Workers starting together race to create Optuna's
    tables in a fresh database (on PostgreSQL the loser fails on an existing type, on
    SQLite on an existing table or a locked database): the loser retries and joins."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(attempts):
        try:
            return optuna.create_study(
                study_name=study_name,
                storage=storage,
                load_if_exists=True,
                direction="minimize",
                sampler=optuna.samplers.TPESampler(seed=seed),
                pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=20, interval_steps=REPORT_EVERY),
            )
        except (IntegrityError, ProgrammingError, OperationalError, optuna.exceptions.DuplicatedStudyError) as exc:
            lost_race = not isinstance(exc, OperationalError) or any(
                words in str(exc) for words in ("already exists", "database is locked"))
            if not lost_race or attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def tune(
    algorithm: Algorithm, data: TrainingData, *, study_name: str, storage: str, n_trials: int,
    timeout: float | None = None, seed: int = 0, device: str = "cpu", threads: int | None = None,
    on_trial: Callable[[int, int], None] | None = None,
) -> TuneResult:
    """Run ``n_trials`` more trials of the study (fewer if ``timeout`` seconds pass)."""
    if n_trials < 1:
        raise DriftloopError(f"trials must be at least 1, got {n_trials}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(study_name, storage, seed=seed)
    done = 0

    def objective(trial: optuna.Trial) -> float:
        fitted = fit_model(algorithm, search_space(trial, algorithm), data, seed=seed, device=device, threads=threads, trial=trial)
        trial.set_user_attr("best_iteration", fitted.best_iteration)
        return fitted.valid_loss

    def progress(_study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
        nonlocal done
        done += 1
        if on_trial is not None:
            on_trial(done, n_trials)

    study.optimize(objective, n_trials=n_trials, timeout=timeout, callbacks=[progress], gc_after_trial=False)
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        raise DriftloopError(f"study {study_name}: no trial completed (all pruned or failed); raise --trials")
    best = study.best_trial
    return TuneResult(algorithm, study_name, dict(best.params), float(best.value), done, len(study.trials))


@task(name="tune", cache_policy=NONE, task_run_name="tune-{algorithm}")
def tune_task(algorithm: Algorithm, data: TrainingData, study_name: str, storage: str, n_trials: int,
              timeout: float | None, seed: int, device: str) -> TuneResult:
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    artifact_id = create_progress_artifact(0.0, description=f"Optuna trials for {study_name}")

    def on_trial(done: int, total: int) -> None:
        update_progress_artifact(artifact_id, progress=100.0 * done / total)

    return tune(algorithm, data, study_name=study_name, storage=storage, n_trials=n_trials,
                timeout=timeout, seed=seed, device=device, on_trial=on_trial)


@task(name="fit", cache_policy=NONE, task_run_name="fit-{algorithm}")
def fit_task(algorithm: Algorithm, params: dict[str, Any], data: TrainingData, seed: int, device: str) -> FittedModel:
    return fit_model(algorithm, params, data, seed=seed, device=device)


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


@task(name="prepare-training-data", cache_policy=NONE)
def prepare_task(spec: Any, train: Any, valid: Any) -> tuple[TrainingData, Any, tuple[str, ...] | None]:
    return prepare_training_data(spec, train, valid)
