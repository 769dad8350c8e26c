"""Several tuning workers on one study: local processes or tasks on a Dask cluster.

``tune_in_workers`` runs N workers on one study in PostgreSQL (see ``tasks.study`` for
the claim protocol); ``python -m driftloop.tasks.tune_workers`` is one such worker: its
``TuningJob`` comes as JSON on stdin, its ``WorkerReport`` goes as one JSON line to stdout.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import optuna

from driftloop.errors import DriftloopError
from driftloop.tasks.fit import TrainingData, fit_model
from driftloop.tasks.search_space import Algorithm, search_space
from driftloop.tasks.study import (
    GRACE_S,
    HEARTBEAT_S,
    TuneResult,
    TuningJob,
    claim_trial,
    heartbeat,
    heartbeat_storage,
    open_study,
    settled_trials,
    tuning_storage,
    wait_for_the_others,
)

logger = logging.getLogger(__name__)

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
class WorkerReport:
    worker: int
    seed: int
    pid: int
    trials_run: int


def _import_trainer(algorithm: Algorithm) -> None:
    if algorithm == "xgboost":
        import xgboost  # noqa: F401
        from optuna_integration import XGBoostPruningCallback  # noqa: F401
    else:
        import lightgbm  # noqa: F401
        from optuna_integration import LightGBMPruningCallback  # noqa: F401


def run_tuning_worker(job: TuningJob) -> WorkerReport:
    """One tuning worker: claim, train, report, until the study's cap (or ``timeout``)."""
    from sqlalchemy import create_engine

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = heartbeat_storage(job)
    study = open_study(job.study_name, storage, seed=job.seed)
    data = load_training_data(job.data_uri)
    _import_trainer(job.algorithm)  # seconds of imports, not inside the first trial's time
    wait_for_the_others(study, job)
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


def _run_trial(study: optuna.Study, storage: optuna.storages.RDBStorage, trial: optuna.Trial, job: TuningJob,
               data: TrainingData) -> None:
    # Who ran it: a retry inherits the dead worker's attributes, so they are overwritten.
    trial.set_user_attr("worker", job.worker)
    trial.set_user_attr("worker_seed", job.seed)
    trial.set_user_attr("worker_pid", os.getpid())
    stop = threading.Event()
    beat = threading.Thread(target=heartbeat, args=(storage, trial._trial_id, job.heartbeat_s, stop), daemon=True)
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
    root = Path(__file__).resolve().parents[1]  # so the worker imports this checkout
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    logs = Path(tempfile.mkdtemp(prefix="driftloop-tune-logs-"))
    procs = []
    for job in jobs:
        # Files, not pipes: a worker writing more than a pipe holds would block on it.
        out, err = (logs / f"worker-{job.worker}.out").open("w+"), (logs / f"worker-{job.worker}.err").open("w+")
        proc = subprocess.Popen([sys.executable, "-m", "driftloop.tasks.tune_workers"], stdin=subprocess.PIPE, stdout=out,
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


def _worker_main() -> None:
    """``python -m driftloop.tasks.tune_workers``: one tuning worker; its TuningJob comes as JSON on stdin,
    its WorkerReport goes as one JSON line to stdout."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    report = run_tuning_worker(TuningJob(**json.loads(sys.stdin.read())))
    print(json.dumps(asdict(report)), flush=True)


if __name__ == "__main__":
    _worker_main()
