"""Ingestion: read a file (CSV/Parquet, local or fsspec URI) or a SQL table/query into
polars, hash its content, and snapshot the validated rows as a registered dataset."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import polars as pl
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel, Field, SecretStr, model_validator
from sqlalchemy import MetaData, Table, create_engine, inspect, select, text
from sqlalchemy.exc import (
    DBAPIError,
    NoSuchTableError,
    OperationalError,
    ProgrammingError,
    SQLAlchemyError,
)

from driftloop.errors import RejectLimitExceeded, SourceError
from driftloop.inputs import malformed_frame, read_input
from driftloop.registry.store import DatasetRecord, RegistryStore, utcnow
from driftloop.registry.urls import masked_url
from driftloop.spec import DatasetSpec
from driftloop.storage import ArtifactStore
from driftloop.tasks.validate import ValidationResult, validate_rows

logger = logging.getLogger(__name__)

class SqlSource(BaseModel):
    """A table or a parameterised query in a SQL database. Give the connection URL
    directly, by environment variable, or by the name of a Prefect Secret block."""

    url: SecretStr | None = Field(default=None, description="SQLAlchemy URL (may hold a password).")
    url_env: str | None = Field(default=None, description="Environment variable holding the URL.")
    secret_block: str | None = Field(default=None, description="Prefect Secret block holding the URL.")
    table: str | None = Field(default=None, description="Table name, optionally schema.table.")
    query: str | None = Field(default=None, description="SELECT with :named parameters.")
    params: dict[str, str | int | float | bool | None] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_of_each(self) -> SqlSource:
        given = [k for k in ("url", "url_env", "secret_block") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of url, url_env or secret_block for a SQL source")
        if bool(self.table) == bool(self.query):
            raise ValueError("give exactly one of table or query for a SQL source")
        return self

    def resolve_url(self) -> str:
        if self.url is not None:
            return self.url.get_secret_value()
        if self.url_env:
            value = os.environ.get(self.url_env)
            if not value:
                raise SourceError(
                    f"environment variable {self.url_env} is not set; export it with the "
                    "database URL (e.g. postgresql+psycopg://user:pass@host/db)"
                )
            return value
        from prefect.blocks.system import Secret

        try:
            return str(Secret.load(self.secret_block).get())
        except ValueError as exc:
            raise SourceError(
                f"Prefect Secret block {self.secret_block!r} cannot be loaded ({exc}); "
                f"create it with: prefect block create secret, named {self.secret_block}"
            ) from None

    def describe(self, url: str) -> str:
        what = f"table {self.table}" if self.table else "query"
        return f"{masked_url(url)} ({what})"


@dataclass
class RawBatch:
    """Rows as read, before validation, plus what the reader could not parse."""

    frame: pl.DataFrame
    malformed: pl.DataFrame
    source: str
    content_hash: str

    @property
    def rows_in(self) -> int:
        return self.frame.height + self.malformed.height


# --- files -------------------------------------------------------------------------


def read_file(uri: str) -> RawBatch:
    """Read a CSV or Parquet file, or a directory or glob of them, from a path or fsspec
    URI (read once, hashed as read) through the project's one input reader."""
    raw = read_input(uri)
    return RawBatch(frame=raw.frame, malformed=raw.malformed, source=raw.source, content_hash=raw.content_hash)


# --- SQL ---------------------------------------------------------------------------


_DOLLAR_QUOTE = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")


def _statements(query: str, *, backslash: bool, dollar: bool, nested: bool) -> int:
    """Statements in ``query`` under one set of quoting rules: ``;`` outside strings,
    quoted identifiers and comments ends one; a piece holding only comments is none."""
    count, content, i, n = 0, False, 0, len(query)
    while i < n:
        c = query[i]
        if c == ";":
            count, content, i = count + content, False, i + 1
        elif c.isspace():
            i += 1
        elif query.startswith("--", i):
            end = query.find("\n", i)
            i = n if end < 0 else end + 1
        elif query.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if nested and query.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif query.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        else:
            content = True
            dollar_quote = _DOLLAR_QUOTE.match(query, i) if dollar and c == "$" else None
            if c in "'\"`":
                i += 1
                while i < n:
                    escaped = backslash and query[i] == "\\"
                    if escaped or (query[i] == c and query.startswith(c, i + 1)):  # or a doubled quote
                        i += 2
                    elif query[i] == c:
                        i += 1
                        break
                    else:
                        i += 1
            elif dollar_quote and not (i and (query[i - 1].isalnum() or query[i - 1] == "_")):
                tag = dollar_quote.group(0)
                end = query.find(tag, dollar_quote.end())
                i = n if end < 0 else end + len(tag)
            else:
                i += 1
    return count + content


def count_statements(query: str) -> int:
    """How many SQL statements ``query`` holds, the most any dialect's quoting rules give
    (backslash escapes or not, PostgreSQL's dollar quotes or not, nested block comments or
    not): a query that is one statement in one dialect and two in another counts as two."""
    return max(_statements(query, backslash=b, dollar=d, nested=m)
               for b in (False, True) for d in (False, True) for m in (False, True))


def _extended_protocol(engine: Any) -> None:
    """Make psycopg send every statement with the extended protocol (prepared): the
    simple protocol it uses for a query without parameters runs several statements, and
    ``SELECT 1; COMMIT; DELETE ...`` would commit its delete despite the read-only
    transaction. A prepared statement is exactly one statement."""
    from sqlalchemy import event

    @event.listens_for(engine, "do_execute")
    def _prepared(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        cursor.execute(statement, parameters, prepare=True)
        return True

    @event.listens_for(engine, "do_execute_no_params")
    def _prepared_no_params(cursor: Any, statement: str, context: Any) -> bool:
        cursor.execute(statement, prepare=True)
        return True


_READ_ONLY_REFUSAL = re.compile(r"read-only transaction|readonly database|read only", re.IGNORECASE)


def _read_only(conn: Any, label: str) -> None:
    """Make this connection's reads a read-only transaction: a query from a block or the
    command line must not be able to change the source."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        conn.exec_driver_sql("SET TRANSACTION READ ONLY")
    elif dialect == "sqlite":
        conn.exec_driver_sql("PRAGMA query_only = ON")
    elif dialect in ("mysql", "mariadb"):
        conn.exec_driver_sql("SET SESSION TRANSACTION READ ONLY")
    else:
        logger.warning("SQL source %s: %s has no read-only mode driftloop knows; use a read-only database user",
                       label, dialect)


def read_sql(source: SqlSource) -> RawBatch:
    """The rows of a table or of one query, read in a read-only transaction. A query
    holding more than one statement is refused before anything connects; on PostgreSQL
    every statement goes with the extended protocol, which runs exactly one."""
    url = source.resolve_url()
    label = source.describe(url)
    if source.query and (statements := count_statements(source.query)) > 1:
        raise SourceError(f"SQL source {label}: the query holds more than one statement ({statements}); "
                          "give one SELECT (a ';' may end it)")
    try:
        engine = create_engine(url)
    except (SQLAlchemyError, ValueError, ImportError) as exc:
        raise SourceError(f"SQL source {masked_url(url)}: invalid URL or missing driver: {exc}") from None
    if engine.dialect.driver == "psycopg":
        _extended_protocol(engine)
    try:
        with engine.connect() as conn:
            _read_only(conn, label)
            if source.table:
                schema, _, name = source.table.rpartition(".")
                if not inspect(conn).has_table(name, schema=schema or None):
                    found = inspect(conn).get_table_names(schema=schema or None)
                    raise SourceError(
                        f"SQL source {label}: table {source.table!r} does not exist; "
                        f"tables found: {', '.join(found) or '(none)'}"
                    )
                statement = select(Table(name, MetaData(), schema=schema or None, autoload_with=conn))
            else:
                statement = text(source.query or "").bindparams(**source.params)
            frame = pl.read_database(statement, conn, infer_schema_length=None)
    except DBAPIError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        if _READ_ONLY_REFUSAL.search(reason):
            raise SourceError(
                f"SQL source {label}: the query tries to write ({reason}); sources are read in a read-only "
                "transaction and nothing was changed: give a SELECT"
            ) from None
        if not isinstance(exc, OperationalError):
            raise SourceError(f"SQL source {label}: {reason}") from None
        raise SourceError(
            f"SQL source {label}: cannot connect or query: {reason}; check the host, port, "
            "credentials and that the database is running"
        ) from None
    except (NoSuchTableError, ProgrammingError) as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        raise SourceError(f"SQL source {label}: {reason}") from None
    finally:
        engine.dispose()
    if frame.height == 0:
        raise SourceError(f"SQL source {label} returned no rows; nothing to ingest")
    return RawBatch(frame, malformed_frame([]), label, frame_content_hash(frame))


def frame_content_hash(frame: pl.DataFrame) -> str:
    """sha256 of the frame's column names, types and values (Arrow IPC, uncompressed)."""
    buffer = io.BytesIO()
    frame.write_ipc(buffer, compression="uncompressed")
    return hashlib.sha256(buffer.getvalue()).hexdigest()


# --- datasets ----------------------------------------------------------------------


def dataset_id_for(batch: RawBatch, spec: DatasetSpec, *, labelled: bool) -> str:
    """Same content, spec and labelling give the same dataset id."""
    key = f"{batch.content_hash}:{spec.fingerprint()}:{int(labelled)}"
    return "ds_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def dataset_dir(spec: DatasetSpec, dataset_id: str) -> str:
    return f"datasets/{spec.name}/{dataset_id}"


def write_quarantine(result: ValidationResult, store: ArtifactStore, spec: DatasetSpec, dataset_id: str) -> str | None:
    if result.rows_quarantined == 0:
        return None
    return store.write_parquet(f"{dataset_dir(spec, dataset_id)}/quarantine.parquet", result.quarantine)


def enforce_reject_limit(result: ValidationResult, spec: DatasetSpec, source: str, quarantine_uri: str | None) -> None:
    if result.reject_fraction > spec.max_reject_fraction:
        raise RejectLimitExceeded(
            f"{source}: {result.rows_quarantined} of {result.rows_in} rows "
            f"({result.reject_fraction:.1%}) failed validation, above the spec's "
            f"max_reject_fraction of {spec.max_reject_fraction:.1%}; see the failing column, "
            f"check and value of each row in {quarantine_uri}, then fix the data or the spec",
            quarantine_uri,
        )


def snapshot_dataset(
    result: ValidationResult,
    spec: DatasetSpec,
    *,
    dataset_id: str,
    content_hash: str,
    source: str,
    labelled: bool,
    quarantine_uri: str | None,
    store: ArtifactStore,
    registry: RegistryStore,
) -> tuple[DatasetRecord, bool]:
    """Write the valid rows as Parquet and record the dataset; an existing dataset with
    the same id is returned as it is."""
    existing = registry.get_dataset(dataset_id)
    if existing is not None:
        return existing, False
    snapshot_uri = store.write_parquet(f"{dataset_dir(spec, dataset_id)}/rows.parquet", result.valid)
    record = DatasetRecord(
        id=dataset_id,
        name=spec.name,
        content_hash=content_hash,
        spec_hash=spec.fingerprint(),
        source=source,
        labelled=labelled,
        rows_in=result.rows_in,
        rows_valid=result.rows_valid,
        rows_quarantined=result.rows_quarantined,
        snapshot_uri=snapshot_uri,
        quarantine_uri=quarantine_uri,
        column_types={name: str(dtype) for name, dtype in result.valid.schema.items()},
        created_at=utcnow(),
    )
    return registry.add_dataset(record)


@task(name="read-source", cache_policy=NONE)
def read_source_task(source: str | SqlSource) -> RawBatch:
    return read_sql(source) if isinstance(source, SqlSource) else read_file(source)


@task(name="validate", cache_policy=NONE)
def validate_task(raw: pl.DataFrame, spec: DatasetSpec, labelled: bool, source: str) -> ValidationResult:
    return validate_rows(raw, spec, labelled=labelled, source=source)


@task(name="write-quarantine", cache_policy=NONE)
def write_quarantine_task(result: ValidationResult, store: ArtifactStore, spec: DatasetSpec, dataset_id: str) -> str | None:
    return write_quarantine(result, store, spec, dataset_id)


@task(name="snapshot-dataset", cache_policy=NONE)
def snapshot_dataset_task(result: ValidationResult, spec: DatasetSpec, **kwargs: object) -> tuple[DatasetRecord, bool]:
    return snapshot_dataset(result, spec, **kwargs)  # type: ignore[arg-type]


def load_dataset(registry: RegistryStore, dataset_id: str) -> tuple[DatasetRecord, pl.DataFrame]:
    from driftloop.storage import read_parquet

    record = registry.get_dataset(dataset_id)
    if record is None:
        known = [d.id for d in registry.list_datasets()[:5]]
        raise SourceError(
            f"dataset {dataset_id} is not registered; recent datasets: {', '.join(known) or '(none)'} "
            "(list them with: driftloop datasets list)"
        )
    if not record.labelled:
        raise SourceError(f"dataset {dataset_id} was ingested without labels (--unlabelled); it cannot train a model")
    return record, read_parquet(record.snapshot_uri)


@task(name="load-dataset", cache_policy=NONE)
def load_dataset_task(registry: RegistryStore, dataset_id: str) -> tuple[DatasetRecord, pl.DataFrame]:
    return load_dataset(registry, dataset_id)
