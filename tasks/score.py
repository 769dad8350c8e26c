"""Batch scoring: a verified ONNX artifact over a streamed input, in bounded memory.

Reading, scoring and writing overlap: a reader thread parses the next batch while the
current one is validated and scored (ONNX Runtime releases the GIL), and a writer
thread encodes finished batches as Parquet parts. Peak memory is a few batches,
whatever the input size.

Output is committed by :mod:`driftloop.outputs`, the same way on a local disk and on an
object store: parts go under the run's own prefix in the output, then one manifest
listing them is written last; readers read only what the newest manifest lists. A crash
leaves the previous output as it was; a rerun replaces the output rather than adding to it.
This module imports no training or monitoring library: edge devices run it with the
core install.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import fsspec
import numpy as np
import polars as pl
from prefect import task
from prefect.cache_policies import NONE

from driftloop.errors import DriftloopError, SourceError
from driftloop.forms import (
    Device,
    Engine,
    FormScorer,
    choose_form,
    load_form,
    onnx_scorer,
    registered_forms,
)
from driftloop.inputs import InputBatch, iter_input
from driftloop.onnx_model import LoadedModel, load_model, predict_scores
from driftloop.outputs import QUARANTINE, RUNS, SINGLE_PARTITION, Manifest, RunWriter, ScoringOutput
from driftloop.spec import DatasetSpec
from tasks.validate import ROW, SeenValues, unique_columns, validate_rows

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 100_000
PROBABILITY_PREFIX = "probability_"  # multiclass outputs: one probability_<class> column per class


class IntegrityError(DriftloopError):
    """A model artifact is missing or is not the one the registry recorded."""


def fetch_verified(uri: str, expected_sha256: str) -> bytes:
    """The artifact's bytes, only if their sha256 is the recorded one."""
    try:
        with fsspec.open(uri, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise IntegrityError(
            f"model artifact {uri} is missing (expected sha256 {expected_sha256}); "
            "restore it from backup or register the model again"
        ) from None
    found = hashlib.sha256(data).hexdigest()
    if found != expected_sha256:
        raise IntegrityError(
            f"model artifact {uri} has sha256 {found}, expected {expected_sha256}: it was modified "
            "or replaced; refusing to score with it"
        )
    return data


# --- input ---------------------------------------------------------------------------
# Read through the project's one input reader (driftloop.inputs): a file, a directory
# or a glob of CSV/Parquet, the format decided by content, then name.


def _prefetch(batches: Iterator[InputBatch], depth: int = 1) -> Iterator[InputBatch]:
    """Read ahead in a thread so parsing overlaps validation and scoring."""
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
        try:
            for batch in batches:
                if not offer(batch):
                    return
            offer(done)
        except BaseException as exc:  # noqa: BLE001 - surface reader errors in the consumer
            offer(exc)
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # in this thread, which iterated them: closes the input handle

    reader = threading.Thread(target=produce, name="driftloop-reader", daemon=True)
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
    run_id: str = ""  # the run's prefix in the output (runs/<run_id>/) and its manifest's name
    manifest: Manifest | None = None


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


def score_batches(
    batches: Iterator[InputBatch], model: LoadedModel, spec: DatasetSpec, run: RunWriter, *, partition: str,
    source: str, model_name: str, model_version: int, scored_at: datetime,
    predict: Callable[[pl.DataFrame], np.ndarray] | None = None,
    on_batch: Callable[[int, int | None], None] | None = None, total: int | None = None, keep_ids: bool = False,
) -> BatchCounts:
    """Validate, score and write each batch as parts of ``run`` named by ``partition``.
    A row repeating a unique value (the id) of an earlier batch is quarantined. Quarantine
    rows are numbered from the start of this stream. Reading, scoring and writing overlap:
    a reader thread parses the next batch, a writer thread encodes finished parts."""
    counts = BatchCounts()
    pending: list[Future[Any]] = []
    warned_columns = False
    template: pl.DataFrame | None = None
    # Ids (and other unique columns) kept so far: a repeat in a later batch is quarantined.
    # Memory grows by the id column only (8 bytes a row for int ids).
    seen: dict[str, SeenValues] = {}
    uniques = unique_columns(spec, labelled=False)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="driftloop-writer") as writer:
        for index, batch in enumerate(_prefetch(batches)):
            started = time.perf_counter()
            result = validate_rows(batch.frame, spec, labelled=False, source=source, warn_ignored=not warned_columns,
                                   seen=seen) if batch.frame.height else None
            warned_columns = True
            valid = result.valid if result else pl.DataFrame()
            for name in uniques if valid.height else ():
                seen.setdefault(name, SeenValues()).add(valid[name])
            if keep_ids and valid.height and result is not None:
                rows = pl.int_range(0, batch.frame.height, eager=True, dtype=pl.Int64)
                kept_rows = rows.filter(~rows.is_in(result.quarantine[ROW].implode())) + counts.rows_in
                for name in uniques:
                    counts.kept.setdefault(name, []).append(pl.DataFrame({ROW: kept_rows, name: valid[name]}))
            if result is not None and template is None:
                template = result.quarantine.head(0)  # every quarantine part gets this schema
            quarantine = result.quarantine.with_columns(pl.col(ROW) + counts.rows_in) if result else pl.DataFrame()
            if batch.malformed.height:
                base = quarantine if quarantine.width else (template if template is not None else pl.DataFrame())
                quarantine = pl.concat([base, batch.malformed], how="diagonal_relaxed")
            if valid.height:
                scores = predict(valid) if predict is not None else predict_scores(model, valid)
                predictions = prediction_frame(model, spec, valid, scores, model_name=model_name,
                                               model_version=model_version, scored_at=scored_at)
                pending.append(writer.submit(run.write_part, predictions, partition=partition, index=index))
            if quarantine.height:
                pending.append(writer.submit(run.write_part, quarantine, partition=partition, index=index,
                                             quarantine=True))
            counts.latencies.append(time.perf_counter() - started)
            counts.rows_in += batch.frame.height + batch.malformed.height
            counts.rows_scored += valid.height
            counts.rows_quarantined += quarantine.height
            # Bound memory: never more than two parts waiting for the writer.
            while len(pending) > 2:
                pending.pop(0).result()
            if on_batch is not None:
                on_batch(counts.rows_in, total)
        for done in pending:
            done.result()
    return counts


def score_stream(
    model: LoadedModel, input_uri: str, output_uri: str, *, model_name: str, model_version: int,
    batch_size: int = DEFAULT_BATCH_SIZE, on_batch: Callable[[int, int | None], None] | None = None,
    before_commit: Callable[[], None] | None = None, predict: Callable[[pl.DataFrame], np.ndarray] | None = None,
) -> ScoreResult:
    """Score ``input_uri`` into the scoring output ``output_uri`` (a directory or prefix,
    see :mod:`driftloop.outputs`). ``before_commit`` runs after the last part is written
    and before the manifest (tests inject crashes there). ``predict`` scores validated rows
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
                              rows_quarantined=counts.rows_quarantined, before_manifest=before_commit)
    return ScoreResult(
        rows_in=counts.rows_in, rows_scored=counts.rows_scored, rows_quarantined=counts.rows_quarantined,
        output_uri=output.uri,
        quarantine_uri=output.uri_of(f"{RUNS}/{run.run_id}/{QUARANTINE}") if counts.rows_quarantined else None,
        batches=len(counts.latencies), batch_latencies_s=counts.latencies, run_id=run.run_id, manifest=manifest,
    )


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


@task(name="fetch-model", cache_policy=NONE)
def fetch_model_task(uri: str, sha256: str, threads: int | None) -> LoadedModel:
    return load_verified_model(uri, sha256, threads=threads)


@task(name="fetch-scoring-form", cache_policy=NONE)
def fetch_form_task(record: Any, engine: Engine, device: Device, threads: int | None) -> tuple[FormScorer, str]:
    return load_scoring_form(record, engine=engine, device=device, threads=threads)


@task(name="score-batches", cache_policy=NONE)
def score_task(model: LoadedModel | FormScorer, input_uri: str, output_uri: str, model_name: str, model_version: int,
               batch_size: int) -> ScoreResult:
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    from driftloop import progress

    artifact_id = create_progress_artifact(0.0, description=f"Scoring {input_uri}")

    def on_batch(done: int, total: int | None) -> None:
        if total:
            update_progress_artifact(artifact_id, progress=min(100.0, 100.0 * done / total))
        progress.notify("score", done, total)

    scorer = model if isinstance(model, FormScorer) else onnx_scorer(model)
    result = score_stream(scorer.descriptor, input_uri, output_uri, model_name=model_name, model_version=model_version,
                          batch_size=batch_size, on_batch=on_batch, predict=scorer.predict)
    update_progress_artifact(artifact_id, progress=100.0)
    return result
