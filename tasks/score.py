"""Batch scoring: a verified model form over a streamed input, in bounded memory.

Reading, scoring and writing overlap: a reader thread parses the next batch while the
current one is validated and scored (ONNX Runtime releases the GIL), and a writer
thread encodes finished batches as Parquet. Peak memory is a few batches, whatever the
input size.

Where the rows go:

- :func:`score_to_table` (the data centre): the model's predictions table
  (:mod:`driftloop.tables`), appended in one commit per run; a re-run of the same input
  (same input key) replaces exactly that input's rows in the same commit. Quarantined
  rows are Parquet files under ``<artifact root>/quarantine/<model>/<run id>/``.
- :func:`score_stream` (edge devices, which hold no catalog): a directory or prefix
  committed by :mod:`driftloop.outputs` (parts, then one manifest written last).

A crash leaves the table (or the output) at its previous state. This module imports no
training or monitoring library and no Prefect (the score flow's tasks are in
:mod:`driftloop.tasks.score_tasks`): edge devices run it with the core install, and an
edge agent starts without paying for Prefect's import.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import fsspec
import numpy as np
import polars as pl
import pyarrow as pa

from driftloop.errors import DriftloopError, SourceError
from driftloop.forms import (
    Device,
    Engine,
    FormScorer,
    choose_form,
    load_form,
    registered_forms,
)
from driftloop.inputs import InputBatch, iter_input
from driftloop.onnx_model import LoadedModel, load_model, predict_scores
from driftloop.outputs import QUARANTINE, RUNS, SINGLE_PARTITION, Manifest, RunWriter, ScoringOutput
from driftloop.rollout import shadow_mask
from driftloop.spec import DatasetSpec
from driftloop.storage import ArtifactStore
from driftloop.tables import (
    FORM,
    INPUT_KEY,
    ROLE,
    SCORING_RUN,
    SERVED,
    SHADOW,
    MemoryTable,
    Role,
    Tables,
    TableWriter,
    to_arrow,
)
from driftloop.tasks.validate import ROW, SeenValues, unique_columns, validate_rows

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 100_000
# Lanes (a form's single-threaded kernels, one per thread) take pieces of the batches in
# flight from one queue, not a whole batch each: at the end of the input they finish
# within a piece of each other. Whole batches left one lane idle for 0.16-0.44 s of a 3 s
# run (XGBoost, 1M rows, 2 threads, bench/scoring.py).
LANE_PIECE_ROWS = 12_500
PROBABILITY_PREFIX = "probability_"  # multiclass outputs: one probability_<class> column per class


class ArtifactIntegrityError(DriftloopError):
    """A model artifact is missing or is not the one the registry recorded."""


def fetch_verified(uri: str, expected_sha256: str) -> bytes:
    """The artifact's bytes, only if their sha256 is the recorded one."""
    try:
        with fsspec.open(uri, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ArtifactIntegrityError(
            f"model artifact {uri} is missing (expected sha256 {expected_sha256}); "
            "restore it from backup or register the model again"
        ) from None
    found = hashlib.sha256(data).hexdigest()
    if found != expected_sha256:
        raise ArtifactIntegrityError(
            f"model artifact {uri} has sha256 {found}, expected {expected_sha256}: it was modified "
            "or replaced; refusing to score with it"
        )
    return data


# --- input and the pipeline's threads ---------------------------------------------------
# Read through the project's one input reader (driftloop.inputs): a file, a directory
# or a glob of CSV/Parquet, the format decided by content, then name.

# The pipeline's reader, prepare and writer threads run this much nicer than the kernel
# (Linux: each thread has its own nice value). When they and the kernel want the same
# core, the kernel keeps most of it; they still run on whatever is idle. XGBoost streamed,
# paired medians: 1.04x at 1 thread, 1.09x at 2 (bench/scoring.py). 0 turns it off.
HELPER_NICE = 5


def _yield_to_kernel() -> None:
    """Lower the calling thread's priority by :data:`HELPER_NICE` (never raises it)."""
    if HELPER_NICE <= 0 or not sys.platform.startswith("linux"):  # elsewhere a thread id is no pid
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + HELPER_NICE)
    except OSError:  # not permitted here: scheduling stays as it was
        pass


def _prefetch(batches: Iterator[Any], depth: int = 1, *, transform: Callable[[Any], Any] | None = None,
              name: str = "driftloop-reader") -> Iterator[Any]:
    """Read ahead in a thread so parsing overlaps validation and scoring; with
    ``transform``, a pipeline stage: the thread yields ``transform(item)`` for each item,
    in order, at most ``depth`` ahead of the consumer."""
    slots: queue.Queue[Any] = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()  # the consumer left (finished or raised): the reader stops too

    def offer(item: Any) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        _yield_to_kernel()
        try:
            for batch in batches:
                if not offer(batch if transform is None else transform(batch)):
                    return
            offer(done)
        except BaseException as exc:  # noqa: BLE001 - surface reader errors in the consumer
            offer(exc)
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # in this thread, which iterated them: closes the input handle

    reader = threading.Thread(target=produce, name=name, daemon=True)
    reader.start()
    try:
        while True:
            item = slots.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        reader.join(timeout=30)


# --- scoring -----------------------------------------------------------------------


def prediction_frame(model: LoadedModel, spec: DatasetSpec, valid: pl.DataFrame, scores: np.ndarray,
                     *, model_name: str, model_version: int, scored_at: datetime) -> pl.DataFrame:
    """id, timestamp, features, segment, prediction, probability (classification;
    multiclass also ``probability_<class>`` for each class, which monitoring's CBPE
    needs), model and time. Joined to late labels, these rows are training data
    (:mod:`driftloop.feedback`), so they keep every column a training row needs."""
    keep = list(dict.fromkeys(c for c in (spec.id, spec.timestamp, *spec.feature_columns, spec.segment) if c))
    out = valid.select(keep)
    per_class: list[pl.Series] = []
    if spec.task == "binary_classification":
        prediction = pl.Series("prediction", (scores >= 0.5).astype(np.int64))
        probability = pl.Series("probability", scores.astype(np.float64))
    elif spec.task == "multiclass_classification":
        labels = np.asarray(model.classes or [str(i) for i in range(scores.shape[1])], dtype=object)
        best = scores.argmax(axis=1)
        prediction = pl.Series("prediction", labels[best], dtype=pl.String)
        probability = pl.Series("probability", scores[np.arange(len(best)), best].astype(np.float64))
        per_class = [pl.Series(f"{PROBABILITY_PREFIX}{label}", scores[:, i].astype(np.float64)) for i, label in enumerate(labels)]
    else:
        prediction = pl.Series("prediction", scores.astype(np.float64))
        probability = pl.Series("probability", np.full(len(scores), np.nan))
    return out.with_columns(
        prediction, probability, *per_class,
        pl.lit(model_name).alias("model_name"),
        pl.lit(model_version, dtype=pl.Int64).alias("model_version"),
        pl.lit(scored_at).dt.cast_time_unit("us").alias("scored_at"),
    )


@dataclass
class ScoreResult:
    rows_in: int
    rows_scored: int
    rows_quarantined: int
    output_uri: str
    quarantine_uri: str | None
    batches: int
    batch_latencies_s: list[float] = field(default_factory=list)
    run_id: str = ""  # the scoring run's id: its rows' scoring_run_id in the table (edge: its output prefix)
    manifest: Manifest | None = None  # edge outputs only
    snapshot_id: int | None = None  # the predictions table's snapshot this run committed
    input_key: str | None = None
    table: str | None = None  # the predictions table's name, e.g. predictions.car_loan
    form: str | None = None  # the form that actually scored (on a Dask worker: the worker's choice)
    shadow_rows: int = 0  # rows the shadow model also scored (role shadow), in the same pass


@dataclass
class ShadowScoring:
    """A second model (a candidate, or a replaced champion under guard) that scores the
    shadow fraction of each batch's validated rows in the same pass over the input: the
    served rows are exactly those of a run without it. Which rows: a stable hash of the id
    (:func:`driftloop.rollout.shadow_mask`), so the same ids are shadowed on every run."""

    scorer: FormScorer
    version: int
    fraction: float
    id_column: str
    rows: int = 0


@dataclass
class BatchCounts:
    """What one stream of batches (a whole input, or one partition of it) came to."""

    rows_in: int = 0
    rows_scored: int = 0
    rows_quarantined: int = 0
    latencies: list[float] = field(default_factory=list)
    # Per unique column (the id): its values in the rows kept, and their row numbers in
    # this stream, so repeats across partitions can be found afterwards.
    kept: dict[str, list[pl.DataFrame]] = field(default_factory=dict)


@dataclass
class _Prepared:
    """One batch after the prepare stage: validated, quarantine assembled, and the form's
    input built (None when the form has no prepare stage: ``predict`` builds it)."""

    rows_in: int
    valid: pl.DataFrame
    quarantine: pl.DataFrame
    features: Any = None
    kept: dict[str, pl.DataFrame] = field(default_factory=dict)


class _PrepareStage:
    """Validation and the form's input, batch after batch, in input order (in its own
    thread: off the scoring thread). Holds what validation carries from batch to batch:
    the unique values kept so far, the quarantine's schema, the row offset."""

    def __init__(self, spec: DatasetSpec, *, source: str, keep_ids: bool,
                 prepare: Callable[[pl.DataFrame], Any] | None) -> None:
        self.spec = spec
        self.source = source
        self.keep_ids = keep_ids
        self.prepare = prepare
        self.uniques = unique_columns(spec, labelled=False)
        # Ids (and other unique columns) kept so far: a repeat in a later batch is quarantined.
        # Memory grows by the id column only (8 bytes a row for int ids).
        self.seen: dict[str, SeenValues] = {}
        self.template: pl.DataFrame | None = None
        self.warned = False
        self.offset = 0  # rows of earlier batches: quarantine rows are numbered from the stream's start

    def __call__(self, batch: InputBatch) -> _Prepared:
        result = validate_rows(batch.frame, self.spec, labelled=False, source=self.source,
                               warn_ignored=not self.warned, seen=self.seen) if batch.frame.height else None
        self.warned = True
        valid = result.valid if result else pl.DataFrame()
        for name in self.uniques if valid.height else ():
            self.seen.setdefault(name, SeenValues()).add(valid[name])
        kept: dict[str, pl.DataFrame] = {}
        if self.keep_ids and valid.height and result is not None:
            rows = pl.int_range(0, batch.frame.height, eager=True, dtype=pl.Int64)
            kept_rows = rows.filter(~rows.is_in(result.quarantine[ROW].implode())) + self.offset
            kept = {name: pl.DataFrame({ROW: kept_rows, name: valid[name]}) for name in self.uniques}
        if result is not None and self.template is None:
            self.template = result.quarantine.head(0)  # every quarantine part gets this schema
        quarantine = result.quarantine.with_columns(pl.col(ROW) + self.offset) if result else pl.DataFrame()
        if batch.malformed.height:
            base = quarantine if quarantine.width else (self.template if self.template is not None else pl.DataFrame())
            quarantine = pl.concat([base, batch.malformed], how="diagonal_relaxed")
        rows_in = batch.frame.height + batch.malformed.height
        self.offset += rows_in
        features = self.prepare(valid) if self.prepare is not None and valid.height else None
        return _Prepared(rows_in, valid, quarantine, features, kept)


def score_batches(
    batches: Iterator[InputBatch], model: LoadedModel, spec: DatasetSpec, run: RunWriter, *, partition: str,
    source: str, model_name: str, model_version: int, scored_at: datetime,
    predict: Callable[[pl.DataFrame], np.ndarray] | None = None,
    on_batch: Callable[[int, int | None], None] | None = None, total: int | None = None, keep_ids: bool = False,
    shadow: Callable[[pl.DataFrame, int, datetime], None] | None = None,
) -> BatchCounts:
    """Validate, score and write each batch as parts of ``run`` named by ``partition``.
    A row repeating a unique value (the id) of an earlier batch is quarantined. Quarantine
    rows are numbered from the start of this stream.

    A pipeline of threads joined by one-slot queues, so the scoring thread runs the
    model's kernel and nothing else: a reader parses the next batch; a prepare stage
    validates the one before it and builds the form's input (``predict.prepare`` of a
    :class:`driftloop.forms.StagedPredict`: the native form's float32 matrix); this
    thread scores (``predict.run``); a writer thread adds the scores to the validated
    columns (no copy of the features) and encodes the part (which
    :class:`driftloop.outputs.RunWriter` puts on a thread of its own). A form with lanes
    (``predict.lanes`` > 1) keeps that many batches in flight and its single-threaded
    kernels take pieces of them (:data:`LANE_PIECE_ROWS` rows) from one queue; batches
    are still counted and written in input order. At most a few batches are in flight,
    whatever the input size. ``shadow`` (valid rows, batch index, scored_at) scores the
    same rows with a second model in the writer thread, after the served part is written."""
    counts = BatchCounts()
    pending: list[Future[Any]] = []
    prepare = getattr(predict, "prepare", None)
    staged = prepare is not None
    lanes = int(getattr(predict, "lanes", 1)) if staged else 1
    if staged:
        kernel: Callable[[Any], np.ndarray] = predict.run_lane if lanes > 1 else predict.run  # type: ignore[union-attr]
    else:
        kernel = predict if predict is not None else partial(predict_scores, model)
    stage = _PrepareStage(spec, source=source, keep_ids=keep_ids, prepare=prepare)

    def score(item: _Prepared) -> tuple[np.ndarray | None, float]:
        started = time.perf_counter()
        scores = kernel(item.features if staged else item.valid) if item.valid.height else None
        return scores, time.perf_counter() - started

    def score_piece(x: Any) -> tuple[np.ndarray, float, float]:
        started = time.perf_counter()
        return kernel(x), started, time.perf_counter()

    def score_in_lanes(item: _Prepared) -> Callable[[], tuple[np.ndarray | None, float]]:
        """Queue the batch's pieces for the lanes; the returned call waits for them and
        gives the batch's scores in row order and the seconds from first start to last end."""
        rows = len(item.features) if item.valid.height else 0
        pieces = [lane_threads.submit(score_piece, item.features[start:start + LANE_PIECE_ROWS])
                  for start in range(0, rows, LANE_PIECE_ROWS)]

        def result() -> tuple[np.ndarray | None, float]:
            done = [piece.result() for piece in pieces]
            if not done:
                return None, 0.0
            scores = done[0][0] if len(done) == 1 else np.concatenate([d[0] for d in done])
            return scores, max(d[2] for d in done) - min(d[1] for d in done)

        return result

    def write_scored(valid: pl.DataFrame, scores: np.ndarray, index: int) -> Any:
        predictions = prediction_frame(model, spec, valid, scores, model_name=model_name,
                                       model_version=model_version, scored_at=scored_at)
        run.write_part(predictions, partition=partition, index=index)
        if shadow is not None:
            shadow(valid, index, scored_at)

    def finish(index: int, item: _Prepared, scored: Callable[[], tuple[np.ndarray | None, float]]) -> None:
        """Count and hand a scored batch to the writer, in input order."""
        scores, seconds = scored()
        if scores is not None:
            pending.append(writer.submit(write_scored, item.valid, scores, index))
        if item.quarantine.height:
            pending.append(writer.submit(run.write_part, item.quarantine, partition=partition, index=index,
                                         quarantine=True))
        for name, kept in item.kept.items():
            counts.kept.setdefault(name, []).append(kept)
        counts.latencies.append(seconds)
        counts.rows_in += item.rows_in
        counts.rows_scored += item.valid.height
        counts.rows_quarantined += item.quarantine.height
        # Bound memory: never more than two parts waiting for the writer.
        while len(pending) > 2:
            pending.pop(0).result()
        if on_batch is not None:
            on_batch(counts.rows_in, total)

    with (ThreadPoolExecutor(max_workers=1, thread_name_prefix="driftloop-writer", initializer=_yield_to_kernel) as writer,
          ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="driftloop-lane") as lane_threads):
        prepared = _prefetch(_prefetch(batches), transform=stage, name="driftloop-prepare")
        scoring: deque[tuple[int, _Prepared, Callable[[], tuple[np.ndarray | None, float]]]] = deque()
        with closing(prepared):  # the stage threads stop as soon as the loop ends, however it ends
            for index, item in enumerate(prepared):
                if lanes > 1:
                    scoring.append((index, item, score_in_lanes(item)))
                else:  # on this thread: no hand-off for one lane
                    scored = score(item)
                    scoring.append((index, item, lambda scored=scored: scored))
                while len(scoring) >= lanes:  # keep every lane busy; finish the oldest batch
                    finish(*scoring.popleft())
            while scoring:
                finish(*scoring.popleft())
        for pending_write in pending:
            pending_write.result()
    return counts


def score_stream(
    model: LoadedModel, input_uri: str, output_uri: str, *, model_name: str, model_version: int,
    batch_size: int = DEFAULT_BATCH_SIZE, on_batch: Callable[[int, int | None], None] | None = None,
    predict: Callable[[pl.DataFrame], np.ndarray] | None = None,
) -> ScoreResult:
    """Score ``input_uri`` into the scoring output ``output_uri`` (a directory or prefix,
    see :mod:`driftloop.outputs`). ``predict`` scores validated rows
    with another verified form of the same version (:mod:`driftloop.forms`); by default
    the ONNX form ``model``, which always describes the spec and outputs."""
    if batch_size < 1:
        raise DriftloopError(f"batch size must be at least 1, got {batch_size}")
    spec = model.spec()
    output = ScoringOutput(output_uri)
    output.check_writable()  # a user's directory is refused before anything is read or written
    scored_at = datetime.now(UTC)

    batches, total = iter_input(input_uri, batch_size)  # a missing input fails before anything is written
    output.claim()
    run = output.start_run()
    with aborted_on_failure(run, output_uri):
        counts = score_batches(batches, model, spec, run, partition=SINGLE_PARTITION, source=input_uri,
                               model_name=model_name, model_version=model_version, scored_at=scored_at,
                               predict=predict, on_batch=on_batch, total=total)
        if counts.rows_in == 0:
            raise SourceError(f"input {input_uri} has no data rows; nothing to score")
        manifest = run.commit(model_name=model_name, model_version=model_version, input_uri=input_uri,
                              rows_in=counts.rows_in, rows_scored=counts.rows_scored,
                              rows_quarantined=counts.rows_quarantined)
    return ScoreResult(
        rows_in=counts.rows_in, rows_scored=counts.rows_scored, rows_quarantined=counts.rows_quarantined,
        output_uri=output.uri,
        quarantine_uri=output.uri_of(f"{RUNS}/{run.run_id}/{QUARANTINE}") if counts.rows_quarantined else None,
        batches=len(counts.latencies), batch_latencies_s=counts.latencies, run_id=run.run_id, manifest=manifest,
    )


class TableSink:
    """A central scoring run's destination: data files of the model's predictions table
    (each batch tagged with the run, the input and the role; committed once, at the end)
    and quarantine Parquet files under the artifact root. ``write_part`` has the
    signature of :class:`driftloop.outputs.RunWriter`'s, so :func:`score_batches` writes
    to either."""

    def __init__(self, tables: Tables, store: ArtifactStore, spec: DatasetSpec, *, model_name: str, run_id: str,
                 input_key: str, form: str, role: Role = SERVED, properties: dict[str, str] | None = None) -> None:
        self.tables = tables
        # What the commit's snapshot carries besides the accounting, so that the run can be
        # recorded from the snapshot alone (driftloop.scoring_runs).
        self.properties = dict(properties or {})
        self.spec = spec
        self.model_name = model_name
        self.run_id = run_id
        self.input_key = input_key
        self.role = role
        self.store = store
        self.quarantine_prefix = f"quarantine/{model_name}/{run_id}"
        self._tags = {SCORING_RUN: run_id, INPUT_KEY: input_key, FORM: form, ROLE: role}
        self._table: MemoryTable | None = None
        self._writer: TableWriter | None = None
        self._quarantined: list[str] = []
        self._lock = threading.Lock()
        self.shadow_role: Role | None = None  # set when a shadow model scores this run

    def _open(self, sample: pl.DataFrame) -> TableWriter:
        with self._lock:
            if self._writer is None:
                table = self.tables.predictions(self.model_name, sample=sample, timestamp=self.spec.timestamp)
                assert table is not None
                self._table, self._writer = table, table.writer()
            return self._writer

    @property
    def form(self) -> str:
        return self._tags[FORM]

    def tagged(self, frame: pl.DataFrame) -> pl.DataFrame:
        return frame.with_columns(pl.lit(v, dtype=pl.String).alias(k) for k, v in self._tags.items())

    def write_part(self, frame: pl.DataFrame, *, partition: str, index: int, quarantine: bool = False,
                   role: Role | None = None, form: str | None = None) -> None:
        """``role``/``form``: a shadow model's rows (same run, same input key)."""
        if quarantine:
            relpath = f"{self.quarantine_prefix}/part-{partition}-{index:05d}.parquet"
            self.store.write_parquet(relpath, frame)
            with self._lock:
                self._quarantined.append(relpath)
            return
        # The tags appended as Arrow columns: the scored columns go to Arrow without a copy,
        # where tagging in polars first cost a conversion of four string columns a batch.
        rows = to_arrow(frame)
        tags = self._tags if role is None else {**self._tags, ROLE: role, FORM: form or self.form}
        for name, value in tags.items():
            rows = rows.append_column(name, pa.repeat(pa.scalar(value, pa.large_string()), rows.num_rows))
        self._open(self.tagged(frame.head(0))).write(rows)

    def quarantine_uri(self) -> str | None:
        return self.store.uri(self.quarantine_prefix) if self._quarantined else None

    def commit(self, properties: dict[str, Any]) -> tuple[str | None, int | None]:
        """One commit: the rows this input had in the table (same input key and role) are
        replaced by this run's. Returns the table's name and the snapshot id."""
        from pyiceberg.expressions import And, EqualTo, Or

        if self._writer is None or self._table is None:
            table = self.tables.predictions(self.model_name)
            if table is None:  # nothing scored and no table yet: nothing to replace
                return None, None
            self._table, self._writer = table, table.writer()
        replace = And(EqualTo(INPUT_KEY, self.input_key), EqualTo(ROLE, self.role))
        if self.shadow_role is not None:
            # This input's earlier shadow rows go too: one model in shadow at a time.
            replace = And(EqualTo(INPUT_KEY, self.input_key),
                          Or(EqualTo(ROLE, self.role), EqualTo(ROLE, self.shadow_role)))
        quarantine = self.quarantine_uri()
        properties = {**self.properties, "form": self.form, **({"quarantine-uri": quarantine} if quarantine else {}),
                      **properties}
        snapshot = self._writer.commit(replace=replace, properties={f"driftloop.{k}": v for k, v in properties.items()})
        return self._table.name, snapshot

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
        for relpath in self._quarantined:
            self.store.remove(relpath)


def score_to_table(
    model: LoadedModel, input_uri: str, sink: TableSink, *, model_version: int,
    batch_size: int = DEFAULT_BATCH_SIZE, on_batch: Callable[[int, int | None], None] | None = None,
    predict: Callable[[pl.DataFrame], np.ndarray] | None = None, shadow: ShadowScoring | None = None,
) -> ScoreResult:
    """Score ``input_uri`` into the model's predictions table through ``sink``: one commit,
    replacing the rows an earlier run of the same input left (see :class:`TableSink`).
    With ``shadow``, a second model scores the shadow fraction of the same rows in the
    same pass (role ``shadow``, same run, same commit)."""
    if batch_size < 1:
        raise DriftloopError(f"batch size must be at least 1, got {batch_size}")
    spec = model.spec()
    scored_at = datetime.now(UTC)
    batches, total = iter_input(input_uri, batch_size)  # a missing input fails before anything is written
    write_shadow = None
    if shadow is not None:
        sink.shadow_role = SHADOW
        write_shadow = _shadow_writer(shadow, spec, sink)
    try:
        counts = score_batches(batches, model, spec, sink, partition=SINGLE_PARTITION, source=input_uri,
                               model_name=sink.model_name, model_version=model_version, scored_at=scored_at,
                               predict=predict, on_batch=on_batch, total=total, shadow=write_shadow)
        if counts.rows_in == 0:
            raise SourceError(f"input {input_uri} has no data rows; nothing to score")
        table, snapshot = sink.commit({
            "run-id": sink.run_id, "model-version": model_version, "input-key": sink.input_key,
            "rows-in": counts.rows_in, "rows-scored": counts.rows_scored, "rows-quarantined": counts.rows_quarantined,
        })
    except BaseException as exc:
        sink.abort()
        clear = no_room_error(exc, sink.store.uri(f"tables/predictions/{sink.model_name}"))
        if clear is not None:
            raise clear from None
        raise
    return ScoreResult(
        rows_in=counts.rows_in, rows_scored=counts.rows_scored, rows_quarantined=counts.rows_quarantined,
        output_uri=table or "", quarantine_uri=sink.quarantine_uri(), batches=len(counts.latencies),
        batch_latencies_s=counts.latencies, run_id=sink.run_id, snapshot_id=snapshot, input_key=sink.input_key,
        table=table, shadow_rows=shadow.rows if shadow is not None else 0,
    )


def _shadow_writer(shadow: ShadowScoring, spec: DatasetSpec, sink: TableSink) -> Callable[[pl.DataFrame, int, datetime], None]:
    """What the writer thread calls after each served part: the shadow model's scores of
    the batch's shadow rows, written as role ``shadow`` with the shadow model's version."""
    def write(valid: pl.DataFrame, index: int, scored_at: datetime) -> None:
        picked = valid.filter(pl.Series(shadow_mask(valid[shadow.id_column], shadow.fraction)))
        if not picked.height:
            return
        scores = shadow.scorer.predict(picked)
        frame = prediction_frame(shadow.scorer.descriptor, spec, picked, scores, model_name=sink.model_name,
                                 model_version=shadow.version, scored_at=scored_at)
        sink.write_part(frame, partition=SINGLE_PARTITION, index=index, role=SHADOW, form=shadow.scorer.kind)
        shadow.rows += picked.height

    return write


def export_path(output_uri: str, run_id: str) -> str:
    """A ``.parquet`` name is the file itself; anything else is a directory or prefix
    that gets ``<run id>.parquet``."""
    if output_uri.endswith((".parquet", ".pq")):
        return output_uri
    return f"{output_uri.rstrip('/')}/{run_id}.parquet"


def export_run(table: MemoryTable, snapshot_id: int, run_id: str, output_uri: str) -> str:
    """Write one scoring run's rows, as committed in ``snapshot_id``, to a plain Parquet
    file for consumers that want files, streamed (memory does not grow with the run) and
    atomically: a reader sees no file or the whole file (a rename on a local disk, one
    upload on an object store)."""
    import tempfile

    from driftloop.atomic import replace_durably
    from driftloop.outputs import is_local_fs
    from driftloop.redact import mask_uri

    target = export_path(output_uri, run_id)
    fs, path = fsspec.core.url_to_fs(target)
    # Served rows only: a shadow model's rows of the run (driftloop.rollout) are evidence, not output.
    rows = table.scan(snapshot_id).filter((pl.col(SCORING_RUN) == run_id) & (pl.col(ROLE) == SERVED))
    try:
        if is_local_fs(fs):
            parent = os.path.dirname(path) or "."
            os.makedirs(parent, exist_ok=True)
            tmp = os.path.join(parent, f".tmp-{run_id}.parquet")
            try:
                rows.sink_parquet(tmp, compression="zstd")
                replace_durably(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            return path
        with tempfile.TemporaryDirectory(prefix="driftloop-export-") as scratch:
            local = os.path.join(scratch, "export.parquet")
            rows.sink_parquet(local, compression="zstd")
            fs.put_file(local, path)
        return target
    except OSError as exc:
        clear = no_room_error(exc, mask_uri(target))
        raise (clear or DriftloopError(f"cannot write the export {mask_uri(target)}: {exc}; the scoring run is "
                                       "committed to the table: export it again with driftloop score ... or "
                                       "read it from the table")) from None


_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


@contextmanager
def aborted_on_failure(run: RunWriter, output_uri: str) -> Iterator[None]:
    """Any failure while a run writes: its parts are removed (nothing was committed), and
    a full disk becomes a clear error."""
    try:
        yield
    except BaseException as exc:
        run.abort()
        clear = no_room_error(exc, output_uri)
        if clear is not None:
            raise clear from None
        raise


def no_room_error(exc: BaseException, output_uri: str) -> DriftloopError | None:
    """The clear error for a write that failed for want of space, else None."""
    if not _no_room(exc):
        return None
    return DriftloopError(
        f"cannot write the scoring output {output_uri}: {exc} (disk full or a file-size limit); "
        "nothing was committed and an earlier output there is intact: free space and score again"
    )


def _no_room(exc: BaseException) -> bool:
    """A write that failed for want of space (polars wraps the OSError in its own error)."""
    if isinstance(exc, OSError) and exc.errno in _NO_ROOM:
        return True
    return any(f"[Errno {code}]" in str(exc) for code in _NO_ROOM)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def load_verified_model(uri: str, sha256: str, *, threads: int | None = None) -> LoadedModel:
    return load_model(fetch_verified(uri, sha256), threads=threads)


# --- Prefect tasks -----------------------------------------------------------------


def load_scoring_form(record: Any, *, engine: Engine, device: Device, threads: int | None) -> tuple[FormScorer, str]:
    """The verified form of ``record`` (a ``ModelVersionRecord``) to score with, and why
    it was chosen. The ONNX form is always fetched and verified: it describes the rest."""
    chosen, why = choose_form(registered_forms(record), engine=engine, algorithm=record.algorithm, device=device)
    onnx_bytes = fetch_verified(record.onnx_uri, record.onnx_sha256)
    descriptor = load_model(onnx_bytes, threads=threads)
    data = onnx_bytes if chosen.kind == "onnx" else fetch_verified(chosen.uri, chosen.sha256)
    return load_form(chosen, descriptor, data, threads=threads or os.cpu_count(), device=device), why
