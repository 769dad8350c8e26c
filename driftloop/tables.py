"""The loop's memory: every scored row and every registered label, in Apache Iceberg
tables that only grow, that any engine with an Iceberg catalog reads, and whose every
past state (snapshot) can be read again exactly.

Per model, two tables, in an SQL catalog kept in the registry's own database (its
``iceberg_tables`` and ``iceberg_namespace_properties`` tables, made by migration 0009):

- ``predictions.<model>``: one row per scored row (id, timestamp, segment, features,
  prediction, probabilities, model name and version, scoring form, scored_at, scoring
  run id, input key, role). Partitioned by model version and month of the timestamp, so
  a window by time and a version prune whole files.
- ``labels.<model>``: one row per registered label (id, target, label timestamp,
  registered_at, source, registration id). The latest registration of an id wins.

A commit is one transaction in the registry database: atomic on a local disk and on any
object store, with no conditional PUT or lock table. A writer that loses a race to
another commit retries on the new state (pyiceberg's retry, ``commit.retry.*``). Data
files are written before the commit; a crash leaves them unreferenced (orphans) and the
table at its previous snapshot; ``driftloop gc`` removes orphans after a grace period.
"""

from __future__ import annotations

import itertools
import logging
import threading
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from driftloop.errors import DriftloopError
from driftloop.outputs import DICTIONARY_LIMIT_BYTES

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions"
LABELS = "labels"
CATALOG_NAME = "driftloop"
WAREHOUSE_DIR = "tables"  # under the artifact root

Role = Literal["served", "shadow"]
SERVED: Role = "served"
SHADOW: Role = "shadow"  # a second model's scores of the same rows (driftloop.rollout); never served

# Columns every predictions row carries besides the spec's id, timestamp, segment and features.
MODEL_NAME = "model_name"
MODEL_VERSION = "model_version"
FORM = "scoring_form"
SCORED_AT = "scored_at"
SCORING_RUN = "scoring_run_id"
INPUT_KEY = "input_key"
ROLE = "role"
# Labels rows besides the spec's id and target.
LABEL_TIMESTAMP = "label_timestamp"
REGISTERED_AT = "registered_at"
SOURCE = "source"
REGISTRATION = "registration_id"

TABLE_PROPERTIES = {
    "commit.retry.num-retries": "20",
    "commit.retry.min-wait-ms": "50",
    "commit.retry.max-wait-ms": "2000",
    "commit.retry.total-timeout-ms": "120000",
    "write.parquet.compression-codec": "zstd",
    # A column's dictionary stops at 32 KiB and the rest of it is written plain, as in
    # edge parts (driftloop.outputs). With pyiceberg's 2 MiB the float features of a 100k-row batch (all distinct) were
    # dictionary-encoded whole: 183 ms a batch and 19.5 MB, against 48-59 ms and 15.5 MB
    # (bench/scoring.py's table stage). Low-cardinality columns (tags, categories) keep
    # their dictionary.
    "write.parquet.dict-size-bytes": str(DICTIONARY_LIMIT_BYTES),
    # Whole values in the file statistics of the columns a commit or a read filters on
    # by equality (the default truncates strings to 16 characters, and input keys and run
    # ids share longer prefixes: a replace would then read every earlier data file).
    f"write.metadata.metrics.column.{INPUT_KEY}": "full",
    f"write.metadata.metrics.column.{SCORING_RUN}": "full",
    f"write.metadata.metrics.column.{REGISTRATION}": "full",
}


class TableError(DriftloopError):
    """A predictions or labels table cannot be written or read."""


def _silence_expected_warnings() -> None:
    """pyiceberg and polars warn about what is expected here: a replace whose delete
    matched nothing (a first run), polars planning the scan with pyiceberg (its optional
    planner plugin is not installed). Scans run in polars' threads, so the filter is
    process-wide; it is set when tables are opened, never on import."""
    warnings.filterwarnings("ignore", message="Delete operation did not match any records")
    warnings.filterwarnings("ignore", message=".*polars_iceberg.*")


def _catalog_class() -> type:
    from pyiceberg.catalog import MetastoreCatalog
    from pyiceberg.catalog.sql import SqlCatalog

    class RegistryCatalog(SqlCatalog):
        """pyiceberg's SQL catalog on the registry's own engine (its SQLite lock wait,
        PostgreSQL reconnects), on tables that a registry migration made."""

        def __init__(self, engine: Engine, warehouse: str) -> None:
            MetastoreCatalog.__init__(
                self, CATALOG_NAME, uri="registry", warehouse=warehouse,
                **{"py-io-impl": "pyiceberg.io.fsspec.FsspecFileIO"},
            )
            self.engine = engine
            self._schema_version = "v1"

    return RegistryCatalog


_catalogs: dict[tuple[int, str], Any] = {}
_catalogs_lock = threading.Lock()


def warehouse_uri(artifact_root: str) -> str:
    root = artifact_root.rstrip("/")
    if "://" not in root:
        root = "file://" + root
    return f"{root}/{WAREHOUSE_DIR}"


def catalog(engine: Engine, artifact_root: str) -> Any:
    """The Iceberg catalog of the registry at ``engine``, its tables under
    ``<artifact root>/tables``. One per engine and root, per process."""
    key = (id(engine), artifact_root)
    with _catalogs_lock:
        if key not in _catalogs:
            _catalogs[key] = _catalog_class()(engine, warehouse_uri(artifact_root))
        return _catalogs[key]


def identifier(namespace: str, model: str) -> str:
    return f"{namespace}.{model}"


def _iceberg_schema(arrow_schema: pa.Schema) -> Any:
    from pyiceberg.io.pyarrow import _ConvertToIcebergWithoutIDs, visit_pyarrow
    from pyiceberg.schema import assign_fresh_schema_ids

    return assign_fresh_schema_ids(visit_pyarrow(arrow_schema, _ConvertToIcebergWithoutIDs()))


def _partition_spec(schema: Any, fields: list[tuple[str, str]]) -> Any:
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.transforms import IdentityTransform, MonthTransform

    transforms = {"identity": IdentityTransform(), "month": MonthTransform()}
    parts = []
    for n, (column, transform) in enumerate(fields):
        source = schema.find_field(column)
        name = column if transform == "identity" else f"{column}_{transform}"
        parts.append(PartitionField(source_id=source.field_id, field_id=1000 + n, transform=transforms[transform], name=name))
    return PartitionSpec(*parts)


def to_arrow(frame: pl.DataFrame) -> pa.Table:
    """Categoricals as plain strings (Iceberg has no dictionary type); everything else
    as polars gives it."""
    casts = [pl.col(c).cast(pl.String) for c, t in frame.schema.items() if isinstance(t, pl.Categorical | pl.Enum)]
    return (frame.with_columns(casts) if casts else frame).to_arrow()


def _conformed(table: Any, data: pa.Table, where: str) -> pa.Table:
    """``data`` in the table's column order and types; a column the table has and the
    data lacks is null."""
    target = table.schema().as_arrow()
    columns = []
    for f in target:
        if f.name in data.column_names:
            column = data.column(f.name)
            if column.type != f.type:
                try:
                    column = column.cast(f.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise TableError(
                        f"{where}: column {f.name!r} is {column.type}, the table {table.name()} holds {f.type}: {exc}; "
                        "a changed column type needs a new model name or a migration of the table"
                    ) from None
            columns.append(column)
        else:
            columns.append(pa.nulls(data.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=target)


def _single_partition(metadata: Any, data: pa.Table) -> Any | None:
    """The partition key of ``data`` when all its rows fall in one partition (a scoring
    batch nearly always does: one model version, one month), read from each source
    column's min and max; None when they may not (or the spec has a transform that
    does not preserve order, or a source column has nulls or is floating)."""
    from pyiceberg.partitioning import PartitionFieldValue, PartitionKey

    spec, schema = metadata.spec(), metadata.schema()
    values = []
    for partition_field in spec.fields:
        name = schema.find_column_name(partition_field.source_id)
        if not partition_field.transform.preserves_order or name is None or name not in data.column_names:
            return None
        column = data.column(name)
        if column.null_count or len(column) == 0 or pa.types.is_floating(column.type):
            return None
        low, high = pc.min_max(column).values()
        ends = partition_field.transform.pyarrow_transform(schema.find_field(partition_field.source_id).field_type)(
            pa.array([low, high], type=column.type)).to_pylist()
        if ends[0] != ends[1]:
            return None
        values.append(PartitionFieldValue(field=partition_field, value=ends[0]))
    return PartitionKey(field_values=values, partition_spec=spec, schema=schema)


def _data_files(table: Any, data: pa.Table, *, write_uuid: uuid.UUID, counter: itertools.count) -> list[Any]:  # type: ignore[type-arg]
    """Write ``data`` as the table's data files. pyiceberg's own path filters every batch
    into a copy per partition, one partition or many (~15-20 ms a 100k-row batch of 24
    columns, bench/scoring.py's table stage); a batch in one partition is written as it
    is, with the same key, files and statistics. Anything else takes pyiceberg's path."""
    from pyiceberg.io.pyarrow import (
        _dataframe_to_data_files,
        bin_pack_arrow_table,
        pyarrow_to_schema,
        write_file,
    )
    from pyiceberg.table import DOWNCAST_NS_TIMESTAMP_TO_US_ON_WRITE, TableProperties, WriteTask
    from pyiceberg.utils.config import Config
    from pyiceberg.utils.properties import property_as_int

    metadata = table.metadata
    key = None if metadata.spec().is_unpartitioned() else _single_partition(metadata, data)
    if key is None:
        return list(_dataframe_to_data_files(metadata, data, table.io, write_uuid=write_uuid, counter=counter))
    schema = pyarrow_to_schema(data.schema, name_mapping=metadata.schema().name_mapping,
                               downcast_ns_timestamp_to_us=Config().get_bool(DOWNCAST_NS_TIMESTAMP_TO_US_ON_WRITE) or False,
                               format_version=metadata.format_version)
    target_size = property_as_int(metadata.properties, TableProperties.WRITE_TARGET_FILE_SIZE_BYTES,
                                  TableProperties.WRITE_TARGET_FILE_SIZE_BYTES_DEFAULT)
    tasks = (WriteTask(write_uuid=write_uuid, task_id=next(counter), record_batches=batches, partition_key=key,
                       schema=schema)
             for batches in bin_pack_arrow_table(data, target_size))
    return list(write_file(table.io, metadata, tasks))


@dataclass
class MemoryTable:
    """One Iceberg table of the loop's memory."""

    table: Any

    @property
    def name(self) -> str:
        return ".".join(self.table.name())

    def refresh(self) -> MemoryTable:
        self.table.refresh()
        return self

    def snapshot_id(self) -> int | None:
        current = self.table.current_snapshot()
        return current.snapshot_id if current else None

    def scan(self, snapshot_id: int | None = None) -> pl.LazyFrame:
        """The table as of ``snapshot_id`` (default: now), lazily: filters and column
        selections on it are pushed down to file pruning and the Parquet reader. An empty
        table (no snapshot yet) is an empty frame with the table's columns."""
        if snapshot_id is None:
            snapshot_id = self.refresh().snapshot_id()
        if snapshot_id is None:
            return pl.from_arrow(self.table.schema().as_arrow().empty_table()).lazy()  # type: ignore[union-attr]
        if self.table.metadata.snapshot_by_id(snapshot_id) is None:
            self.refresh()
            if self.table.metadata.snapshot_by_id(snapshot_id) is None:
                raise TableError(f"table {self.name} has no snapshot {snapshot_id} (expired by driftloop gc, or never "
                                 "existed); a window can be re-read only while its snapshots are kept")
        return pl.scan_iceberg(self.table, snapshot_id=snapshot_id, reader_override="native")

    def writer(self) -> TableWriter:
        return TableWriter(self)

    def append(self, frame: pl.DataFrame, *, properties: dict[str, str] | None = None) -> int:
        """Append ``frame`` in one commit; the snapshot id it made."""
        writer = self.writer()
        writer.write(frame)
        return writer.commit(properties=properties)


@dataclass
class TableWriter:
    """Data files written now (from any thread), committed later in one transaction,
    or removed on abort. Until the commit no reader sees them."""

    target: MemoryTable
    files: list[Any] = field(default_factory=list)
    rows: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _counter: itertools.count = field(default_factory=itertools.count)  # type: ignore[type-arg]
    _uuid: uuid.UUID = field(default_factory=uuid.uuid4)

    def write(self, frame: pl.DataFrame | pa.Table) -> None:
        """Write ``frame`` (polars, or Arrow as :func:`to_arrow` gives it) as data files."""
        rows = frame.num_rows if isinstance(frame, pa.Table) else frame.height
        if rows == 0:
            return
        table = self.target.table
        data = _conformed(table, frame if isinstance(frame, pa.Table) else to_arrow(frame), self.target.name)
        written = _data_files(table, data, write_uuid=self._uuid, counter=self._counter)
        with self._lock:
            self.files.extend(written)
            self.rows += rows

    def commit(self, *, replace: Any | None = None, properties: dict[str, str] | None = None) -> int:
        """Commit the written files in one transaction, first deleting the rows that
        ``replace`` (a pyiceberg expression) matches, so a re-run replaces exactly what
        it wrote before. Returns the new snapshot id (the current one when nothing was
        written and nothing replaced)."""
        table = self.target.refresh().table
        summary = {k: str(v) for k, v in (properties or {}).items()}
        try:
            tx = table.transaction()
            if replace is not None:
                tx.delete(replace, snapshot_properties=summary)
            if self.files:
                with tx.update_snapshot(snapshot_properties=summary).fast_append() as append:
                    for data_file in self.files:
                        append.append_data_file(data_file)
            tx.commit_transaction()
        except OperationalError as exc:
            self.abort()
            raise TableError(f"cannot commit to table {self.target.name}: the registry database failed "
                             f"({str(exc.orig).strip().splitlines()[0] if exc.orig else exc}); nothing was committed: "
                             "run again") from None
        except BaseException:
            self.abort()
            raise
        snapshot = self.target.refresh().snapshot_id()
        assert snapshot is not None or not self.files
        return snapshot or 0

    def abort(self) -> None:
        """Remove the data files written so far (nothing referenced them)."""
        io = self.target.table.io
        with self._lock:
            files, self.files = self.files, []
        for data_file in files:
            try:
                io.delete(data_file.file_path)
            except (OSError, FileNotFoundError):  # gc removes what is left
                logger.warning("could not remove uncommitted data file %s", data_file.file_path)


@dataclass
class Tables:
    """The predictions and labels tables of every model in one registry."""

    catalog: Any

    def _open(self, namespace: str, model: str, sample: pa.Schema | None, partition: list[tuple[str, str]]) -> MemoryTable | None:
        from pyiceberg.exceptions import (
            NamespaceAlreadyExistsError,
            NoSuchTableError,
            TableAlreadyExistsError,
        )

        name = identifier(namespace, model)
        try:
            table = self.catalog.load_table(name)
        except NoSuchTableError:
            if sample is None:
                return None
            try:
                self.catalog.create_namespace(namespace)
            except NamespaceAlreadyExistsError:
                pass
            schema = _iceberg_schema(sample)
            present = [p for p in partition if p[0] in sample.names]
            try:
                table = self.catalog.create_table(name, schema=schema, partition_spec=_partition_spec(schema, present),
                                                  properties=TABLE_PROPERTIES)
                logger.info("created table %s", name)
            except TableAlreadyExistsError:  # another process made it first
                table = self.catalog.load_table(name)
        missing = {k: v for k, v in TABLE_PROPERTIES.items() if table.properties.get(k) != v}
        if missing:  # a table made by an earlier release
            with table.transaction() as tx:
                tx.set_properties(missing)
        if sample is not None:
            table = _evolve(table, sample)
        return MemoryTable(table)

    def predictions(self, model: str, *, sample: pl.DataFrame | None = None,
                    timestamp: str | None = None) -> MemoryTable | None:
        """The model's predictions table; created from ``sample``'s columns when it does
        not exist yet (None without a sample), partitioned by model version and month of
        ``timestamp``; columns that ``sample`` adds are added to the table."""
        schema = to_arrow(sample.head(0)).schema if sample is not None else None
        partition = [(MODEL_VERSION, "identity")] + ([(timestamp, "month")] if timestamp else [])
        return self._open(PREDICTIONS, model, schema, partition)

    def labels(self, model: str, *, sample: pl.DataFrame | None = None) -> MemoryTable | None:
        schema = to_arrow(sample.head(0)).schema if sample is not None else None
        return self._open(LABELS, model, schema, [])

    def list(self, namespace: str) -> list[str]:
        from pyiceberg.exceptions import NoSuchNamespaceError

        try:
            return sorted(n[-1] for n in self.catalog.list_tables(namespace))
        except NoSuchNamespaceError:
            return []


def history(table: MemoryTable, last: int = 5) -> list[dict[str, Any]]:
    """The table's newest snapshots, newest first: what a person reads to see the
    memory grow (id, commit time, operation, rows added and deleted, total rows, and the
    scoring run or label registration that made it)."""
    from datetime import UTC, datetime

    out = []
    for snap in reversed(table.refresh().table.snapshots()[-last:]):
        summary = snap.summary
        props = summary.additional_properties if summary else {}
        out.append({
            "snapshot_id": snap.snapshot_id,
            "committed_at": datetime.fromtimestamp(snap.timestamp_ms / 1000, UTC).isoformat(timespec="seconds"),
            "operation": summary.operation.value if summary else "",
            "added_rows": int(props.get("added-records", 0)),
            "deleted_rows": int(props.get("deleted-records", 0)),
            "total_rows": int(props.get("total-records", 0)),
            "by": props.get("driftloop.run-id") or props.get("driftloop.registration-id") or "",
        })
    return out


def _evolve(table: Any, sample: pa.Schema) -> Any:
    """Add the sample's columns that the table lacks (a spec that gained a feature)."""
    have = set(table.schema().column_names)
    if all(name in have for name in sample.names):
        return table
    with table.update_schema() as update:
        update.union_by_name(sample)
    return table


def open_tables(engine: Engine, artifact_root: str) -> Tables:
    """The tables of the registry at ``engine`` (``RegistryStore.engine``)."""
    _silence_expected_warnings()
    return Tables(catalog(engine, artifact_root))
