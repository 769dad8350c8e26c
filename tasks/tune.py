"""Hyper-parameter tuning with Optuna for XGBoost and LightGBM, and the final fit: the
public entry (``tune``) and the Prefect tasks the training flow calls.

Where the parts live: search spaces in ``tasks.search_space``, fitting one booster in
``tasks.fit``, the study and the claim protocol for several workers in ``tasks.study``,
the worker processes (local or on Dask) in ``tasks.tune_workers``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna
from prefect import task
from prefect.cache_policies import NONE

from driftloop.errors import DriftloopError
from driftloop.tasks.fit import FittedModel, TrainingData, fit_model, prepare_training_data
from driftloop.tasks.search_space import Algorithm, search_space
from driftloop.tasks.study import TuneResult, open_study
from driftloop.tasks.tune_workers import tune_in_workers


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
              timeout: float | None, seed: int, device: str, workers: int = 1, dask_address: str | None = None,
              data_uri: str | None = None) -> TuneResult:
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    artifact_id = create_progress_artifact(0.0, description=f"Optuna trials for {study_name}")
    last = -1

    def on_trial(done: int, total: int) -> None:
        nonlocal last
        if done != last:  # the multi-worker wait polls every second
            last = done
            update_progress_artifact(artifact_id, progress=100.0 * done / total)

    if workers == 1:
        return tune(algorithm, data, study_name=study_name, storage=storage, n_trials=n_trials,
                    timeout=timeout, seed=seed, device=device, on_trial=on_trial)
    return tune_in_workers(algorithm, data, study_name=study_name, storage=storage, n_trials=n_trials,
                           workers=workers, data_uri=data_uri, dask_address=dask_address, timeout=timeout,
                           seed=seed, device=device, on_trial=on_trial)


@task(name="fit", cache_policy=NONE, task_run_name="fit-{algorithm}")
def fit_task(algorithm: Algorithm, params: dict[str, Any], data: TrainingData, seed: int, device: str) -> FittedModel:
    return fit_model(algorithm, params, data, seed=seed, device=device)


@task(name="prepare-training-data", cache_policy=NONE)
def prepare_task(spec: Any, train: Any, valid: Any) -> tuple[TrainingData, Any, tuple[str, ...] | None]:
    return prepare_training_data(spec, train, valid)
