"""Distributed tuning on a real PostgreSQL: worker processes sharing one Optuna study run
exactly the requested number of trials, a worker killed mid-trial costs only that trial
(failed by its stale heartbeat, then retried with the same params), SQLite is refused,
and the train flow (and its CLI option) tunes with 2 workers up to a registered model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from sqlalchemy.exc import SQLAlchemyError

from driftloop.errors import DriftloopError
from driftloop.registry import open_registry
from driftloop.spec import load_spec
from driftloop.tasks.fit import TrainingData, prepare_training_data
from driftloop.tasks.split import split_dataset
from driftloop.tasks.study import TuneResult, tuning_storage
from driftloop.tasks.tune import tune
from driftloop.tasks.tune_workers import tune_in_workers
from tests.support.data import make_loans, write_spec
from tests.support.models import train_fast

pytestmark = [pytest.mark.postgres]

COMPLETE, PRUNED, RUNNING, WAITING, FAIL = (
    optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING,
    optuna.trial.TrialState.WAITING, optuna.trial.TrialState.FAIL,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> TrainingData:
    # Big enough that a LightGBM trial takes about a second on one thread: workers overlap.
    spec = load_spec(write_spec(tmp_path_factory.mktemp("spec")))
    split = split_dataset(make_loans(20_000), spec, seed=0)
    return prepare_training_data(spec, split.train, split.valid)[0]


def states(study: optuna.Study) -> Counter:
    return Counter(t.state for t in study.get_trials(deepcopy=False))


def test_two_workers_run_exactly_the_requested_trials(postgres, data: TrainingData) -> None:
    storage = postgres.create_database("tune_exact")
    # A study that already holds trials (one process, as before): the cap counts from them.
    tune("lightgbm", data, study_name="exact", storage=storage, n_trials=2, seed=1, threads=1)
    result = tune_in_workers("lightgbm", data, study_name="exact", storage=storage, n_trials=8, workers=2,
                             seed=7, threads=1)
    study = optuna.load_study(study_name="exact", storage=storage)
    counts = states(study)
    assert counts[COMPLETE] + counts[PRUNED] == 10 and set(counts) <= {COMPLETE, PRUNED}, counts
    assert (result.trials_run, result.trials_total) == (8, 10)
    # Each worker sampled with its own seed (seed + worker index), in its own process.
    ours = [t for t in study.trials if "worker_seed" in t.user_attrs]
    assert len(ours) == 8 and {t.user_attrs["worker_seed"] for t in ours} == {7, 8}
    assert len({t.user_attrs["worker_pid"] for t in ours}) == 2
    assert result.best_params == study.best_trial.params and result.best_value == study.best_value
    assert set(result.best_params) >= {"num_leaves", "learning_rate"}


def _kill_a_worker_mid_trial(storage: str, study_name: str, tuning: threading.Thread) -> int:
    """SIGKILL a worker while it runs a trial; the trial's number. The worker is frozen
    (SIGSTOP) first, so the trial seen RUNNING is still running when the kill lands."""
    deadline = time.monotonic() + 180
    reader = None
    while time.monotonic() < deadline and tuning.is_alive():
        try:
            # Never create Optuna's tables from here: that would race the coordinator doing it.
            reader = reader or optuna.storages.RDBStorage(storage, skip_table_creation=True,
                                                          skip_compatibility_check=True)
            study = optuna.load_study(study_name=study_name, storage=reader)
        except (KeyError, SQLAlchemyError, optuna.exceptions.StorageInternalError):  # not created yet
            time.sleep(0.2)
            continue
        for seen in study.get_trials(deepcopy=False, states=(RUNNING,)):
            pid = seen.user_attrs.get("worker_pid")
            if pid is None:
                continue
            os.kill(pid, signal.SIGSTOP)
            mine = [t for t in study.get_trials(deepcopy=False, states=(RUNNING,)) if t.user_attrs.get("worker_pid") == pid]
            if mine:
                os.kill(pid, signal.SIGKILL)
                return mine[0].number
            os.kill(pid, signal.SIGCONT)  # caught between trials: let it go on, look again
        time.sleep(0.05)
    raise AssertionError("no tuning worker was seen running a trial")


def test_a_worker_killed_mid_trial_costs_only_that_trial(postgres, data: TrainingData) -> None:
    storage = postgres.create_database("tune_kill")
    box: dict[str, TuneResult] = {}

    def run() -> None:
        box["result"] = tune_in_workers("lightgbm", data, study_name="kill", storage=storage, n_trials=6,
                                        workers=2, seed=0, threads=1, heartbeat_s=1, grace_s=3)

    tuning = threading.Thread(target=run)
    tuning.start()
    victim = _kill_a_worker_mid_trial(storage, "kill", tuning)
    tuning.join(timeout=300)
    assert not tuning.is_alive() and "result" in box, "tuning did not finish after a worker was killed"

    study = optuna.load_study(study_name="kill", storage=storage)
    killed = study.trials[victim]
    assert killed.state == FAIL  # by its stale heartbeat, not left RUNNING
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim]
    assert len(retries) == 1 and retries[0].state in (COMPLETE, PRUNED)
    # The retry keeps every param the killed trial had drawn (all of them, unless it was
    # killed while drawing them: then the rest are drawn anew).
    assert killed.params.items() <= retries[0].params.items()
    counts = states(study)
    assert counts[RUNNING] == counts[WAITING] == 0 and counts[FAIL] == 1, counts
    assert counts[COMPLETE] + counts[PRUNED] == 6 == box["result"].trials_run


def test_workers_on_a_dask_cluster(postgres, data: TrainingData, tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    storage = postgres.create_database("tune_dask")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        result = tune_in_workers("lightgbm", data, study_name="dask", storage=storage, n_trials=5, workers=2, seed=3,
                                 threads=1, dask_address=cluster.scheduler_address, data_uri=str(tmp_path / "data"))
        with Client(cluster) as client:
            dask_pids = set(client.run(os.getpid).values())
    study = optuna.load_study(study_name="dask", storage=storage)
    counts = states(study)
    assert counts[COMPLETE] + counts[PRUNED] == 5 == result.trials_run and set(counts) <= {COMPLETE, PRUNED}
    assert {t.user_attrs["worker_seed"] for t in study.trials} <= {3, 4}
    assert {t.user_attrs["worker_pid"] for t in study.trials} <= dask_pids  # ran inside the Dask workers
    assert not (tmp_path / "data").exists()  # the data reference is removed after tuning


def test_sqlite_with_several_workers_is_refused(tmp_path: Path, data: TrainingData) -> None:
    db = tmp_path / "studies.db"
    with pytest.raises(DriftloopError, match="set DRIFTLOOP_OPTUNA_STORAGE=postgresql") as refused:
        tune_in_workers("lightgbm", data, study_name="s", storage=f"sqlite:///{db}", n_trials=4, workers=2)
    assert "2 tuning workers" in str(refused.value) and not db.exists()  # refused before anything is written

    registry_pg, optuna_pg = "postgresql+psycopg://u:pw@db/registry", "postgresql+psycopg://u:pw@db/optuna"
    sqlite = f"sqlite:///{db}"
    assert tuning_storage(sqlite, optuna_pg, 1) == sqlite  # one worker: the registry, as before
    assert tuning_storage(registry_pg, optuna_pg, 2) == registry_pg
    assert tuning_storage(sqlite, optuna_pg, 2) == optuna_pg
    with pytest.raises(DriftloopError, match=r"sqlite:///.*\*\*\*|u:\*\*\*@") as masked:
        tuning_storage(sqlite, "mysql://u:pw@db/optuna", 3)
    assert "pw" not in str(masked.value)


@pytest.mark.prefect
@pytest.mark.usefixtures("prefect_server")
def test_train_with_tuning_workers(postgres, tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = write_spec(tmp_path)
    source = tmp_path / "loans.parquet"
    make_loans(4000, seed=5).write_parquet(source)

    # The CLI hands --tuning-workers to the flow, which refuses the default SQLite registry
    # before ingesting or training anything.
    driftloop = Path(sys.executable).with_name("driftloop")
    refused = subprocess.run(
        [str(driftloop), "train", "--spec", str(spec), str(source), "--tuning-workers", "2"],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert refused.returncode != 0
    assert "2 tuning workers need an Optuna study database on PostgreSQL" in refused.stderr, refused.stderr[-2000:]
    assert "set DRIFTLOOP_OPTUNA_STORAGE=postgresql" in refused.stderr

    # The registry's own PostgreSQL holds the study: 4 trials in total, from 2 workers.
    registry = postgres.create_database("registry_flow")
    monkeypatch.setenv("DRIFTLOOP_REGISTRY_URL", registry)
    result = train_fast(spec_path=str(spec), source=str(source), algorithms=["lightgbm"], trials=4, study_name="flow",
                   parity_min_rows=5_000, tuning_workers=2)
    assert result.version == 1 and result.parity.passed
    study = optuna.load_study(study_name="loans-lightgbm-flow", storage=registry)
    counts = states(study)
    assert counts[COMPLETE] + counts[PRUNED] == 4 and set(counts) <= {COMPLETE, PRUNED}, counts
    assert {t.user_attrs["worker_seed"] for t in study.trials} <= {0, 1}
    assert result.metrics and open_registry(registry).get_version("loans", 1).params["n_rounds"] >= 1
