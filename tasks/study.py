"""The Optuna study and the protocol that lets several workers share one.

A study lives in a SQL database (default: the registry's). Workers join it with
``load_if_exists`` and their own sampler seed. With several workers (PostgreSQL only):
a start barrier (workers of one run wait for each other before claiming), trial claims
under an advisory lock (an exact global trial cap), heartbeats, and the retry of a dead
worker's trial. A ``MedianPruner`` stops poor trials early.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any

import optuna

from driftloop.errors import DriftloopError
from driftloop.tasks.fit import REPORT_EVERY
from driftloop.tasks.search_space import Algorithm

logger = logging.getLogger(__name__)

# Heartbeats every HEARTBEAT_S; a RUNNING trial without one for GRACE_S belongs to a dead
# worker: it is marked FAIL and queued again (same params) at most MAX_RETRY times.
HEARTBEAT_S = 10
GRACE_S = 60
MAX_RETRY = 3
# Namespace of the PostgreSQL advisory lock that serialises trial claims (per study id).
_CLAIM_LOCK = 0x64726C70
_HOLDS_SLOT = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
_SETTLED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@dataclass
class TuneResult:
    algorithm: Algorithm
    study_name: str
    best_params: dict[str, Any]
    best_value: float
    trials_run: int
    trials_total: int


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

def heartbeat(storage: optuna.storages.RDBStorage, trial_id: int, interval: int, stop: threading.Event) -> None:
    while not stop.wait(interval):
        try:
            storage.record_heartbeat(trial_id)
        except Exception:  # a missed beat is retried next interval; only GRACE_S of them fail the trial
            logger.warning("heartbeat for trial %s failed", trial_id, exc_info=True)


def wait_for_the_others(study: optuna.Study, job: TuningJob) -> None:
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


def settled_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=_SETTLED))
