"""SQLAlchemy table definitions. Every change here needs a migration in
``migrations/versions`` (a release must upgrade the previous release's database)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that is timezone-aware UTC on every database. Written: converted to UTC
    (a naive value is taken as UTC). Read: UTC, also from SQLite, which keeps no zone and
    gives back naive values. Every timestamp column uses it; the DDL is the plain
    ``DateTime(timezone=True)`` the migrations create."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class DatasetRow(Base):
    """A validated dataset: the valid rows' snapshot and where its rejects went."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # A spec's name (up to 64) plus a suffix: <name>.labels, <name>.window.
    name: Mapped[str] = mapped_column(String(128), index=True)
    content_hash: Mapped[str] = mapped_column(String(64))
    spec_hash: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(Text)
    labelled: Mapped[bool]
    rows_in: Mapped[int] = mapped_column(Integer)
    rows_valid: Mapped[int] = mapped_column(Integer)
    rows_quarantined: Mapped[int] = mapped_column(Integer)
    snapshot_uri: Mapped[str] = mapped_column(Text)
    quarantine_uri: Mapped[str | None] = mapped_column(Text)
    column_types: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class ModelRow(Base):
    """One row per model name: the version counter, locked while a version is allocated."""

    __tablename__ = "models"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    latest_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class ModelVersionRow(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_name", "version", name="uq_model_versions_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(String(64), ForeignKey("models.name"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    algorithm: Mapped[str] = mapped_column(String(32))
    task: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    segment_metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    seed: Mapped[int] = mapped_column(Integer)
    dataset_id: Mapped[str] = mapped_column(String(32))
    dataset_hash: Mapped[str] = mapped_column(String(64))
    spec_hash: Mapped[str] = mapped_column(String(64))
    split: Mapped[dict[str, Any]] = mapped_column(JSON)
    library_versions: Mapped[dict[str, Any]] = mapped_column(JSON)
    onnx_uri: Mapped[str] = mapped_column(Text)
    onnx_sha256: Mapped[str] = mapped_column(String(64))
    gate: Mapped[dict[str, Any]] = mapped_column(JSON)
    parity: Mapped[dict[str, Any]] = mapped_column(JSON)
    card_uri: Mapped[str | None] = mapped_column(Text)
    reference_uri: Mapped[str | None] = mapped_column(Text)
    reference_sha256: Mapped[str | None] = mapped_column(String(64))
    trigger: Mapped[str] = mapped_column(String(32), default="manual")
    window: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    forms: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class RetrainLeaseRow(Base):
    """Who is retraining a model, since when, and how the last retrain ended: at most
    one retrain per model runs, and a finished one holds the cooldown."""

    __tablename__ = "retrain_leases"

    model_name: Mapped[str] = mapped_column(String(64), ForeignKey("models.name"), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    acquired_at: Mapped[datetime] = mapped_column(UtcDateTime())
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(32), nullable=True)


class AliasRow(Base):
    __tablename__ = "aliases"

    model_name: Mapped[str] = mapped_column(String(64), ForeignKey("models.name"), primary_key=True)
    alias: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


class AliasEventRow(Base):
    """Every alias move: who or what moved it, from which version to which, and why."""

    __tablename__ = "alias_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(String(64), index=True)
    alias: Mapped[str] = mapped_column(String(32))
    from_version: Mapped[int | None] = mapped_column(Integer)
    to_version: Mapped[int | None] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class ScoringRunRow(Base):
    """One batch-scoring run: which model scored what, and the row accounting."""

    __tablename__ = "scoring_runs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64), index=True)
    model_version: Mapped[int] = mapped_column(Integer)
    onnx_sha256: Mapped[str] = mapped_column(String(64))
    input_uri: Mapped[str] = mapped_column(Text)
    output_uri: Mapped[str] = mapped_column(Text)
    quarantine_uri: Mapped[str | None] = mapped_column(Text)
    rows_in: Mapped[int] = mapped_column(Integer)
    rows_scored: Mapped[int] = mapped_column(Integer)
    rows_quarantined: Mapped[int] = mapped_column(Integer)
    form: Mapped[str | None] = mapped_column(String(16), nullable=True)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime())
    finished_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # The predictions table's snapshot this run committed (None: scored before the tables,
    # or an edge run that wrote only an export), the input it replaces on a re-run, and the
    # plain Parquet export it wrote for consumers (if asked).
    snapshot_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    input_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    export_uri: Mapped[str | None] = mapped_column(Text, nullable=True)


class MonitoringRunRow(Base):
    __tablename__ = "monitoring_runs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64), index=True)
    model_version: Mapped[int] = mapped_column(Integer)
    analysis_uri: Mapped[str] = mapped_column(Text)
    labels_uri: Mapped[str | None] = mapped_column(Text)
    decision: Mapped[dict[str, Any]] = mapped_column(JSON)
    event: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    report_uri: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    snapshots: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # table -> snapshot id read


class MonitoringResultRow(Base):
    """One number of a monitoring run: a chunk, a feature or metric, a method."""

    __tablename__ = "monitoring_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(36), ForeignKey("monitoring_runs.id"), index=True)
    chunk_index: Mapped[int] = mapped_column(Integer)
    chunk_key: Mapped[str] = mapped_column(String(100))
    chunk_start: Mapped[str | None] = mapped_column(String(40))
    chunk_end: Mapped[str | None] = mapped_column(String(40))
    kind: Mapped[str] = mapped_column(String(20))  # univariate, multivariate, estimated, realized
    name: Mapped[str] = mapped_column(String(100))  # feature or metric
    method: Mapped[str] = mapped_column(String(40))
    value: Mapped[float | None]
    lower_threshold: Mapped[float | None]
    upper_threshold: Mapped[float | None]
    alert: Mapped[bool]


class RolloutDecisionRow(Base):
    """One look at a rollout (shadow: candidate vs champion; guard: new champion vs the one
    it replaced) on the rows both scored and labelled: the figures and the verdict."""

    __tablename__ = "rollout_decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(String(64), index=True)
    phase: Mapped[str] = mapped_column(String(16))  # shadow, guard
    verdict: Mapped[str] = mapped_column(String(16))  # waiting, promote, reject, rollback, settled
    applied: Mapped[bool]  # the aliases moved as the verdict says (False: waiting, or refused)
    served_version: Mapped[int] = mapped_column(Integer)
    shadow_version: Mapped[int] = mapped_column(Integer)
    metric: Mapped[str] = mapped_column(String(32))
    rows_scored_by_both: Mapped[int] = mapped_column(Integer)
    rows_labelled: Mapped[int] = mapped_column(Integer)
    served_metric: Mapped[float | None]
    shadow_metric: Mapped[float | None]
    difference: Mapped[float | None]  # contender minus incumbent, oriented: positive = contender better
    lower: Mapped[float | None]
    upper: Mapped[float | None]
    confidence: Mapped[float]
    reason: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # The table snapshots read: the decision's rows can be read again exactly.
    predictions_snapshot: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    labels_snapshot: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
