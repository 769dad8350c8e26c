"""Reading and writing the registry. Callers get plain records, never ORM objects."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from driftloop.errors import RegistryError
from driftloop.registry import schema
from driftloop.registry.tables import DatasetRow


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


def masked_url(url: str) -> str:
    """The URL with any password replaced by ***, safe to log and show."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL: show only its scheme
        return url.split("://", 1)[0] + "://***"


def create_registry_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy, not the driver, decide when transactions begin (see below).
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # IMMEDIATE takes the write lock up front: concurrent writers queue on the
            # busy timeout instead of failing with "database is locked" mid-transaction.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    connect_args = {"connect_timeout": 10} if parsed.get_backend_name() == "postgresql" else {}
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


class RegistryStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

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


def _dataset(row: DatasetRow) -> DatasetRecord:
    data = {c.key: getattr(row, c.key) for c in DatasetRow.__table__.columns}
    if data["created_at"].tzinfo is None:  # SQLite drops the zone; we always store UTC
        data["created_at"] = data["created_at"].replace(tzinfo=UTC)
    return DatasetRecord.model_validate(data)


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
    engine = create_registry_engine(url)
    try:
        schema.upgrade(engine)
    except OperationalError as exc:
        engine.dispose()
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise RegistryError(
            f"cannot open the registry database {masked_url(url)}: {reason}; "
            "check DRIFTLOOP_REGISTRY_URL (host, port, credentials) or DRIFTLOOP_HOME"
        ) from None
    store = RegistryStore(engine)
    _opened[url] = store
    return store
