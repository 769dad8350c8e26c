"""Retraining steps: the model's lease, its spec from the registry, the labelled data
and the training window (logic in :mod:`driftloop.feedback`), and the window's snapshot
as a registered dataset, so the version's lineage points at exactly what it learned from.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import Self

from prefect import task
from prefect.cache_policies import NONE

from driftloop.feedback import (
    LabelledData,
    LabelledWindow,
    champion_data_end,
    collect_labelled_data,
    select_window,
    window_dataset_name,
)
from driftloop.onnx_model import load_model
from driftloop.registry import DatasetRecord, ModelVersionRecord, RegistryStore
from driftloop.registry.store import LeaseDecision, utcnow
from driftloop.spec import DatasetSpec
from driftloop.storage import ArtifactStore
from driftloop.tables import Tables
from driftloop.tasks.ingest import frame_content_hash
from driftloop.tasks.score import fetch_verified

logger = logging.getLogger(__name__)


class LeaseHeartbeat:
    """Renews a retrain lease every ``interval_s`` while the retrain works, so a retrain
    longer than the lease's TTL keeps it; a retrain that dies stops renewing and its lease
    expires ``ttl_s`` later. Use as a context manager around the work."""

    def __init__(self, registry: RegistryStore, model: str, holder: str, *, ttl_s: float,
                 interval_s: float | None = None) -> None:
        self.registry, self.model, self.holder, self.ttl_s = registry, model, holder, ttl_s
        # Several renewals per TTL: one slow or failed write does not lose the lease.
        self.interval_s = interval_s if interval_s is not None else min(ttl_s / 4, 60.0)
        self.renewals = 0
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"driftloop-lease-{model}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if self.registry.renew_retrain_lease(self.model, self.holder, ttl_s=self.ttl_s):
                    self.renewals += 1
                    continue
                self.lost = True
                logger.error("the retrain lease of %s held by %s expired and was taken over; another retrain may be "
                             "running beside this one (its promotion is still a compare-and-swap)", self.model, self.holder)
                return
            except Exception as exc:  # noqa: BLE001 - a registry outage: try again at the next beat
                logger.warning("could not renew the retrain lease of %s: %s", self.model, exc)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def champion_spec(record: ModelVersionRecord) -> DatasetSpec:
    """The spec the champion was trained with, read from its hash-verified artifact: what
    a retrain learns is decided by the registry, never by the event that started it."""
    return load_model(fetch_verified(record.onnx_uri, record.onnx_sha256)).spec()


def champion_sources(record: ModelVersionRecord) -> set[str]:
    """The datasets and scoring runs the champion learned from."""
    if record.window:
        return {*record.window.get("dataset_ids", []), *record.window.get("scoring_runs", [])}
    return {record.dataset_id}


def snapshot_window(registry: RegistryStore, store: ArtifactStore, spec: DatasetSpec, window: LabelledWindow) -> DatasetRecord:
    """Register the window's rows as the dataset ``<name>.window`` (content-addressed: the
    same rows give the same dataset)."""
    content_hash = frame_content_hash(window.frame)
    dataset_id = "ds_" + hashlib.sha256(f"{content_hash}:{spec.fingerprint()}:window".encode()).hexdigest()[:16]
    existing = registry.get_dataset(dataset_id)
    if existing is not None:
        return existing
    name = window_dataset_name(spec.name)
    uri = store.write_parquet(f"datasets/{name}/{dataset_id}/rows.parquet", window.frame)
    record = DatasetRecord(
        id=dataset_id, name=name, content_hash=content_hash, spec_hash=spec.fingerprint(),
        source=f"window {window.record.policy}: {window.record.start or ''}..{window.record.end or ''} of "
               f"{len(window.record.dataset_ids)} dataset(s) and {len(window.record.scoring_runs)} scoring run(s)",
        labelled=True, rows_in=window.frame.height, rows_valid=window.frame.height, rows_quarantined=0,
        snapshot_uri=uri, quarantine_uri=None,
        column_types={k: str(v) for k, v in window.frame.schema.items()}, created_at=utcnow(),
    )
    return registry.add_dataset(record)[0]


@task(name="retrain-lease", cache_policy=NONE)
def acquire_lease_task(registry: RegistryStore, model: str, holder: str, cooldown_s: float, ttl_s: float) -> LeaseDecision:
    return registry.acquire_retrain_lease(model, holder, cooldown_s=cooldown_s, ttl_s=ttl_s)


@task(name="registered-spec", cache_policy=NONE)
def champion_spec_task(record: ModelVersionRecord) -> DatasetSpec:
    return champion_spec(record)


@task(name="labelled-data", cache_policy=NONE)
def collect_labelled_task(registry: RegistryStore, tables: Tables, spec: DatasetSpec) -> LabelledData:
    return collect_labelled_data(registry, tables, spec, policy=spec.retrain)


@task(name="training-window", cache_policy=NONE)
def select_window_task(data: LabelledData, spec: DatasetSpec, champion: ModelVersionRecord) -> LabelledWindow:
    return select_window(data, spec, spec.retrain, champion_end=champion_data_end(champion.split, champion.window),
                         champion_sources=champion_sources(champion))


@task(name="snapshot-window", cache_policy=NONE)
def snapshot_window_task(registry: RegistryStore, store: ArtifactStore, spec: DatasetSpec, window: LabelledWindow) -> DatasetRecord:
    return snapshot_window(registry, store, spec, window)
