"""The central side of edge uploads: commit the runs devices left in the store's inbox to
the model's predictions table, exactly once.

Devices never see the catalog. Each finished upload is ``<inbox>/<model>/<device>/<run
id>/`` with its parts and ``telemetry.json`` (written last). For each one:

1. the telemetry is validated (it is input from a device: ids, model, a registered
   version, counts), every part's sha256 and row count checked, and the rows limited to
   the columns the version's spec and outputs define;
2. the rows are committed to ``predictions.<model>`` (role ``served``, ``device_id``,
   input key ``edge:<device>:<run id>``) in one commit that first deletes what that key
   holds: a run ingested twice (a crash after the commit, a device that uploaded twice)
   is in the table once;
3. the telemetry is kept under ``edge/telemetry/<model>/`` (the rollout controller
   reads it) and the run's inbox prefix removed.

A run that fails validation is moved aside to ``edge/rejected/<model>/`` with the reason,
never committed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
from prefect import task
from prefect.cache_policies import NONE
from pydantic import ValidationError

from driftloop.errors import DriftloopError
from driftloop.spec import check_model_name
from driftloop.tables import FORM, INPUT_KEY, ROLE, SCORING_RUN, SERVED, to_arrow
from driftloop.tasks.edge_agent import SAFE_ID, TELEMETRY, EdgeTelemetry

logger = logging.getLogger(__name__)

INBOX = "inbox"
TELEMETRY_DIR = "edge/telemetry"
REJECTED_DIR = "edge/rejected"
DEVICE = "device_id"
PARTIAL_GRACE = timedelta(days=1)  # an upload without telemetry this old was abandoned
MAX_PART_BYTES = 512 * 1024 * 1024  # a part bigger than this is not read (a device cannot exhaust the ingester)
_OUTPUT_COLUMNS = ("prediction", "probability", "model_name", "model_version", "scored_at")


class RejectedUpload(DriftloopError):
    """An uploaded edge run failed validation; it is moved aside, not committed."""


@dataclass
class IngestReport:
    committed: list[str] = field(default_factory=list)  # edge run ids
    rejected: dict[str, str] = field(default_factory=dict)  # run id -> reason
    rows: int = 0


def edge_input_key(device_id: str, run_id: str) -> str:
    return f"edge:{device_id}:{run_id}"


def pending_runs(store: Any, model: str) -> list[tuple[str, str]]:
    """(device, run id) of every finished upload of ``model``, oldest run first."""
    check_model_name(model)
    pattern = store.path(f"{INBOX}/{model}/*/*/{TELEMETRY}")
    found = []
    for path in store.fs.glob(pattern):
        parts = path.rstrip("/").split("/")
        device, run = parts[-3], parts[-2]
        if SAFE_ID.fullmatch(device) and SAFE_ID.fullmatch(run):
            found.append((device, run))
    return sorted(found, key=lambda dr: dr[1])


def abandoned_uploads(store: Any, model: str, pending: list[tuple[str, str]], *, now: datetime,
                      grace: timedelta = PARTIAL_GRACE) -> list[str]:
    """Inbox prefixes of uploads that never finished (no telemetry: killed mid-upload, and
    not sent again since) whose newest file is older than ``grace``; the device still holds
    such a run in its outbox until a complete upload, so nothing is lost by removing them."""
    from driftloop.outputs import newest_write

    done = {f"{INBOX}/{model}/{d}/{r}" for d, r in pending}
    out = []
    for path in store.fs.glob(store.path(f"{INBOX}/{model}/*/*")):
        parts = path.rstrip("/").split("/")
        relpath = f"{INBOX}/{model}/{parts[-2]}/{parts[-1]}"
        if relpath in done or not store.fs.isdir(path):
            continue
        newest = newest_write(store.fs, path)
        if newest is not None and now - newest > grace:
            out.append(relpath)
    return out


def _allowed_columns(spec: Any, classes: list[Any] | None) -> set[str]:
    allowed = set(spec.schema_columns(labelled=False)) | set(_OUTPUT_COLUMNS)
    allowed |= {f"probability_{c}" for c in classes or []}
    return allowed


def load_run(store: Any, model: str, device: str, run: str, registry: Any,
             spec_of: Any) -> tuple[EdgeTelemetry, pl.DataFrame, Any]:
    """The run's telemetry and rows, validated; :class:`RejectedUpload` otherwise."""
    prefix = f"{INBOX}/{model}/{device}/{run}"
    with store.fs.open(store.path(f"{prefix}/{TELEMETRY}"), "rb") as fh:
        raw = fh.read(1_000_000)
    try:
        telemetry = EdgeTelemetry.model_validate_json(raw)
    except ValidationError as exc:
        raise RejectedUpload(f"telemetry is not valid: {str(exc).splitlines()[0]}") from None
    if (telemetry.model, telemetry.device_id, telemetry.run_id) != (model, device, run):
        raise RejectedUpload(f"telemetry names {telemetry.model}/{telemetry.device_id}/{telemetry.run_id}, uploaded "
                             f"as {model}/{device}/{run}")
    if telemetry.rows_in != telemetry.rows_scored + telemetry.rows_quarantined:
        raise RejectedUpload("rows_in != rows_scored + rows_quarantined")
    try:
        record = registry.get_version(model, telemetry.version)
    except Exception as exc:  # noqa: BLE001 - ModelNotFound, named in the rejection
        raise RejectedUpload(f"version {telemetry.version} of {model}: {exc}") from None
    if telemetry.failed:
        if telemetry.parts:
            raise RejectedUpload("a failed run carries no rows")
        return telemetry, pl.DataFrame(), record
    spec, classes = spec_of(record)
    allowed = _allowed_columns(spec, classes)
    frames = []
    for part in telemetry.parts:
        if not SAFE_ID.fullmatch(part.name):
            raise RejectedUpload(f"part name {part.name!r}")
        path = store.path(f"{prefix}/{part.name}")
        if store.fs.size(path) > MAX_PART_BYTES:
            raise RejectedUpload(f"part {part.name} is larger than {MAX_PART_BYTES} bytes")
        with store.fs.open(path, "rb") as fh:
            data = fh.read()
        if hashlib.sha256(data).hexdigest() != part.sha256:
            raise RejectedUpload(f"part {part.name}: sha256 differs from the telemetry's")
        try:
            frame = pl.read_parquet(io.BytesIO(data))
        except Exception as exc:  # noqa: BLE001 - any unreadable part rejects the run
            raise RejectedUpload(f"part {part.name} is not Parquet ({type(exc).__name__})") from None
        if frame.height != part.rows:
            raise RejectedUpload(f"part {part.name}: {frame.height} rows, telemetry says {part.rows}")
        extra = sorted(set(frame.columns) - allowed)
        if extra:
            raise RejectedUpload(f"part {part.name}: columns {extra[:5]} are not the model's")
        frames.append(frame)
    rows = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
    if rows.height != telemetry.rows_scored:
        raise RejectedUpload(f"{rows.height} rows uploaded, telemetry says {telemetry.rows_scored} scored")
    if rows.height and not (rows["model_version"] == telemetry.version).all():
        raise RejectedUpload(f"rows name a model version other than the telemetry's v{telemetry.version}")
    return telemetry, rows, record


def commit_run(tables: Any, model: str, telemetry: EdgeTelemetry, rows: pl.DataFrame, record: Any,
               timestamp: str | None) -> int | None:
    """One commit that replaces whatever this edge run's key holds by its rows."""
    from pyiceberg.expressions import And, EqualTo

    if rows.height == 0:
        return None
    key = edge_input_key(telemetry.device_id, telemetry.run_id)
    tags = {SCORING_RUN: telemetry.run_id, INPUT_KEY: key, FORM: "onnx", ROLE: SERVED, DEVICE: telemetry.device_id}
    tagged = rows.with_columns(pl.lit(v, dtype=pl.String).alias(k) for k, v in tags.items())
    table = tables.predictions(model, sample=tagged.head(0), timestamp=timestamp)
    writer = table.writer()
    writer.write(to_arrow(tagged))
    properties = {
        "run-id": telemetry.run_id, "model-version": telemetry.version, "input-key": key,
        "input-uri": f"edge://{telemetry.device_id}/{telemetry.run_id}", "started-at": telemetry.started_at.isoformat(),
        "onnx-sha256": record.onnx_sha256, "form": "onnx", "device-id": telemetry.device_id,
        "rows-in": telemetry.rows_in, "rows-scored": telemetry.rows_scored,
        "rows-quarantined": telemetry.rows_quarantined,
    }
    return writer.commit(replace=And(EqualTo(INPUT_KEY, key), EqualTo(ROLE, SERVED)),
                         properties={f"driftloop.{k}": v for k, v in properties.items()})


def _spec_loader() -> Any:
    cache: dict[str, tuple[Any, list[Any] | None]] = {}

    def spec_of(record: Any) -> tuple[Any, list[Any] | None]:
        if record.onnx_sha256 not in cache:
            from driftloop.onnx_model import load_model
            from driftloop.tasks.score import fetch_verified

            loaded = load_model(fetch_verified(record.onnx_uri, record.onnx_sha256), threads=1)
            cache[record.onnx_sha256] = (loaded.spec(), loaded.classes)
        return cache[record.onnx_sha256]

    return spec_of


def ingest_inbox(store: Any, tables: Any, registry: Any, model: str) -> IngestReport:
    """Commit every finished upload of ``model`` (see the module's docstring)."""
    from driftloop.registry import ScoringRunRecord
    from driftloop.scoring_runs import record_scoring_run

    report = IngestReport()
    spec_of = _spec_loader()
    pending = pending_runs(store, model)
    for relpath in abandoned_uploads(store, model, pending, now=datetime.now(UTC)):
        logger.warning("removing abandoned edge upload %s (no telemetry.json after %s)", relpath, PARTIAL_GRACE)
        store.remove(relpath)
    for device, run in pending:
        prefix = f"{INBOX}/{model}/{device}/{run}"
        try:
            telemetry, rows, record = load_run(store, model, device, run, registry, spec_of)
        except RejectedUpload as exc:
            logger.error("edge run %s from %s rejected: %s", run, device, exc)
            store.write_text(f"{REJECTED_DIR}/{model}/{device}-{run}.json",
                             json.dumps({"device": device, "run": run, "reason": str(exc),
                                         "at": datetime.now(UTC).isoformat()}))
            store.remove(prefix)
            report.rejected[run] = str(exc)
            continue
        spec, _ = spec_of(record) if rows.height else (None, None)
        snapshot = commit_run(tables, model, telemetry, rows, record, spec.timestamp if spec is not None else None)
        if snapshot is not None:
            record_scoring_run(registry, ScoringRunRecord(
                id=telemetry.run_id, model_name=model, model_version=telemetry.version, onnx_sha256=record.onnx_sha256,
                input_uri=f"edge://{device}/{run}", output_uri=f"predictions.{model}", quarantine_uri=None,
                rows_in=telemetry.rows_in, rows_scored=telemetry.rows_scored,
                rows_quarantined=telemetry.rows_quarantined, form="onnx", started_at=telemetry.started_at,
                finished_at=telemetry.finished_at, snapshot_id=snapshot, input_key=edge_input_key(device, run)))
        # Telemetry kept before the inbox goes: a crash in between re-ingests (replacing
        # the same rows) and rewrites the same telemetry file.
        store.write_text(f"{TELEMETRY_DIR}/{model}/{run}.json", telemetry.model_dump_json())
        store.remove(prefix)
        report.committed.append(run)
        report.rows += rows.height
    return report


def read_telemetry(store: Any, model: str) -> list[EdgeTelemetry]:
    """The telemetry of every ingested edge run of ``model``."""
    out = []
    for path in sorted(store.fs.glob(store.path(f"{TELEMETRY_DIR}/{check_model_name(model)}/*.json"))):
        with store.fs.open(path, "rb") as fh:
            try:
                out.append(EdgeTelemetry.model_validate_json(fh.read()))
            except ValidationError:
                logger.warning("unreadable edge telemetry %s skipped", path)
    return out


@task(name="ingest-edge-inbox", cache_policy=NONE)
def ingest_inbox_task(store: Any, registry: Any, model: str) -> IngestReport:
    from driftloop.tables import open_tables

    return ingest_inbox(store, open_tables(registry.engine, store.root), registry, model)
