"""Retention: what piles up run after run and is needed by no alias, version, window or
recent run, found and (only when asked) removed.

- **table snapshots**: in every predictions and labels table (:mod:`driftloop.tables`),
  snapshots older than the retention are expired, except the current one, one a branch
  or tag points at, one made current less than :data:`GRACE` ago (a reader may have just
  picked it), and every snapshot a record names: a scoring run's ``snapshot_id``, a
  monitoring run's ``snapshots`` and a model version's ``window`` (its
  ``predictions_snapshot`` and ``labels_snapshot``), so every stored window can be
  re-read exactly;
- **orphan table files**: files under a table's ``data/`` and ``metadata/`` that no
  remaining snapshot or metadata references (the current metadata and its log, manifest
  lists, manifests, the data files of every remaining snapshot) and older than
  :data:`GRACE` (a scoring run in flight writes its data files before it commits);
- monitoring runs older than the retention (registry rows, results and their report
  directory), except each model's newest run, and the snapshots only they named;
- Optuna studies that started before the retention (one is made per training run);
- crash leftovers in the artifact store older than :data:`GRACE`: ``.tmp-*`` files (and
  the ``.tmp-`` / ``.old-`` directories scoring left before outputs had manifests);
- the work area of a partitioned scoring run that never committed
  (``scoring/<model>/<run id>``: no scoring run record and no row in the table), untouched
  for :data:`GRACE`; a committed run's work area holds its quarantine and is kept;
- model artifacts (``models/<name>/onnx/<sha256>.onnx``) no registered version points at,
  unless a training run marked the artifact pending (``<sha256>.onnx.pending``, written
  before the artifact and removed when the version registers) less than
  :data:`PENDING_TTL` ago: training stores the artifact, then builds its forms and
  evaluates it before it registers, which can take longer than :data:`GRACE`. A stale
  mark (a training run that crashed) goes with its artifact.

Optuna studies with a trial still running are never removed, however old.

Versions, their artifacts, cards and references, datasets, quarantines and the scoring
outputs written before the tables (imported by :mod:`driftloop.legacy_outputs`) are
kept: they are lineage.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field

from driftloop.errors import DriftloopError
from driftloop.outputs import modified_time, newest_write
from driftloop.registry import RegistryStore
from driftloop.storage import ArtifactStore
from driftloop.tables import LABELS, PREDICTIONS, SCORING_RUN, MemoryTable, Tables

logger = logging.getLogger(__name__)

GRACE = timedelta(hours=1)  # younger files may belong to a run in progress
PENDING_TTL = timedelta(days=1)  # a training run's artifact, stored before it registers its version
PENDING_SUFFIX = ".pending"  # <sha256>.onnx.pending beside the artifact
WORK_AREAS = "scoring"  # <artifact root>/scoring/<model>/<run id>: partitioned runs' parts and quarantine


class TableCollected(BaseModel):
    """What retention does to one table."""

    table: str = Field(description="e.g. predictions.car_loan")
    snapshots: list[int] = Field(default_factory=list, description="Snapshots expired (or, in a dry run, to expire).")
    kept_named: list[int] = Field(default_factory=list,
                                  description="Snapshots older than the retention kept because a record names them.")
    files: list[str] = Field(default_factory=list, description="Orphan files removed (or to remove).")
    bytes: int = 0
    error: str | None = None


class Collected(BaseModel):
    applied: bool
    monitoring_runs: list[str] = []
    studies: list[str] = []
    files: list[str] = []  # paths in the artifact store; URIs for scoring outputs outside it
    tables: list[TableCollected] = []


@dataclass
class _Plan:
    monitoring_runs: list[str] = field(default_factory=list)
    monitoring_dirs: list[str] = field(default_factory=list)
    studies: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def collect(registry: RegistryStore, store: ArtifactStore, *, keep_days: float, apply: bool,
            now: datetime | None = None, grace: timedelta = GRACE, tables: Tables | None = None) -> Collected:
    """What retention removes; removed only when ``apply`` (a dry run otherwise).
    ``grace``: how old an unreferenced file must be before it is removed."""
    if not (isinstance(keep_days, int | float) and math.isfinite(keep_days) and keep_days > 0):
        raise DriftloopError(f"gc: --keep-days must be a number of days above 0, got {keep_days!r}; retention 0 would "
                             "remove everything a running training or monitoring run may still need (default: "
                             "DRIFTLOOP_RETENTION_DAYS, 90)")
    now = now or datetime.now(UTC)
    plan = _Plan()
    cutoff = now - timedelta(days=keep_days)
    for model in registry.list_models():
        runs = registry.list_monitoring_runs(model)  # newest first
        for run in runs[1:]:
            if _aware(run["created_at"]) < cutoff:
                plan.monitoring_runs.append(run["id"])
                plan.monitoring_dirs.append(f"monitoring/{model}/{run['id']}")
    plan.studies = _old_studies(registry, cutoff)
    settled = now - grace
    if tables is None:
        from driftloop.tables import open_tables

        tables = open_tables(registry.engine, store.uri("").rstrip("/"))
    plan.files = (_crash_leftovers(store, settled) + _orphaned_artifacts(registry, store, settled, now)
                  + _abandoned_work_areas(registry, store, tables, settled))
    if apply:
        registry.delete_monitoring_runs(plan.monitoring_runs)
        for relpath in [*plan.monitoring_dirs, *plan.files]:
            if relpath.endswith(".onnx") and _pending(store, relpath, now):
                continue  # a training run marked it since the plan was made
            store.remove(relpath)
        plan.studies = _delete_studies(registry, plan.studies)
    # Read after the monitoring runs went (when applying): a snapshot only they named goes too.
    named = named_snapshots(registry, dropping=set(plan.monitoring_runs))
    base = store.uri("").rstrip("/")
    collected_tables = []
    for namespace, opener in ((PREDICTIONS, tables.predictions), (LABELS, tables.labels)):
        for model in tables.list(namespace):
            table = opener(model)
            if table is not None:
                collected_tables.append(collect_table(table, named, cutoff=cutoff, settled=settled, apply=apply,
                                                      base=base))
    return Collected(applied=apply, monitoring_runs=plan.monitoring_runs, studies=plan.studies,
                     files=plan.monitoring_dirs + plan.files, tables=collected_tables)


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _millis(value: datetime) -> int:
    return int(_aware(value).timestamp() * 1000)


# --- which snapshots records name ------------------------------------------------------


def _snapshot_ids(values: Any) -> set[int]:
    out = set()
    for value in values:
        if value is None or isinstance(value, bool):
            continue
        try:
            out.add(int(value))
        except (TypeError, ValueError):
            logger.warning("a record names snapshot %r, which is not a snapshot id; ignored", value)
    return out


def named_snapshots(registry: RegistryStore, *, dropping: set[str] | None = None) -> set[int]:
    """Every snapshot id a record names: scoring runs (the snapshot each committed),
    monitoring runs (the snapshots each read; except those in ``dropping``, about to be
    removed) and model versions (their training window's snapshots). Snapshot ids are
    random 63-bit numbers, so one set serves every table."""
    from sqlalchemy import select

    from driftloop.registry.tables import ModelVersionRow, MonitoringRunRow, ScoringRunRow

    dropping = dropping or set()
    with registry.session() as s:
        scoring = s.scalars(select(ScoringRunRow.snapshot_id).where(ScoringRunRow.snapshot_id.is_not(None))).all()
        monitoring = [snapshots for run_id, snapshots in s.execute(select(MonitoringRunRow.id, MonitoringRunRow.snapshots))
                      if run_id not in dropping and snapshots]
        windows = [w for w in s.scalars(select(ModelVersionRow.window)) if w]
    named = _snapshot_ids(scoring)
    for snapshots in monitoring:
        named |= _snapshot_ids(snapshots.values() if isinstance(snapshots, dict) else [])
    for window in windows:
        if isinstance(window, dict):
            named |= _snapshot_ids([window.get("predictions_snapshot"), window.get("labels_snapshot")])
    return named


# --- one table ----------------------------------------------------------------------


def collect_table(memory: MemoryTable, named: set[int], *, cutoff: datetime, settled: datetime, apply: bool,
                  base: str = "") -> TableCollected:
    """Expire ``memory``'s snapshots older than ``cutoff`` that nothing needs, then remove
    the files no remaining snapshot or metadata references, written before ``settled``.
    A dry run (``apply`` false) reports the same without changing anything."""
    from pyiceberg.exceptions import CommitFailedException

    out = TableCollected(table=memory.name)
    try:
        table = memory.refresh().table
        doomed, out.kept_named = _expirable(table.metadata, named, _millis(cutoff), _millis(settled))
        if apply and doomed:
            for attempt in range(5):
                table = memory.refresh().table
                ids = [i for i in doomed if table.metadata.snapshot_by_id(i) is not None
                       and i != table.metadata.current_snapshot_id]
                if not ids:
                    break
                try:
                    table.maintenance.expire_snapshots().by_ids(ids).commit()
                    break
                except CommitFailedException:  # a concurrent commit: expire on its state
                    if attempt == 4:
                        raise
            table = memory.refresh().table
            remaining = list(table.metadata.snapshots)
        else:
            remaining = [s for s in table.metadata.snapshots if s.snapshot_id not in set(doomed)]
        out.snapshots = sorted(doomed)
        orphans = _orphans(table, remaining, settled)
        out.files = sorted(_shown(path, base) for path, _ in orphans)
        out.bytes = sum(size for _, size in orphans)
        if apply:
            fs = table.io.get_fs(_scheme(table.location()))
            for path, _ in orphans:
                try:
                    fs.rm_file(path)
                except FileNotFoundError:
                    pass
    except Exception as exc:  # noqa: BLE001 - one unreadable table must not stop retention of the others
        logger.warning("table %s skipped by retention: %s", memory.name, exc)
        out.error = f"{type(exc).__name__}: {exc}"
    return out


def _expirable(metadata: Any, named: set[int], cutoff_ms: int, settled_ms: int) -> tuple[list[int], list[int]]:
    """(snapshots to expire, old snapshots kept only because a record names them)."""
    protected = {ref.snapshot_id for ref in metadata.refs.values()}
    if metadata.current_snapshot_id is not None:
        protected.add(metadata.current_snapshot_id)
    # When each snapshot stopped being current: the next entry of the snapshot log.
    log = list(metadata.snapshot_log)
    superseded = {entry.snapshot_id: log[n + 1].timestamp_ms for n, entry in enumerate(log[:-1])}
    doomed, kept = [], []
    for snapshot in metadata.snapshots:
        sid = snapshot.snapshot_id
        if snapshot.timestamp_ms >= cutoff_ms or sid in protected:
            continue
        if sid in named:
            kept.append(sid)
        elif superseded.get(sid, snapshot.timestamp_ms) < settled_ms:
            doomed.append(sid)
    return sorted(doomed), sorted(kept)


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def referenced_files(table: Any, snapshots: list[Any]) -> set[str]:
    """Every file the table's current metadata and ``snapshots`` need, as URIs: the
    metadata file and its log, statistics, and per snapshot its manifest list, manifests
    and live data (and delete) files."""
    metadata = table.metadata
    io = table.io
    refs = {table.metadata_location, *(e.metadata_file for e in metadata.metadata_log)}
    refs |= {s.statistics_path for s in metadata.statistics}
    refs |= {s.statistics_path for s in metadata.partition_statistics}
    seen_manifests: set[str] = set()
    for snapshot in snapshots:
        refs.add(snapshot.manifest_list)
        for manifest in snapshot.manifests(io):
            refs.add(manifest.manifest_path)
            if manifest.manifest_path in seen_manifests:
                continue
            seen_manifests.add(manifest.manifest_path)
            for entry in manifest.fetch_manifest_entry(io, discard_deleted=True):
                refs.add(entry.data_file.file_path)
    return refs


def _orphans(table: Any, snapshots: list[Any], settled: datetime) -> list[tuple[str, int]]:
    """(path, bytes) of each file under the table's data/ and metadata/ that nothing
    references and that was last written before ``settled``."""
    location = table.location().rstrip("/")
    fs = table.io.get_fs(_scheme(location))
    strip = type(fs)._strip_protocol
    referenced = {strip(uri) for uri in referenced_files(table, snapshots)}
    root = strip(location)
    found = []
    for sub in ("data", "metadata"):
        fs.invalidate_cache(f"{root}/{sub}")
        try:
            listed = fs.find(f"{root}/{sub}", detail=True, withdirs=False)
        except FileNotFoundError:
            continue
        for path, info in listed.items():
            if strip(path) in referenced:
                continue
            modified = modified_time(info)
            if modified is not None and modified < settled:
                found.append((path, int(info.get("size") or 0)))
    return sorted(found)


def _shown(path: str, base: str) -> str:
    """A path relative to the artifact root when under it."""
    from driftloop.redact import mask_uri

    bare = base.split("://", 1)[-1].removeprefix("/").rstrip("/")
    plain = path.split("://", 1)[-1].removeprefix("/")
    return plain.removeprefix(bare + "/") if bare and plain.startswith(bare + "/") else mask_uri(path)


# --- the rest of the artifact store -------------------------------------------------------


def _storage_url(registry: RegistryStore) -> str:
    return registry.engine.url.render_as_string(hide_password=False)


def _old_studies(registry: RegistryStore, cutoff: datetime) -> list[str]:
    from sqlalchemy import inspect

    if "studies" not in inspect(registry.engine).get_table_names():
        return []  # no study was ever stored here
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage_url(registry)
    summaries = optuna.get_all_study_summaries(storage=storage, include_best_trial=False)
    old = sorted(s.study_name for s in summaries
                 if s.datetime_start is not None and _aware(s.datetime_start.astimezone(UTC)) < cutoff)
    return [name for name in old if not _running(storage, name)]


def _running(storage: str, name: str) -> bool:
    """Whether a trial of the study is running (a tuning worker is on it), however old
    the study: such a study is never removed."""
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # removed meanwhile
        return False
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if running:
        logger.info("gc: study %s kept: %d trial(s) running", name, len(running))
    return bool(running)


def _delete_studies(registry: RegistryStore, names: list[str]) -> list[str]:
    """Delete the studies, each checked again just before (a worker may have started a
    trial since the plan); the names deleted."""
    if not names:
        return []
    import optuna

    storage = _storage_url(registry)
    deleted = []
    for name in names:
        if _running(storage, name):
            continue
        optuna.delete_study(study_name=name, storage=storage)
        deleted.append(name)
    return deleted


def _crash_leftovers(store: ArtifactStore, before: datetime) -> list[str]:
    leftovers = []
    base = store.path("").rstrip("/")
    if not store.fs.exists(base):
        return []
    for path, dirs, files in store.fs.walk(base):
        for name in [*dirs, *files]:
            if not (name.startswith(".tmp-") or ".tmp-" in name or ".old-" in name):
                continue
            full = f"{path}/{name}"
            modified = store.fs.modified(full) if name in files else _dir_modified(store, full)
            if modified is not None and _aware(modified) < before:
                leftovers.append(full.removeprefix(base + "/"))
        dirs[:] = [d for d in dirs if not (d.startswith(".tmp-") or ".tmp-" in d or ".old-" in d)]
    return sorted(leftovers)


def _dir_modified(store: ArtifactStore, path: str) -> datetime | None:
    try:
        return store.fs.modified(path)
    except (OSError, NotImplementedError):
        return None


def _orphaned_artifacts(registry: RegistryStore, store: ArtifactStore, before: datetime, now: datetime) -> list[str]:
    """Artifacts no version points at, written before ``before`` and not marked pending
    by a training run (see :func:`pending_mark`); and stale pending marks."""
    referenced = {v.onnx_sha256 for v in registry.list_versions()}
    orphans = []
    # Every model directory in the store, not the registry's models: the first training of
    # a name that crashed before registering left an artifact of a model the registry never saw.
    models = {full.rstrip("/").rsplit("/", 1)[-1] for full in store.fs.ls(store.path("models"), detail=False)} \
        if store.exists("models") else set()
    for model in sorted(models):
        relpath = f"models/{model}/onnx"
        if not store.exists(relpath):
            continue
        for full in store.fs.ls(store.path(relpath), detail=False):
            name = full.rsplit("/", 1)[-1]
            if name.endswith(".onnx" + PENDING_SUFFIX):
                if not _pending(store, f"{relpath}/{name.removesuffix(PENDING_SUFFIX)}", now):
                    orphans.append(f"{relpath}/{name}")  # its training crashed long ago, or registered and then crashed
            elif (name.endswith(".onnx") and name.removesuffix(".onnx") not in referenced
                    and _aware(store.fs.modified(full)) < before and not _pending(store, f"{relpath}/{name}", now)):
                orphans.append(f"{relpath}/{name}")
    return sorted(orphans)


def pending_mark(artifact_uri: str) -> str:
    """The mark a training run writes beside its artifact before storing it, and removes
    once its version is registered: gc leaves a marked artifact alone while the mark is
    younger than :data:`PENDING_TTL`."""
    return artifact_uri + PENDING_SUFFIX


def _pending(store: ArtifactStore, artifact_relpath: str, now: datetime) -> bool:
    mark = store.path(pending_mark(artifact_relpath))
    try:
        marked = modified_time(store.fs.info(mark))
    except FileNotFoundError:
        return False
    return marked is not None and now - _aware(marked) < PENDING_TTL


def _newest_write(store: ArtifactStore, relpath: str) -> datetime | None:
    return newest_write(store.fs, store.path(relpath))


def _abandoned_work_areas(registry: RegistryStore, store: ArtifactStore, tables: Tables,
                          before: datetime) -> list[str]:
    """Work areas of partitioned scoring runs (``scoring/<model>/<run id>``) that never
    committed: no scoring run record names the run, the model's predictions table holds
    none of its rows, and nothing there was written since ``before``. A committed run's
    work area holds its quarantine: kept."""
    if not store.exists(WORK_AREAS):
        return []
    import polars as pl

    recorded = {run.id for run in registry.list_scoring_runs()}
    found = []
    for model_dir in store.fs.ls(store.path(WORK_AREAS), detail=False):
        model = model_dir.rstrip("/").rsplit("/", 1)[-1]
        table = None
        for run_dir in store.fs.ls(model_dir, detail=False):
            run_id = run_dir.rstrip("/").rsplit("/", 1)[-1]
            relpath = f"{WORK_AREAS}/{model}/{run_id}"
            if run_id in recorded:
                continue
            newest = _newest_write(store, relpath)
            if newest is not None and newest >= before:
                continue  # may be a run in progress
            if table is None:
                table = tables.predictions(model) or False
            if table and SCORING_RUN in table.table.schema().column_names and table.scan().filter(pl.col(SCORING_RUN) == run_id).select(pl.len()).collect().item():
                continue  # committed, then crashed before its record: its quarantine is kept
            found.append(relpath)
    return sorted(found)
