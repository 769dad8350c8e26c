"""The hyper-parameter search spaces Optuna samples, per algorithm.

Every trial also early-stops on the validation set (at most ``fit.MAX_ROUNDS`` rounds,
patience ``fit.EARLY_STOPPING``).

XGBoost (``hist``): max_depth 3-10, learning_rate 0.01-0.3 (log), subsample 0.5-1,
colsample_bytree 0.5-1, min_child_weight 1-20 (log), reg_lambda and reg_alpha 1e-3-10
(log).

LightGBM: num_leaves 15-255 (log), learning_rate 0.01-0.3 (log), feature_fraction 0.5-1,
bagging_fraction 0.5-1 (bagging every round), min_child_samples 5-100 (log), lambda_l1
and lambda_l2 1e-3-10 (log).
"""

from __future__ import annotations

from typing import Any, Literal

import optuna

Algorithm = Literal["xgboost", "lightgbm"]
ALGORITHMS: tuple[Algorithm, ...] = ("xgboost", "lightgbm")


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
