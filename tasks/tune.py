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

``tune_in_workers`` runs N worker processes (local, or tasks on a Dask cluster) on one
study in PostgreSQL, with heartbeats, retry of a dead worker's trial and an exact global
trial cap; ``python -m tasks.tune`` is one such worker (its job comes on stdin).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
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


def open_study(study_name: str, storage: str | optuna.storages.BaseStorage, *, seed: int,
               attempts: int = 5) -> optuna.Study:
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


# --- Several tuning workers on one study ------------------------------------------------

# Heartbeats every HEARTBEAT_S; a RUNNING trial without one for GRACE_S belongs to a dead
# worker: it is marked FAIL and queued again (same params) at most MAX_RETRY times.
HEARTBEAT_S = 10
GRACE_S = 60
MAX_RETRY = 3
# Namespace of the PostgreSQL advisory lock that serialises trial claims (per study id).
_CLAIM_LOCK = 0x64726C70
_HOLDS_SLOT = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
_SETTLED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def is_postgres_url(url: str) -> bool:
    return url.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


def tuning_storage(registry_url: str, optuna_storage: str | None, workers: int) -> str:
    """The study database. One worker: the registry's, as always. Several: PostgreSQL, the
    registry's when it is PostgreSQL, else ``DRIFTLOOP_OPTUNA_STORAGE``. SQLite is refused:
    concurrent writers lock its one file, and workers on other machines cannot reach it."""
    if workers < 1:
        raise DriftloopError(f"tuning workers must be at least 1, got {workers}")
    if workers == 1:
        return registry_url
    for url in (registry_url, optuna_storage):
        if url and is_postgres_url(url):
            return url
    from driftloop.redact import mask_uri

    got = mask_uri(optuna_storage) if optuna_storage else f"no DRIFTLOOP_OPTUNA_STORAGE, registry {mask_uri(registry_url)}"
    raise DriftloopError(
        f"{workers} tuning workers need an Optuna study database on PostgreSQL ({got}): set "
        "DRIFTLOOP_OPTUNA_STORAGE=postgresql+psycopg://user:pass@host/db, or use a PostgreSQL "
        "registry (DRIFTLOOP_REGISTRY_URL), or tune with one worker"
    )


_ARRAYS = ("x_train", "y_train", "x_valid", "y_valid")


def save_training_data(data: TrainingData, uri: str) -> str:
    """Write the matrices under ``uri`` (a directory path or fsspec URI) as ``.npy`` files:
    workers get this reference, never pickled arrays, and read exact float32 back."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(uri)
    fs.makedirs(base, exist_ok=True)
    for name in _ARRAYS:
        with fs.open(f"{base}/{name}.npy", "wb") as fh:
            np.save(fh, getattr(data, name), allow_pickle=False)
    fs.pipe_file(f"{base}/meta.json", json.dumps({"task": data.task, "n_classes": data.n_classes}).encode())
    return uri


def load_training_data(uri: str) -> TrainingData:
    import fsspec

    fs, base = fsspec.core.url_to_fs(uri)
    meta = json.loads(fs.cat_file(f"{base}/meta.json"))
    arrays = {}
    for name in _ARRAYS:
        with fs.open(f"{base}/{name}.npy", "rb") as fh:
            arrays[name] = np.load(fh, allow_pickle=False)
    return TrainingData(task=meta["task"], n_classes=meta["n_classes"], **arrays)


@dataclass
class TuningJob:
    """What one tuning worker runs; JSON on a worker's stdin (the storage URL may hold a
    password: never on a command line)."""

    algorithm: Algorithm
    study_name: str
    storage: str
    data_uri: str
    cap: int  # the study's COMPLETE + PRUNED trials this run stops at
    worker: int
    seed: int
    device: str = "cpu"
    threads: int | None = None
    timeout: float | None = None
    heartbeat_s: int = HEARTBEAT_S
    grace_s: int = GRACE_S
    max_retry: int = MAX_RETRY
    run: str = ""  # this tune_in_workers call: workers of one run wait for each other to start
    workers: int = 1
    start_wait_s: float = 120  # how long a worker waits for the others before it claims alone


@dataclass
class WorkerReport:
    worker: int
    seed: int
    pid: int
    trials_run: int


def heartbeat_storage(job: TuningJob) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with heartbeats and stale-trial retry, one connection per
    process (the heartbeat thread shares it: its writes are short). The coordinator has
    created the tables and checked their schema; the check opens a second connection
    inside its first, which a one-connection pool never grants (a 30 s wait, then an error)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            job.storage,
            engine_kwargs={"pool_size": 1, "max_overflow": 0},
            skip_compatibility_check=True,
            skip_table_creation=True,
            heartbeat_interval=job.heartbeat_s,
            grace_period=job.grace_s,
            # Optuna 4.9 renamed failed_trial_callback to this; same callback.
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=job.max_retry),
        )


def claim_trial(study: optuna.Study, storage: optuna.storages.RDBStorage, lock: Any, job: TuningJob) -> optuna.Trial | None:
    """Start the study's next trial, or None once every slot up to ``job.cap`` is settled.

    A slot is held by a COMPLETE, PRUNED or RUNNING trial. Counting and ``ask()`` happen
    under one PostgreSQL advisory lock, so two workers can never both take the last slot
    (``MaxTrialsCallback`` counts only after a trial ends: two workers can each start the
    last one). A dead worker's RUNNING trial turns FAIL once its heartbeat is stale, which
    frees its slot; its retry (WAITING, same params) takes it, as ``ask()`` starts waiting
    trials first. While all slots are held but some still run, wait: a running trial may
    belong to a dead worker and need a retry that only a live worker can run."""
    from sqlalchemy import text

    study_id = storage.get_study_id_from_name(job.study_name)
    while True:
        with lock.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:ns, :study)"), {"ns": _CLAIM_LOCK, "study": study_id})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                # Under the lock: the retry is queued before anyone counts the freed slot.
                optuna.storages.fail_stale_trials(study)
            _fail_orphans(conn, study, storage, job.grace_s)
            held = study.get_trials(deepcopy=False, states=_HOLDS_SLOT)
            if len(held) < job.cap:
                with warnings.catch_warnings():
                    # We run the heartbeat thread ourselves (study.optimize would, but it cannot
                    # claim a slot before a trial starts).
                    warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used")
                    trial = study.ask()
                # Also under the lock: see _fail_orphans.
                storage.record_heartbeat(trial._trial_id)
                return trial
            if not any(t.state == optuna.trial.TrialState.RUNNING for t in held):
                return None
        # Poll faster than the heartbeat: near the end a live worker's trial finishing is
        # the usual case, and this worker's exit waits for it.
        time.sleep(min(1.0, job.heartbeat_s))


def _fail_orphans(conn: Any, study: optuna.Study, storage: optuna.storages.RDBStorage, grace_s: int) -> None:
    """Optuna's stale check skips RUNNING trials that never had a heartbeat. Claimers ask
    and record the first heartbeat under the claim lock, which we now hold, so such a
    trial comes from a worker killed in between: fail and retry it like a stale one. The
    age check spares trials of a single-process run sharing the study name."""
    from datetime import datetime, timedelta

    from sqlalchemy import bindparam, text

    old = datetime.now() - timedelta(seconds=grace_s)
    running = {t._trial_id: t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
               if t.datetime_start is not None and t.datetime_start < old}
    if not running:
        return
    beating = {row[0] for row in conn.execute(
        text("SELECT trial_id FROM trial_heartbeats WHERE trial_id IN :ids").bindparams(bindparam("ids", expanding=True)),
        {"ids": list(running)},
    )}
    retry = storage.get_heartbeat_stale_trial_callback()
    for trial_id in set(running) - beating:
        try:
            failed = storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if failed and retry is not None:
            retry(study, storage.get_trial(trial_id))


def _import_trainer(algorithm: Algorithm) -> None:
    if algorithm == "xgboost":
        import xgboost  # noqa: F401
        from optuna_integration import XGBoostPruningCallback  # noqa: F401
    else:
        import lightgbm  # noqa: F401
        from optuna_integration import LightGBMPruningCallback  # noqa: F401


def _heartbeat(storage: optuna.storages.RDBStorage, trial_id: int, interval: int, stop: threading.Event) -> None:
    while not stop.wait(interval):
        try:
            storage.record_heartbeat(trial_id)
        except Exception:  # a missed beat is retried next interval; only GRACE_S of them fail the trial
            logger.warning("heartbeat for trial %s failed", trial_id, exc_info=True)


def run_tuning_worker(job: TuningJob) -> WorkerReport:
    """One tuning worker: claim, train, report, until the study's cap (or ``timeout``)."""
    from sqlalchemy import create_engine

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = heartbeat_storage(job)
    study = open_study(job.study_name, storage, seed=job.seed)
    data = load_training_data(job.data_uri)
    _import_trainer(job.algorithm)  # seconds of imports, not inside the first trial's time
    _wait_for_the_others(study, job)
    lock = create_engine(job.storage, pool_size=1, max_overflow=0)  # the claim lock's own connection
    started, ran = time.monotonic(), 0
    try:
        while job.timeout is None or time.monotonic() - started < job.timeout:
            trial = claim_trial(study, storage, lock, job)
            if trial is None:
                break
            _run_trial(study, storage, trial, job, data)
            ran += 1
    finally:
        lock.dispose()
        storage.remove_session()
        storage.engine.dispose()
    return WorkerReport(job.worker, job.seed, os.getpid(), ran)


def _wait_for_the_others(study: optuna.Study, job: TuningJob) -> None:
    """A start barrier: say this worker is ready, then wait until every worker of the run
    is (or ``start_wait_s`` has passed: a worker that never starts must not hold the others).
    Without it a worker whose process started first (on a loaded machine, by seconds)
    could claim every trial before the others had joined."""
    if job.workers <= 1 or not job.run:
        return
    study.set_user_attr(f"ready:{job.run}:{job.worker}", True)
    wanted = {f"ready:{job.run}:{i}" for i in range(job.workers)}
    deadline = time.monotonic() + job.start_wait_s
    while time.monotonic() < deadline:
        if wanted <= set(study.user_attrs):
            return
        time.sleep(0.2)
    logger.warning("tuning worker %d: not every worker of run %s started within %.0f s; claiming trials anyway",
                   job.worker, job.run, job.start_wait_s)


def _run_trial(study: optuna.Study, storage: optuna.storages.RDBStorage, trial: optuna.Trial, job: TuningJob,
               data: TrainingData) -> None:
    # Who ran it: a retry inherits the dead worker's attributes, so they are overwritten.
    trial.set_user_attr("worker", job.worker)
    trial.set_user_attr("worker_seed", job.seed)
    trial.set_user_attr("worker_pid", os.getpid())
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(storage, trial._trial_id, job.heartbeat_s, stop), daemon=True)
    beat.start()
    try:
        try:
            fitted = fit_model(job.algorithm, search_space(trial, job.algorithm), data, seed=job.seed,
                               device=job.device, threads=job.threads, trial=trial)
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return
        except BaseException:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        trial.set_user_attr("best_iteration", fitted.best_iteration)
        study.tell(trial, fitted.valid_loss)
    finally:
        stop.set()
        beat.join()


def settled_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=_SETTLED))


def tune_in_workers(
    algorithm: Algorithm, data: TrainingData, *, study_name: str, storage: str, n_trials: int, workers: int,
    data_uri: str | None = None, dask_address: str | None = None, timeout: float | None = None, seed: int = 0,
    device: str = "cpu", threads: int | None = None, on_trial: Callable[[int, int], None] | None = None,
    heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S,
) -> TuneResult:
    """Run ``n_trials`` more trials of the study, exactly, in ``workers`` processes that
    share it: local processes, or tasks on the Dask cluster at ``dask_address``. Worker
    ``i`` samples with seed ``seed + i``. The data goes to workers as ``.npy`` files under
    ``data_uri`` (default: a local temporary directory; give an object-store URI when the
    Dask workers are on other machines), removed afterwards. A killed worker costs its
    running trial, which another worker retries."""
    if n_trials < 1:
        raise DriftloopError(f"trials must be at least 1, got {n_trials}")
    tuning_storage(storage, None, workers)  # refuses anything but PostgreSQL
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Created here, once: workers starting together would otherwise race to create it.
    study = open_study(study_name, storage, seed=seed)
    already = settled_trials(study)
    if threads is None and dask_address is None:
        threads = max(1, (os.cpu_count() or 1) // workers)  # N local processes share the cores
    data_uri = save_training_data(data, data_uri or tempfile.mkdtemp(prefix="driftloop-tune-"))
    run = uuid.uuid4().hex[:12]
    jobs = [
        TuningJob(algorithm=algorithm, study_name=study_name, storage=storage, data_uri=data_uri,
                  cap=already + n_trials, worker=i, seed=seed + i, device=device, threads=threads,
                  timeout=timeout, heartbeat_s=heartbeat_s, grace_s=grace_s, run=run, workers=workers)
        for i in range(workers)
    ]

    def progress() -> None:
        if on_trial is not None:
            on_trial(min(settled_trials(study) - already, n_trials), n_trials)

    try:
        runner = _on_dask if dask_address else _in_local_processes
        reports, failures = runner(jobs, progress, dask_address)
    finally:
        import fsspec

        fs, base = fsspec.core.url_to_fs(data_uri)
        fs.rm(base, recursive=True)
    for failure in failures:
        logger.warning("%s", failure)
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not reports or not completed:
        detail = "; ".join(failures) or "no trial completed (all pruned or failed); raise --trials"
        raise DriftloopError(f"study {study_name}: tuning with {workers} workers failed: {detail}")
    best = study.best_trial
    return TuneResult(algorithm, study_name, dict(best.params), float(best.value),
                      settled_trials(study) - already, len(study.get_trials(deepcopy=False)))


def _in_local_processes(jobs: list[TuningJob], progress: Callable[[], None],
                        _address: str | None) -> tuple[list[WorkerReport], list[str]]:
    root = Path(__file__).resolve().parents[1]  # so `-m tasks.tune` imports this checkout
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    logs = Path(tempfile.mkdtemp(prefix="driftloop-tune-logs-"))
    procs = []
    for job in jobs:
        # Files, not pipes: a worker writing more than a pipe holds would block on it.
        out, err = (logs / f"worker-{job.worker}.out").open("w+"), (logs / f"worker-{job.worker}.err").open("w+")
        proc = subprocess.Popen([sys.executable, "-m", "driftloop.tasks.tune"], stdin=subprocess.PIPE, stdout=out,
                                stderr=err, text=True, env=env)
        proc.stdin.write(json.dumps(asdict(job)))
        proc.stdin.close()
        procs.append((job, proc, out, err))
    reports, failures = [], []
    try:
        while any(proc.poll() is None for _, proc, _, _ in procs):
            progress()
            time.sleep(1.0)
        progress()
        for job, proc, out, err in procs:
            out.seek(0)
            err.seek(0)
            if proc.returncode == 0:
                reports.append(WorkerReport(**json.loads(out.read().strip().splitlines()[-1])))
            elif proc.returncode < 0:
                failures.append(f"tuning worker {job.worker} (pid {proc.pid}) was killed by signal {-proc.returncode}; "
                                "its running trial was retried by the others")
            else:
                failures.append(f"tuning worker {job.worker} (pid {proc.pid}) exited with {proc.returncode}: "
                                f"{err.read()[-2000:].strip()}")
    finally:
        for _, proc, out, err in procs:
            if proc.poll() is None:  # only when we are interrupted ourselves
                proc.kill()
                proc.wait()
            out.close()
            err.close()
        for path in logs.iterdir():
            path.unlink()
        logs.rmdir()
    return reports, failures


def _on_dask(jobs: list[TuningJob], progress: Callable[[], None],
             address: str | None) -> tuple[list[WorkerReport], list[str]]:
    """One task per worker on an existing Dask cluster. A Dask worker that dies has its
    task rerun elsewhere by the scheduler: the rerun joins the same study and cap."""
    from distributed import Client

    reports, failures = [], []
    with Client(address, timeout="30s") as client:
        futures = [client.submit(run_tuning_worker, job, pure=False, key=f"tune-{job.study_name}-{job.worker}")
                   for job in jobs]
        while not all(future.done() for future in futures):
            progress()
            time.sleep(1.0)
        progress()
        for job, future in zip(jobs, futures, strict=True):
            try:
                reports.append(future.result())
            except Exception as exc:  # noqa: BLE001 (reported with the others; the study decides)
                failures.append(f"tuning worker {job.worker} on {address} failed: {exc!r}")
    return reports, failures


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


def _worker_main() -> None:
    """``python -m tasks.tune``: one tuning worker; its TuningJob comes as JSON on stdin,
    its WorkerReport goes as one JSON line to stdout."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    report = run_tuning_worker(TuningJob(**json.loads(sys.stdin.read())))
    print(json.dumps(asdict(report)), flush=True)


if __name__ == "__main__":
    _worker_main()
