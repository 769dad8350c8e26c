"""Reading and writing the registry. Callers get plain records, never ORM objects."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Engine, create_engine, event, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from driftloop.errors import DriftloopError, ModelNotFound
from driftloop.metrics import json_safe
from driftloop.registry import migrate
from driftloop.registry.errors import open_error, operational_error
from driftloop.registry.tables import (
    AliasEventRow,
    AliasRow,
    DatasetRow,
    ModelRow,
    ModelVersionRow,
    MonitoringResultRow,
    MonitoringRunRow,
    RetrainLeaseRow,
    RolloutDecisionRow,
    ScoringRunRow,
)

logger = logging.getLogger(__name__)

ALIASES = ("champion", "challenger", "candidate")
_ROLLBACK = "rollback: "


class DatasetRecord(BaseModel):
    id: str
    name: str
    content_hash: str
    spec_hash: str
    source: str
    labelled: bool
    rows_in: int
    rows_valid: int
    rows_quarantined: int
    snapshot_uri: str
    quarantine_uri: str | None
    column_types: dict[str, Any]
    created_at: datetime


class VersionDraft(BaseModel):
    """Everything a new version is registered with (the registry adds the number)."""

    model_name: str
    algorithm: str
    task: str
    params: dict[str, Any]
    metrics: dict[str, Any]  # floats (NaN where a metric is undefined; stored and read back as None)
    segment_metrics: dict[str, Any]
    seed: int
    dataset_id: str
    dataset_hash: str
    spec_hash: str
    split: dict[str, Any]
    library_versions: dict[str, Any]
    gate: dict[str, Any]
    parity: dict[str, Any]
    trigger: str = "manual"
    window: dict[str, Any] | None = None
    onnx_uri: str
    onnx_sha256: str
    # Verified scoring forms (driftloop.forms.FormRecord as dicts); None: registered
    # before forms existed, the ONNX form only.
    forms: list[dict[str, Any]] | None = None


class ModelVersionRecord(VersionDraft):
    """A registered version: its draft plus what the registry added."""

    version: int
    card_uri: str | None = None
    reference_uri: str | None = None
    reference_sha256: str | None = None
    created_at: datetime

    @property
    def ref(self) -> str:
        return f"{self.model_name}:{self.version}"


class ScoringRunRecord(BaseModel):
    id: str
    model_name: str
    model_version: int
    onnx_sha256: str
    input_uri: str
    output_uri: str
    quarantine_uri: str | None
    rows_in: int
    rows_scored: int
    rows_quarantined: int
    form: str | None = None  # which scoring form scored (onnx, native, tensor); None before forms existed
    started_at: datetime
    finished_at: datetime
    snapshot_id: int | None = None  # the predictions table's snapshot this run committed
    input_key: str | None = None  # what a re-run of the same input replaces
    export_uri: str | None = None  # the plain Parquet export written for consumers, if any


class AliasEvent(BaseModel):
    model_name: str
    alias: str
    from_version: int | None
    to_version: int | None
    actor: str
    reason: str
    created_at: datetime


class ChampionChanged(DriftloopError):
    """The champion moved after a challenger was judged against it."""


class IncompleteVersion(DriftloopError):
    """An alias was asked to point at a version whose reference or card was never written."""


class LeaseDecision(BaseModel):
    acquired: bool
    reason: str


class _Any:
    """``promote(expected_champion=ANY)``: move the champion whatever it is now."""


ANY = _Any()

# Outcomes that hold the retrain cooldown: a retrain trained (or failed trying), or a
# rollout rejected its candidate or rolled its champion back (the loop must not retrain
# straight into the same model).
COOLDOWN_OUTCOMES = ("trained", "failed", "rejected", "rolled back")


class RolloutDecisionRecord(BaseModel):
    """One look at a rollout on the rows both models scored and that are labelled (see
    :mod:`driftloop.rollout`). ``difference``, ``lower`` and ``upper``: contender minus
    incumbent, positive = contender better (the candidate in the shadow phase, the new
    champion under guard)."""

    model_name: str
    phase: str
    verdict: str
    applied: bool = False
    served_version: int
    shadow_version: int
    metric: str
    rows_scored_by_both: int
    rows_labelled: int
    served_metric: float | None = None
    shadow_metric: float | None = None
    difference: float | None = None
    lower: float | None = None
    upper: float | None = None
    confidence: float
    reason: str
    actor: str
    created_at: datetime | None = None
    predictions_snapshot: int | None = None  # the table snapshots the rows were read from
    labels_snapshot: int | None = None


def parse_model_ref(ref: str) -> tuple[str, str | None, int | None]:
    """``name``, ``name@alias`` or ``name:version`` -> (name, alias, version). A bare
    name means its champion."""
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, alias, None
    if ":" in ref:
        name, version = ref.split(":", 1)
        if not version.isdigit():
            raise DriftloopError(f"model reference {ref!r}: version must be an integer (name:3)")
        return name, None, int(version)
    return ref, "champion", None


def _json(value: Any) -> str:
    """JSON columns: an undefined metric (NaN) is stored as null. PostgreSQL's json type
    rejects NaN, which failed the registration after all the training work."""
    return json.dumps(json_safe(value), allow_nan=False)


def create_registry_engine(url: str, *, lock_timeout_s: float = 30) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": lock_timeout_s}, json_serializer=_json)

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy, not the driver, decide when transactions begin (see below).
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={int(lock_timeout_s * 1000)}")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # IMMEDIATE takes the write lock up front: concurrent writers queue on the
            # busy timeout instead of failing with "database is locked" mid-transaction.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    connect_args = {"connect_timeout": 10} if parsed.get_backend_name() == "postgresql" else {}
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args, json_serializer=_json)


ChampionListener = Callable[["RegistryStore", str], None]
_CHAMPION_MOVED = "driftloop.champion_moved"  # session.info key: models whose champion moved


class RegistryStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        # Called with (store, model) after a transaction that moved a champion commits
        # (the edge channel is re-published): every move, whoever made it.
        self.champion_listeners: list[ChampionListener] = []

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction. A database that stays locked or goes away mid-transaction is
        one clear error (nothing of the transaction is kept), not a driver traceback."""
        try:
            with self._sessions.begin() as session:
                yield session
        except OperationalError as exc:
            raise operational_error(self.engine.url, exc) from None
        self._notify(session.info.pop(_CHAMPION_MOVED, set()))

    def _notify(self, models: set[str]) -> None:
        """Listeners run after the commit; one that fails does not undo the move (it is
        done): it is logged, and the rollout controller's next run publishes again."""
        for model in sorted(models):
            for listener in self.champion_listeners:
                try:
                    listener(self, model)
                except Exception:
                    logger.exception("%s: the champion moved, but publishing the edge channel failed; the edge rollout "
                                     "controller publishes it on its next run (or: driftloop channel publish %s)",
                                     model, model)

    # --- datasets ---------------------------------------------------------------

    def add_dataset(self, record: DatasetRecord) -> tuple[DatasetRecord, bool]:
        """Insert the dataset unless one with the same id exists. Returns the stored
        record and whether it was created by this call."""
        try:
            with self.session() as s:
                existing = s.get(DatasetRow, record.id)
                if existing is not None:
                    return _dataset(existing), False
                s.add(DatasetRow(**record.model_dump()))
            return record, True
        except IntegrityError:  # another process inserted it between our get and add
            found = self.get_dataset(record.id)
            assert found is not None
            return found, False

    def get_dataset(self, dataset_id: str) -> DatasetRecord | None:
        with self.session() as s:
            row = s.get(DatasetRow, dataset_id)
            return _dataset(row) if row is not None else None

    def list_datasets(self, name: str | None = None) -> list[DatasetRecord]:
        query = select(DatasetRow).order_by(DatasetRow.created_at.desc(), DatasetRow.id)
        if name:
            query = query.where(DatasetRow.name == name)
        with self.session() as s:
            return [_dataset(row) for row in s.scalars(query)]


    # --- models -------------------------------------------------------------------

    def register_version(self, draft: VersionDraft) -> ModelVersionRecord:
        """Allocate the next version of ``draft.model_name`` and store it, with no alias:
        an alias may point at it only once its reference and card exist (:meth:`promote`,
        :meth:`set_alias`). The model row is locked while the number is taken, so
        concurrent registrations never collide (PostgreSQL: FOR UPDATE; SQLite: the
        IMMEDIATE write lock)."""
        with self.session() as s:
            model = self._locked_model(s, draft.model_name, create=True)
            model.latest_version += 1
            row = ModelVersionRow(**draft.model_dump(), version=model.latest_version, created_at=utcnow())
            s.add(row)
            s.flush()
            return _model_version(row)

    def _locked_model(self, s: Session, name: str, *, create: bool = False) -> ModelRow:
        """The model's row, locked until the transaction ends: version numbers, promotions
        and retrain leases of one model are taken one at a time."""
        if create and s.get(ModelRow, name) is None:
            try:
                with s.begin_nested():
                    s.add(ModelRow(name=name, latest_version=0, created_at=utcnow()))
            except IntegrityError:
                pass  # created concurrently; the lock below orders us after it
        model = s.execute(select(ModelRow).where(ModelRow.name == name).with_for_update()).scalar_one_or_none()
        if model is None:
            raise ModelNotFound(f"model {name!r} is not registered (driftloop models list shows the models)")
        return model

    # --- retrain leases ---------------------------------------------------------------

    def acquire_retrain_lease(self, name: str, holder: str, *, cooldown_s: float, ttl_s: float) -> LeaseDecision:
        """Take the model's retrain lease unless another retrain holds it (and has not
        expired) or the last retrain that trained or failed started within ``cooldown_s``."""
        now = utcnow()
        with self.session() as s:
            self._locked_model(s, name)
            lease = s.get(RetrainLeaseRow, name)
            if lease is not None:
                acquired_at, expires_at = lease.acquired_at, lease.expires_at
                if lease.finished_at is None and expires_at > now:
                    return LeaseDecision(acquired=False, reason=(
                        f"another retrain of {name} is running (lease held by {lease.holder} since {acquired_at:%Y-%m-%d %H:%M:%S} UTC)"))
                running_or_counted = lease.finished_at is None or lease.outcome in COOLDOWN_OUTCOMES
                if running_or_counted and acquired_at > now - timedelta(seconds=cooldown_s):
                    return LeaseDecision(acquired=False, reason=(
                        f"cooldown: the last retrain of {name} started at {acquired_at:%H:%M:%S} UTC "
                        f"({lease.outcome or 'expired'}), within {cooldown_s:g}s"))
                s.delete(lease)
                s.flush()
            s.add(RetrainLeaseRow(model_name=name, holder=holder, acquired_at=now,
                                  expires_at=now + timedelta(seconds=ttl_s), finished_at=None, outcome=None))
        return LeaseDecision(acquired=True, reason=f"lease taken by {holder}")

    def renew_retrain_lease(self, name: str, holder: str, *, ttl_s: float) -> bool:
        """Extend ``holder``'s running lease to ``ttl_s`` from now (the retrain's heartbeat).
        False when the lease is no longer its own (it expired and another retrain took it)."""
        with self.session() as s:
            lease = s.get(RetrainLeaseRow, name, with_for_update=True)
            if lease is None or lease.holder != holder or lease.finished_at is not None:
                return False
            lease.expires_at = utcnow() + timedelta(seconds=ttl_s)
            return True

    def release_retrain_lease(self, name: str, holder: str, outcome: str) -> None:
        """End ``holder``'s lease with its outcome (trained, failed, waiting, ...)."""
        with self.session() as s:
            lease = s.get(RetrainLeaseRow, name, with_for_update=True)
            if lease is not None and lease.holder == holder and lease.finished_at is None:
                lease.finished_at, lease.outcome = utcnow(), outcome[:32]

    def set_alias(self, name: str, alias: str, version: int, *, actor: str, reason: str) -> None:
        """Point ``alias`` at ``version`` (recorded in the alias history)."""
        with self.session() as s:
            self._locked_model(s, name)
            _check_complete(self._version_row(s, name, version), alias)
            self._move_alias(s, name, alias, version, actor, reason)

    def set_card_uri(self, name: str, version: int, uri: str) -> None:
        with self.session() as s:
            row = self._version_row(s, name, version)
            row.card_uri = uri

    def set_reference(self, name: str, version: int, uri: str, sha256: str) -> None:
        with self.session() as s:
            row = self._version_row(s, name, version)
            row.reference_uri, row.reference_sha256 = uri, sha256

    # --- monitoring -----------------------------------------------------------------

    def add_monitoring_run(self, run: dict[str, Any], results: list[dict[str, Any]]) -> None:
        with self.session() as s:
            s.add(MonitoringRunRow(**run))
            s.flush()
            s.add_all(MonitoringResultRow(run_id=run["id"], **r) for r in results)

    def list_monitoring_runs(self, model_name: str) -> list[dict[str, Any]]:
        query = select(MonitoringRunRow).where(MonitoringRunRow.model_name == model_name).order_by(MonitoringRunRow.created_at.desc())
        with self.session() as s:
            return [{c.key: getattr(r, c.key) for c in MonitoringRunRow.__table__.columns} for r in s.scalars(query)]

    def delete_monitoring_runs(self, run_ids: list[str]) -> int:
        """Remove monitoring runs and their results (retention, ``driftloop gc``)."""
        from sqlalchemy import delete

        if not run_ids:
            return 0
        with self.session() as s:
            s.execute(delete(MonitoringResultRow).where(MonitoringResultRow.run_id.in_(run_ids)))
            return s.execute(delete(MonitoringRunRow).where(MonitoringRunRow.id.in_(run_ids))).rowcount

    def monitoring_results(self, run_id: str) -> list[dict[str, Any]]:
        query = select(MonitoringResultRow).where(MonitoringResultRow.run_id == run_id).order_by(MonitoringResultRow.id)
        with self.session() as s:
            return [{c.key: getattr(r, c.key) for c in MonitoringResultRow.__table__.columns} for r in s.scalars(query)]

    def get_version(self, name: str, version: int) -> ModelVersionRecord:
        with self.session() as s:
            return _model_version(self._version_row(s, name, version))

    def resolve(self, ref: str) -> ModelVersionRecord:
        """The version a reference (``name``, ``name@alias``, ``name:3``) points at."""
        name, alias, version = parse_model_ref(ref)
        with self.session() as s:
            if alias is not None:
                row = s.get(AliasRow, (name, alias))
                if row is None:
                    known = list(s.scalars(select(ModelRow.name).order_by(ModelRow.name)))
                    hint = f"models: {', '.join(known)}" if known else "no models registered yet; run driftloop train"
                    raise ModelNotFound(f"model {name!r} has no {alias!r} alias ({hint})")
                version = row.version
            assert version is not None
            return _model_version(self._version_row(s, name, version))

    def find_alias(self, name: str, alias: str) -> ModelVersionRecord | None:
        try:
            return self.resolve(f"{name}@{alias}")
        except ModelNotFound:
            return None

    def list_models(self) -> list[str]:
        with self.session() as s:
            return list(s.scalars(select(ModelRow.name).order_by(ModelRow.name)))

    def list_versions(self, name: str | None = None) -> list[ModelVersionRecord]:
        query = select(ModelVersionRow).order_by(ModelVersionRow.model_name, ModelVersionRow.version.desc())
        if name:
            query = query.where(ModelVersionRow.model_name == name)
        with self.session() as s:
            return [_model_version(r) for r in s.scalars(query)]

    def aliases(self, name: str) -> dict[str, int]:
        with self.session() as s:
            rows = s.scalars(select(AliasRow).where(AliasRow.model_name == name))
            return {r.alias: r.version for r in rows}

    def alias_history(self, name: str) -> list[AliasEvent]:
        query = select(AliasEventRow).where(AliasEventRow.model_name == name).order_by(AliasEventRow.id)
        with self.session() as s:
            return [
                AliasEvent.model_validate({c.key: getattr(r, c.key) for c in AliasEventRow.__table__.columns if c.key != "id"})
                for r in s.scalars(query)
            ]

    def promote(self, name: str, version: int, *, actor: str, reason: str, expected_champion: int | None | _Any = ANY) -> None:
        """Point ``champion`` at ``version`` and, if ``challenger`` pointed there, drop it:
        one transaction, one history entry per moved alias. ``expected_champion`` (a
        version, or None for "no champion yet") makes it a compare-and-swap: if the
        champion is not that version any more, nothing moves and :class:`ChampionChanged`
        is raised (the challenger was judged against a champion that is gone). A version
        whose reference or card is missing (a training that died half-way) is refused:
        :class:`IncompleteVersion`."""
        with self.session() as s:
            self._locked_model(s, name)
            _check_complete(self._version_row(s, name, version), "champion")
            self._check_champion(s, name, expected_champion, f"v{version} was judged against")
            self._move_alias(s, name, "champion", version, actor, reason)
            for alias in ("challenger", "candidate"):
                row = s.get(AliasRow, (name, alias))
                if row is not None and row.version == version:
                    self._move_alias(s, name, alias, None, actor, f"promoted to champion: {reason}")

    # --- rollout --------------------------------------------------------------------------

    def apply_rollout_decision(self, record: RolloutDecisionRecord, *, expected_champion: int | None,
                               expected_candidate: int | None) -> RolloutDecisionRecord:
        """Store a rollout decision and move the aliases it calls for, in one transaction
        under the model's row lock (the same lock as :meth:`promote` and :meth:`rollback`):
        a compare-and-swap on both the champion and the candidate seen when the rows were
        compared. If either moved meanwhile, nothing moves and :class:`ChampionChanged` is
        raised. ``promote``: the candidate becomes champion (complete versions only);
        ``reject``: the candidate alias is removed; ``rollback``: the champion goes back to
        the version it replaced. Reject and rollback hold the retrain cooldown."""
        now = utcnow()
        with self.session() as s:
            self._locked_model(s, record.model_name)
            name = record.model_name
            self._check_champion(s, name, expected_champion, "the rollout was judged against")
            candidate = s.get(AliasRow, (name, "candidate"))
            found = candidate.version if candidate is not None else None
            if found != expected_candidate:
                raise ChampionChanged(
                    f"{name}: the candidate is {f'v{found}' if found else 'gone'} now, not "
                    f"{f'v{expected_candidate}' if expected_candidate else 'none'}; nothing moved: look again "
                    f"(driftloop rollout status --model {name})")
            actor, why = record.actor, f"rollout {record.phase}: {record.reason}"
            if record.verdict == "promote":
                _check_complete(self._version_row(s, name, record.shadow_version), "champion")
                self._move_alias(s, name, "champion", record.shadow_version, actor, why)
                self._move_alias(s, name, "candidate", None, actor, f"promoted to champion: {why}")
            elif record.verdict == "reject":
                self._move_alias(s, name, "candidate", None, actor, why)
                self._hold_cooldown(s, name, actor, "rejected", now)
            elif record.verdict == "rollback":
                _check_complete(self._version_row(s, name, record.shadow_version), "champion")
                self._move_alias(s, name, "champion", record.shadow_version, actor, f"{_ROLLBACK}{why}")
                self._hold_cooldown(s, name, actor, "rolled back", now)
            stored = record.model_copy(update={"created_at": now,
                                               "applied": record.verdict in ("promote", "reject", "rollback")})
            s.add(RolloutDecisionRow(**stored.model_dump()))
            return stored

    def _hold_cooldown(self, s: Session, name: str, holder: str, outcome: str, now: datetime) -> None:
        """Start the retrain cooldown now, as a finished retrain would (unless a retrain
        holds the lease: it ends with its own outcome)."""
        lease = s.get(RetrainLeaseRow, name)
        if lease is not None:
            if lease.finished_at is None and lease.expires_at > now:
                return
            s.delete(lease)
            s.flush()
        s.add(RetrainLeaseRow(model_name=name, holder=holder[:200], acquired_at=now, expires_at=now,
                              finished_at=now, outcome=outcome))

    def list_rollout_decisions(self, name: str, *, limit: int | None = None) -> list[RolloutDecisionRecord]:
        """The model's rollout decisions, newest first."""
        query = (select(RolloutDecisionRow).where(RolloutDecisionRow.model_name == name)
                 .order_by(RolloutDecisionRow.id.desc()))
        if limit:
            query = query.limit(limit)
        with self.session() as s:
            return [RolloutDecisionRecord.model_validate(
                {c.key: getattr(r, c.key) for c in RolloutDecisionRow.__table__.columns if c.key != "id"})
                for r in s.scalars(query)]

    def rollback(self, name: str, *, actor: str, reason: str, expected_champion: int | None | _Any = ANY) -> int:
        """Point ``champion`` back at the version it held before the current champion was
        promoted. Repeated rollbacks keep walking back. Under the model's row lock, as
        promotions are: a promotion committing meanwhile is either seen whole or waits.
        ``expected_champion``: the version being rolled back (compare-and-swap, as
        :meth:`promote`)."""
        with self.session() as s:
            self._locked_model(s, name)
            self._check_champion(s, name, expected_champion, "the version to roll back")
            current = s.get(AliasRow, (name, "champion"))
            if current is None:
                raise ModelNotFound(f"model {name!r} has no champion to roll back")
            last_move = s.scalars(
                select(AliasEventRow)
                .where(AliasEventRow.model_name == name, AliasEventRow.alias == "champion",
                       AliasEventRow.to_version == current.version,
                       # A rollback walks back through promotions, not through rollbacks.
                       AliasEventRow.reason.not_like(f"{_ROLLBACK}%"))
                .order_by(AliasEventRow.id.desc())
                .limit(1)
            ).first()
            previous = last_move.from_version if last_move is not None else None
            if previous is None:
                raise DriftloopError(
                    f"model {name!r}: champion v{current.version} was the first champion; nothing to roll back to "
                    f"(promote a version instead: driftloop models promote {name} VERSION)"
                )
            _check_complete(self._version_row(s, name, previous), "champion")
            self._move_alias(s, name, "champion", previous, actor, f"{_ROLLBACK}{reason}")
            return previous

    def _check_champion(self, s: Session, name: str, expected: int | None | _Any, what: str) -> None:
        """Compare: raise :class:`ChampionChanged` unless the champion is ``expected``."""
        if isinstance(expected, _Any):
            return
        current = s.get(AliasRow, (name, "champion"))
        found = current.version if current is not None else None
        if found != expected:
            shown = f"v{expected}" if expected is not None else "no champion"
            raise ChampionChanged(
                f"{name}: the champion is v{found} now, not {shown} ({what}); nothing moved: "
                "look again (driftloop models show " + name + ") and decide again (retrain, or promote by hand after review)"
            )

    # --- scoring runs ---------------------------------------------------------------

    def add_scoring_run(self, record: ScoringRunRecord) -> None:
        if record.rows_in != record.rows_scored + record.rows_quarantined:
            raise ValueError(f"scoring run {record.id}: rows_in != rows_scored + rows_quarantined")
        with self.session() as s:
            s.add(ScoringRunRow(**record.model_dump()))

    def set_scoring_export(self, run_id: str, uri: str) -> None:
        from driftloop.redact import mask_uri

        with self.session() as s:
            row = s.get(ScoringRunRow, run_id)
            if row is None:
                raise KeyError(run_id)
            row.export_uri = mask_uri(uri)

    def get_scoring_run(self, run_id: str) -> ScoringRunRecord | None:
        with self.session() as s:
            row = s.get(ScoringRunRow, run_id)
            return None if row is None else _scoring_run(row)

    def list_scoring_runs(self, model_name: str | None = None) -> list[ScoringRunRecord]:
        query = select(ScoringRunRow).order_by(ScoringRunRow.finished_at.desc())
        if model_name:
            query = query.where(ScoringRunRow.model_name == model_name)
        with self.session() as s:
            return [_scoring_run(r) for r in s.scalars(query)]

    def _version_row(self, s: Session, name: str, version: int) -> ModelVersionRow:
        row = s.scalars(
            select(ModelVersionRow).where(ModelVersionRow.model_name == name, ModelVersionRow.version == version)
        ).first()
        if row is None:
            latest = s.scalar(select(func.max(ModelVersionRow.version)).where(ModelVersionRow.model_name == name))
            hint = f"latest is {latest}" if latest else "no versions registered"
            raise ModelNotFound(f"model {name!r} has no version {version} ({hint})")
        return row

    def _move_alias(self, s: Session, name: str, alias: str, version: int | None, actor: str, reason: str) -> None:
        if alias not in ALIASES:
            raise DriftloopError(f"alias {alias!r} is not one of {', '.join(ALIASES)}")
        row = s.get(AliasRow, (name, alias), with_for_update=True)
        before = row.version if row is not None else None
        if before == version:
            return
        now = utcnow()
        if version is None:
            s.delete(row)
        elif row is None:
            s.add(AliasRow(model_name=name, alias=alias, version=version, updated_at=now))
        else:
            row.version, row.updated_at = version, now
        s.add(AliasEventRow(model_name=name, alias=alias, from_version=before, to_version=version,
                            actor=actor, reason=reason, created_at=now))
        if alias == "champion":
            s.info.setdefault(_CHAMPION_MOVED, set()).add(name)


def _check_complete(row: ModelVersionRow, alias: str) -> None:
    """An alias points only at a version whose reference and card exist (training writes
    them after registering; a crash in between leaves the version without them)."""
    missing = [what for what, uri in (("monitoring reference", row.reference_uri), ("model card", row.card_uri)) if not uri]
    if missing:
        raise IncompleteVersion(
            f"{row.model_name} v{row.version} has no {' and no '.join(missing)}: its training did not finish, so it "
            f"cannot become {alias}; train again (driftloop train / retrain) or pick another version "
            f"(driftloop models list)"
        )


def _scoring_run(row: ScoringRunRow) -> ScoringRunRecord:
    return ScoringRunRecord.model_validate({c.key: getattr(row, c.key) for c in ScoringRunRow.__table__.columns})


def _dataset(row: DatasetRow) -> DatasetRecord:
    data = {c.key: getattr(row, c.key) for c in DatasetRow.__table__.columns}
    return DatasetRecord.model_validate(data)


def _model_version(row: ModelVersionRow) -> ModelVersionRecord:
    data = {c.key: getattr(row, c.key) for c in ModelVersionRow.__table__.columns if c.key != "id"}
    return ModelVersionRecord.model_validate(data)


def utcnow() -> datetime:
    return datetime.now(UTC)


_opened: dict[str, RegistryStore] = {}


def open_registry(url: str) -> RegistryStore:
    """Connect to the registry at ``url``, upgrading its schema to this release's head.
    One store per URL and process."""
    if url in _opened:
        return _opened[url]
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    from driftloop.settings import get_settings

    engine = create_registry_engine(url, lock_timeout_s=get_settings().registry_lock_timeout_s)
    try:
        migrate.upgrade(engine)
    except OperationalError as exc:
        engine.dispose()
        raise open_error(url, exc) from None
    store = RegistryStore(engine)
    from driftloop.channel import publish_on_champion_move

    store.champion_listeners.append(publish_on_champion_move)  # publishes only where a signing key is configured
    _opened[url] = store
    return store
