"""Partitioned scoring: one input split into coarse partitions scored in parallel (on a
Dask cluster through Prefect's DaskTaskRunner), committed as one run.

The result equals single-process scoring of the same input: the same rows scored with
bitwise-equal probabilities, the same rows quarantined, the same row accounting.

- **Plan** (:func:`plan_partitions`): a directory or glob gives one partition per file; one
  large Parquet file is split by row-group ranges. Partitions are references (a file and a
  row-group range), never data, and coarse (tens), since every one is a task run record.
- **Score** (:func:`score_partition`, on a worker): the batch loop of single-process
  scoring over the partition, writing parts named by the partition key, so a partition
  that runs again (a Dask worker died after it finished) rewrites its own parts and never
  adds rows. It also writes the unique values (ids) it kept, with their row numbers, beside
  its parts. Each worker process loads the version's scoring form once.
- **Settle** (:func:`settle_partitions`, in the flow): an id kept by an earlier partition
  and again by a later one is a repeat, as it would have been in one process: those rows
  move from the later partition's predictions to its quarantine; quarantine row numbers
  are shifted from partition-relative to input-relative. Then one manifest commits it all.
"""

from __future__ import annotations

import io
import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import fsspec
import polars as pl

from driftloop.errors import DriftloopError
from driftloop.forms import Device, Engine, FormScorer
from driftloop.inputs import InputFile, iter_file, list_input_files, parquet_row_groups
from driftloop.outputs import RUNS, PartInfo, RunWriter, ScoringOutput
from driftloop.tasks.score import BatchCounts, load_scoring_form, score_batches
from driftloop.tasks.validate import ROW, unique_columns, without_reserved_columns

logger = logging.getLogger(__name__)

MAX_PARTITIONS = 64  # each partition is a task run on the server: keep them coarse
IDS = "_ids"  # beside a run's parts: the unique values each partition kept


@dataclass(frozen=True)
class Partition:
    key: str  # names its parts: p00000, p00001, ... in input order
    file: InputFile
    row_groups: tuple[int, int] | None = None  # [start, stop) of a split Parquet file


def plan_partitions(input_uri: str, *, workers: int) -> list[Partition]:
    """Coarse partitions in input order: one per file of a directory or glob (files beyond
    ``MAX_PARTITIONS`` are refused: merge them), or row-group ranges of one Parquet file,
    about four per worker. One CSV file is one partition."""
    files = list_input_files(input_uri)
    if len(files) > MAX_PARTITIONS:
        raise DriftloopError(
            f"input {files[0].uri.rsplit('/', 1)[0]} has {len(files)} files, more than the {MAX_PARTITIONS} partitions "
            "partitioned scoring schedules (each is a task run on the Prefect server): merge them into larger files"
        )
    if len(files) > 1 or files[0].format != "parquet" or files[0].compression:
        return [Partition(f"p{i:05d}", f) for i, f in enumerate(files)]
    groups = len(parquet_row_groups(files[0].uri))
    count = max(1, min(groups, workers * 4, MAX_PARTITIONS))
    bounds = [round(i * groups / count) for i in range(count + 1)]
    return [Partition(f"p{i:05d}", files[0], (bounds[i], bounds[i + 1])) for i in range(count) if bounds[i] < bounds[i + 1]]


@dataclass
class PartitionResult:
    key: str
    rows_in: int
    rows_scored: int
    rows_quarantined: int
    parts: list[PartInfo]
    quarantine: list[PartInfo]
    ids: dict[str, str] = field(default_factory=dict)  # unique column -> relpath of the kept values
    form: str = "onnx"


# One loaded form per worker process and version: loading an ONNX Runtime session per
# partition would cost more than scoring a small one.
_FORMS: dict[tuple[str, int, str, str, str, int | None], tuple[FormScorer, str]] = {}
_FORMS_LOCK = threading.Lock()


def _form(record: Any, engine: Engine, device: Device, threads: int | None) -> tuple[FormScorer, str]:
    key = (record.model_name, record.version, record.onnx_sha256, engine, device, threads)
    with _FORMS_LOCK:
        if key not in _FORMS:
            _FORMS[key] = load_scoring_form(record, engine=engine, device=device, threads=threads)
        return _FORMS[key]


def _write_frame(output: ScoringOutput, relpath: str, frame: pl.DataFrame) -> None:
    buffer = io.BytesIO()
    frame.write_parquet(buffer, compression="zstd")
    with fsspec.open(output.uri_of(relpath), "wb") as fh:
        fh.write(buffer.getvalue())


def _read_frame(output: ScoringOutput, relpath: str) -> pl.DataFrame:
    with fsspec.open(output.uri_of(relpath), "rb") as fh:
        return pl.read_parquet(fh)


def score_partition(record: Any, partition: Partition, output_uri: str, run_id: str, *, engine: Engine,
                    device: Device, threads: int | None, batch_size: int, scored_at: datetime) -> PartitionResult:
    """Score one partition into the run's prefix (idempotent: a re-run rewrites the same
    part names). Runs on a worker; everything it needs comes as references."""
    scorer, _ = _form(record, engine, device, threads)
    spec = scorer.descriptor.spec()
    output = ScoringOutput(output_uri)
    run = RunWriter(output, run_id)
    batches, _ = iter_file(partition.file, batch_size, partition.row_groups)
    counts: BatchCounts = score_batches(
        batches, scorer.descriptor, spec, run, partition=partition.key, source=partition.file.uri,
        model_name=record.model_name, model_version=record.version, scored_at=scored_at, predict=scorer.predict,
        keep_ids=True,
    )
    ids = {}
    for name, frames in counts.kept.items():
        relpath = f"{RUNS}/{run_id}/{IDS}/{partition.key}-{name}.parquet"
        _write_frame(output, relpath, pl.concat(frames) if frames else pl.DataFrame())
        ids[name] = relpath
    return PartitionResult(partition.key, counts.rows_in, counts.rows_scored, counts.rows_quarantined,
                           run.parts(), run.parts(quarantine=True), ids, scorer.kind)


@dataclass
class Settled:
    rows_in: int
    rows_scored: int
    rows_quarantined: int
    repeats_moved: int


def settle_partitions(output: ScoringOutput, run: RunWriter, spec: Any, partitions: list[Partition],
                      results: list[PartitionResult], *, batch_size: int) -> Settled:
    """Make the partitions one run, as if scored in one process (see the module doc), and
    record every final part on ``run``."""
    by_key = {p.key: p for p in partitions}
    results = sorted(results, key=lambda r: r.key)
    repeats = cross_partition_repeats(output, results, unique_columns(spec, labelled=False))
    offset = 0
    moved = 0
    for result in results:
        parts, quarantine = list(result.parts), list(result.quarantine)
        repeated = repeats.get(result.key, {})
        if repeated:
            parts, extra, count = _move_repeats(output, run.run_id, result, by_key[result.key], repeated, batch_size)
            quarantine.append(extra)
            moved += count
        quarantine = [_shift_rows(output, part, offset) for part in quarantine] if offset else quarantine
        for part in parts:
            run.add(part)
        for part in quarantine:
            run.add(part, quarantine=True)
        offset += result.rows_in
    scored = sum(p.rows for p in run.parts())
    quarantined = sum(p.rows for p in run.parts(quarantine=True))
    return Settled(offset, scored, quarantined, moved)


def cross_partition_repeats(output: ScoringOutput, results: list[PartitionResult],
                            uniques: list[str]) -> dict[str, dict[str, pl.DataFrame]]:
    """Per partition key and unique column: the kept rows (``ROW``, value) whose value an
    earlier partition kept too. A partition keeps each value once (a repeat within it is
    already quarantined), so a value kept by several partitions belongs to the first."""
    found: dict[str, dict[str, pl.DataFrame]] = {}
    for name in uniques:
        frames = [_read_frame(output, r.ids[name]).with_columns(pl.lit(i, dtype=pl.Int32).alias("_partition"))
                  for i, r in enumerate(results) if name in r.ids]
        frames = [f for f in frames if f.height]
        if not frames:
            continue
        kept = pl.concat(frames)
        later = (kept.filter(pl.col(name).is_duplicated())
                 .filter(pl.col("_partition") > pl.col("_partition").min().over(name)))
        for (index,), rows in later.group_by("_partition"):
            found.setdefault(results[int(index)].key, {})[name] = rows.drop("_partition")
    return found


def _move_repeats(output: ScoringOutput, run_id: str, result: PartitionResult, partition: Partition,
                  repeated: dict[str, pl.DataFrame], batch_size: int) -> tuple[list[PartInfo], PartInfo, int]:
    """Take the repeated rows out of a partition's prediction parts (rewritten under the
    same names) into one more quarantine part: the rows as read from the input, flagged as
    single-process scoring flags a repeat (``unique(earlier batch)``)."""
    flags = pl.concat([
        frame.select(
            pl.col(ROW), pl.lit([name]).alias("_columns"), pl.lit(["unique(earlier batch)"]).alias("_checks"),
            pl.col(name).cast(pl.String).map_elements(lambda v: [v], return_dtype=pl.List(pl.String)).alias("_values"),
        )
        for name, frame in repeated.items()
    ]).unique(ROW, keep="first", maintain_order=True)
    parts: list[PartInfo] = []
    for part in result.parts:
        frame = _read_frame(output, part.path)
        is_repeat = pl.lit(False)
        for name, ids in repeated.items():
            is_repeat = is_repeat | pl.col(name).is_in(ids[name].implode())
        kept = frame.filter(~is_repeat)
        if kept.height == frame.height:
            parts.append(part)
            continue
        index = int(part.path.rsplit("-", 1)[-1].removesuffix(".parquet"))
        parts.append(output.write_part(run_id, kept, partition=result.key, index=index))
    quarantined = _raw_rows(partition, flags[ROW], batch_size).join(flags, on=ROW, how="inner").sort(ROW)
    extra = output.write_part(run_id, quarantined, partition=f"{result.key}-repeats", index=0, quarantine=True)
    return parts, extra, quarantined.height


def _raw_rows(partition: Partition, rows: pl.Series, batch_size: int) -> pl.DataFrame:
    """The partition's input rows at ``rows`` (partition-relative), as the reader gave them."""
    wanted = rows.implode()
    found: list[pl.DataFrame] = []
    offset = 0
    batches, _ = iter_file(partition.file, batch_size, partition.row_groups)
    for batch in batches:
        frame, _ = without_reserved_columns(batch.frame, source=partition.file.uri)
        numbered = frame.with_row_index(ROW).with_columns(pl.col(ROW).cast(pl.Int64) + offset)
        found.append(numbered.filter(pl.col(ROW).is_in(wanted)))
        offset += batch.frame.height + batch.malformed.height
    return pl.concat(found) if found else pl.DataFrame()


def _shift_rows(output: ScoringOutput, part: PartInfo, offset: int) -> PartInfo:
    """A quarantine part's row numbers, from partition-relative to input-relative."""
    frame = _read_frame(output, part.path)
    if ROW not in frame.columns:
        return part
    frame = frame.with_columns(pl.col(ROW) + offset)
    run_id = part.path.split("/")[1]
    name = part.path.rsplit("/", 1)[-1]
    key, index = name.removeprefix("part-").removesuffix(".parquet").rsplit("-", 1)
    return output.write_part(run_id, frame, partition=key, index=int(index), quarantine=True)

