"""Retention: what piles up run after run and is needed by no alias, version or recent
run, found and (only when asked) removed.

- monitoring runs older than the retention (registry rows, results and their report
  directory), except each model's newest run;
- Optuna studies that started before the retention (one is made per training run);
- crash leftovers in the artifact store older than an hour: ``.tmp-*`` files (and the
  ``.tmp-`` / ``.old-`` directories scoring left before outputs had manifests);
- in each scoring output (found under the artifact store by its marker, and at every
  output a recorded scoring run names): runs a newer manifest superseded, and run
  prefixes with no manifest untouched for an hour (crashed runs; see driftloop.outputs);
- model artifacts (``models/<name>/onnx/<sha256>.onnx``) no registered version points at.

Versions, their artifacts, cards and references, datasets and each scoring output's
current run are kept: they are lineage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel

from driftloop.outputs import MARKER, ScoringOutput
from driftloop.redact import mask_uri
from driftloop.registry import RegistryStore
from driftloop.storage import ArtifactStore

logger = logging.getLogger(__name__)

CRASH_LEFTOVER_AGE = timedelta(hours=1)  # younger ones may belong to a run in progress


class Collected(BaseModel):
    applied: bool
    monitoring_runs: list[str] = []
    studies: list[str] = []
    files: list[str] = []  # paths in the artifact store; URIs for scoring outputs outside it


@dataclass
class _Plan:
    monitoring_runs: list[str] = field(default_factory=list)
    monitoring_dirs: list[str] = field(default_factory=list)
    studies: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def collect(registry: RegistryStore, store: ArtifactStore, *, keep_days: float, apply: bool,
            now: datetime | None = None) -> Collected:
    """What retention removes; removed only when ``apply`` (a dry run otherwise)."""
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
    settled = now - CRASH_LEFTOVER_AGE
    plan.files = _crash_leftovers(store, settled) + _orphaned_artifacts(registry, store, settled)
    outputs = _scoring_outputs(registry, store)
    output_files = _output_garbage(outputs, store, now, apply=False)
    if apply:
        registry.delete_monitoring_runs(plan.monitoring_runs)
        for relpath in [*plan.monitoring_dirs, *plan.files]:
            store.remove(relpath)
        _delete_studies(registry, plan.studies)
        output_files = _output_garbage(outputs, store, now, apply=True)
    plan.files += output_files
    return Collected(applied=apply, monitoring_runs=plan.monitoring_runs, studies=plan.studies,
                     files=plan.monitoring_dirs + plan.files)


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _storage_url(registry: RegistryStore) -> str:
    return registry.engine.url.render_as_string(hide_password=False)


def _old_studies(registry: RegistryStore, cutoff: datetime) -> list[str]:
    from sqlalchemy import inspect

    if "studies" not in inspect(registry.engine).get_table_names():
        return []  # no study was ever stored here
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    summaries = optuna.get_all_study_summaries(storage=_storage_url(registry), include_best_trial=False)
    return sorted(s.study_name for s in summaries
                  if s.datetime_start is not None and _aware(s.datetime_start.astimezone(UTC)) < cutoff)


def _delete_studies(registry: RegistryStore, names: list[str]) -> None:
    if not names:
        return
    import optuna

    for name in names:
        optuna.delete_study(study_name=name, storage=_storage_url(registry))


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


def _orphaned_artifacts(registry: RegistryStore, store: ArtifactStore, before: datetime) -> list[str]:
    """Artifacts no version points at, written before ``before`` (a younger one may be
    a training run's, stored just before it registers its version)."""
    referenced = {v.onnx_sha256 for v in registry.list_versions()}
    orphans = []
    for model in registry.list_models():
        relpath = f"models/{model}/onnx"
        if not store.exists(relpath):
            continue
        for full in store.fs.ls(store.path(relpath), detail=False):
            name = full.rsplit("/", 1)[-1]
            if (name.endswith(".onnx") and name.removesuffix(".onnx") not in referenced
                    and _aware(store.fs.modified(full)) < before):
                orphans.append(f"{relpath}/{name}")
    return sorted(orphans)


def _scoring_outputs(registry: RegistryStore, store: ArtifactStore) -> list[ScoringOutput]:
    """Scoring outputs under the artifact store (by their marker) and wherever a recorded
    run wrote one."""
    uris: dict[str, None] = {}
    base = store.path("").rstrip("/")
    if store.fs.exists(base):
        for marker in sorted(store.fs.glob(f"{base}/**/{MARKER}")):
            uris[store.uri(marker.removeprefix(base + "/").rsplit("/", 1)[0])] = None
    for run in registry.list_scoring_runs():
        uris.setdefault(run.output_uri, None)
    return [ScoringOutput(uri) for uri in uris]


def _output_garbage(outputs: list[ScoringOutput], store: ArtifactStore, now: datetime, *, apply: bool) -> list[str]:
    """What each output's collection removes: store-relative paths, or URIs outside it."""
    base = store.uri("").rstrip("/")
    found: list[str] = []
    for output in outputs:
        try:
            relpaths = output.collect_garbage(now=now, grace=CRASH_LEFTOVER_AGE, apply=apply)
        except Exception as exc:  # noqa: BLE001 - an unreachable or masked-credential output must not stop gc
            logger.warning("scoring output %s skipped: %s", output.shown, exc)
            continue
        for relpath in relpaths:
            uri = output.uri_of(relpath)
            found.append(uri.removeprefix(base + "/") if uri.startswith(base + "/") else mask_uri(uri))
    return sorted(found)
