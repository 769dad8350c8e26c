"""Scoring outputs, committed the same way on a local disk and on an object store.

Layout of an output directory or prefix ``<out>``::

    <out>/_driftloop_output.json                                  marker, written before any part
    <out>/runs/<run_id>/part-<partition>-<n>.parquet              predictions of one run
    <out>/runs/<run_id>/quarantine/part-<partition>-<n>.parquet   its rows that failed validation
    <out>/_manifests/<committed-at>-<run_id>.json                 one per committed run, written last

A run writes its parts under its own prefix, then one small JSON manifest (parts with row
counts, sizes and sha256, model, masked input, row accounting) in a single PUT. The
*current* output is the newest manifest by name (names start with the UTC commit time):
there is no directory rename, which an object store does as copy-then-delete. So:

- a reader sees a run only once its manifest exists, and the manifest is written after
  every part it lists (and checked against a listing of them first);
- a crash (kill -9) before the manifest leaves the previous manifest current and readable;
  the crashed run's parts are an orphan prefix, removed once older than a grace period;
- two runs writing one output at once both finish; the later manifest wins and the output
  is exactly that run (each run's parts live under its own prefix);
- superseded runs are collected after a newer manifest is committed: the old manifest is
  deleted first, then its parts. A reader that loses that race (it picked a manifest just
  before it was superseded) finds a newer manifest and reads that instead.

A directory that holds files but no marker, manifest or pre-manifest ``_SUCCESS`` is not
a driftloop output: writing into it is refused and nothing there is touched.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import threading
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import fsspec
import polars as pl
import pyarrow.parquet as pq
from pydantic import BaseModel, Field, ValidationError

from driftloop.atomic import write_atomic
from driftloop.errors import DriftloopError
from driftloop.redact import mask_uri

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER = "_driftloop_output.json"
MANIFESTS = "_manifests"
RUNS = "runs"
QUARANTINE = "quarantine"
LEGACY_SUCCESS = "_SUCCESS"  # outputs committed before manifests: parts at the top, readable, replaced on the next run
ORPHAN_GRACE = timedelta(hours=1)  # a run prefix without a manifest younger than this may be a run in progress
SINGLE_PARTITION = "00000"  # the partition key of a whole input scored in one process
_TIME_FORMAT = "%Y%m%dT%H%M%S%fZ"  # sorts as text in time order
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]{0,127}$")
_LEGACY_PART = re.compile(r"^part-\d{5}\.parquet$")
_READ_ATTEMPTS = 5


# Parts are LZ4 (Parquet's LZ4_RAW, which polars, pyarrow, DuckDB and Spark read): a part
# writes every feature back, and zstd spent ~6x LZ4's time on float features for ~6%
# fewer bytes (100k rows x 20 float64 features: 16.3 vs 17.3 MB), on the threads that
# share the cores with scoring (bench/scoring.py --profile, "write").
PART_COMPRESSION = "lz4"


# A column's dictionary stops at this size and the rest of the column is written plain,
# in parts and in the predictions tables' data files alike (driftloop.tables). Features
# of real data repeat (amounts in cents, counts, codes): 100k rows x 20 features at two
# decimals encode to 4.4 MB with it and 9.4 MB without, in less time (36 vs 47 ms);
# full-precision floats, all distinct, give up after 32 KiB (+3 ms a batch). Edge parts
# travel home: their size is bandwidth.
DICTIONARY_LIMIT_BYTES = 32 * 1024


def encode_part(frame: pl.DataFrame) -> bytes:
    """A part's Parquet bytes, encoded by pyarrow on the calling thread. polars' writer
    encodes columns on its own pool: in the scorer's pipeline those threads competed
    with the kernel (pyarrow's writer on the writer thread alone: 1.06x end to end at 1
    thread, 1.11x at 2, bench/scoring.py)."""
    buffer = io.BytesIO()
    pq.write_table(frame.to_arrow(), buffer, compression=PART_COMPRESSION,
                   dictionary_pagesize_limit=DICTIONARY_LIMIT_BYTES)
    return buffer.getvalue()


class OutputError(DriftloopError):
    """A scoring output cannot be written or read as one complete run."""


class PartInfo(BaseModel):
    path: str = Field(description="Relative to the output: runs/<run_id>/[quarantine/]part-<partition>-<n>.parquet")
    rows: int
    bytes: int
    sha256: str


class Manifest(BaseModel):
    """What one committed run wrote: the only thing readers trust."""

    format_version: int = FORMAT_VERSION
    run_id: str
    model_name: str
    model_version: int
    input_uri: str = Field(description="Masked: never a credential.")
    parts: list[PartInfo]
    quarantine: list[PartInfo]
    rows_in: int
    rows_scored: int
    rows_quarantined: int
    created_at: datetime


def new_run_id(now: datetime | None = None) -> str:
    """Sortable by start time, unique across machines."""
    return f"{(now or datetime.now(UTC)):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:12]}"


def part_name(partition: str, index: int) -> str:
    """A part's file name from its partition key and its number within the partition: a
    re-run partition writes the same names, so it replaces its parts, never adds rows."""
    if not _NAME.match(partition):
        raise OutputError(f"partition key {partition!r} cannot name a file; use letters, digits, '_', '-', '.', '='")
    if index < 0:
        raise OutputError(f"part number must be >= 0, got {index}")
    return f"part-{partition}-{index:05d}.parquet"


def is_local_fs(fs: Any) -> bool:
    """A local disk (renames are atomic), as opposed to an object store (one PUT is)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols


def modified_time(info: dict[str, Any]) -> datetime | None:
    """An object's last-modified time from a listing, whatever the filesystem calls it."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified"):
        value = info.get(key)
        if isinstance(value, int | float):
            return datetime.fromtimestamp(value, UTC)
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        if isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value)  # 3.11+ reads a trailing Z
            except ValueError:
                continue
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def newest_write(fs: Any, path: str) -> datetime | None:
    """The newest modification time of any file under ``path``, listed afresh (None if
    there is nothing there)."""
    fs.invalidate_cache(path)
    try:
        listed = fs.find(path, detail=True, withdirs=False)
    except FileNotFoundError:
        return None
    times = [t for t in (modified_time(info) for info in listed.values()) if t is not None]
    return max(times) if times else None


def _is_legacy(names: list[str]) -> bool:
    """An output committed before manifests: ``_SUCCESS``, ``part-NNNNN.parquet`` and
    ``quarantine/`` and nothing else (a Spark or Hadoop directory, with its own
    ``_SUCCESS`` beside ``part-00000-<uuid>.snappy.parquet`` and ``.crc`` files, is not one)."""
    return LEGACY_SUCCESS in names and all(
        n in (LEGACY_SUCCESS, QUARANTINE) or _LEGACY_PART.match(n) for n in names)


def _is_ours(names: list[str]) -> bool:
    return MARKER in names or MANIFESTS in names or _is_legacy(names)


def _run_of(manifest_name: str) -> str:
    return manifest_name.removesuffix(".json").split("-", 1)[1]


class ScoringOutput:
    """One output directory or prefix: claimed, written run by run, read, collected."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/") or uri
        self.fs, path = fsspec.core.url_to_fs(self.uri)
        self.path = path.rstrip("/") or path
        self.shown = mask_uri(self.uri)
        self.local = is_local_fs(self.fs)

    def uri_of(self, relpath: str) -> str:
        return f"{self.uri}/{relpath}"

    def _full(self, relpath: str) -> str:
        return f"{self.path}/{relpath}"

    def _names(self, relpath: str = "") -> list[str]:
        """Entry names directly under ``relpath``, listed afresh (no cached listing)."""
        path = self._full(relpath) if relpath else self.path
        self.fs.invalidate_cache(path)
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _put(self, relpath: str, data: bytes) -> None:
        """Readers see the old object or the whole new one: one PUT on an object store,
        a temporary file renamed into place on a local disk."""
        full = self._full(relpath)
        if not self.local:
            self.fs.pipe_file(full, data)
            return
        write_atomic(full, data)  # durably: fsynced before the rename

    def _remove(self, relpath: str) -> None:
        try:
            self.fs.rm(self._full(relpath), recursive=True)
        except FileNotFoundError:
            pass  # a concurrent run's collection got there first

    # --- writing ---------------------------------------------------------------------

    def check_writable(self) -> None:
        """Refuse a path that holds anything but a driftloop output, before any write."""
        self.fs.invalidate_cache(self.path)
        try:
            info = self.fs.info(self.path)
        except FileNotFoundError:
            return
        if info.get("type") != "directory":
            raise OutputError(
                f"scoring output {self.shown} is a file, not a directory; nothing was written: "
                "choose a new or empty directory for --output"
            )
        # A temporary file is a concurrent first run writing the marker.
        names = [n for n in self._names() if not n.startswith(".tmp-")]
        if names and not _is_ours(names):
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise OutputError(
                f"refusing to write the scoring output into {self.shown}: it holds files that are not a driftloop "
                f"scoring output ({shown}) and no {MARKER}; nothing there was changed: choose a new or empty "
                "directory for --output"
            )

    def claim(self) -> None:
        """Make sure this is a driftloop output (refusing anything else) and mark it so."""
        self.check_writable()
        if MARKER not in self._names():
            marker = {"format_version": FORMAT_VERSION, "kind": "driftloop-scoring-output",
                      "layout": f"{RUNS}/<run_id>/part-*.parquet, committed by {MANIFESTS}/<time>-<run_id>.json"}
            self._put(MARKER, json.dumps(marker, indent=2).encode())

    def start_run(self, run_id: str | None = None) -> RunWriter:
        run_id = run_id or new_run_id()
        if not _NAME.match(run_id):
            raise OutputError(f"run id {run_id!r} cannot name a prefix; use letters, digits, '_', '-', '.', '='")
        return RunWriter(self, run_id)

    def write_part(self, run_id: str, frame: pl.DataFrame, *, partition: str, index: int,
                   quarantine: bool = False) -> PartInfo:
        """Write one part of a run (from any process: only the output URI and run id are
        needed) and describe it for the manifest."""
        info, data = self.encode_part(run_id, frame, partition=partition, index=index, quarantine=quarantine)
        self._put(info.path, data)
        return info

    def encode_part(self, run_id: str, frame: pl.DataFrame, *, partition: str, index: int,
                    quarantine: bool = False) -> tuple[PartInfo, bytes]:
        """A part's bytes and its description, not yet written (``put_part`` writes them)."""
        relpath = f"{RUNS}/{run_id}/" + (f"{QUARANTINE}/" if quarantine else "") + part_name(partition, index)
        data = encode_part(frame)
        return PartInfo(path=relpath, rows=frame.height, bytes=len(data), sha256=hashlib.sha256(data).hexdigest()), data

    def put_part(self, info: PartInfo, data: bytes) -> None:
        self._put(info.path, data)

    def commit(self, manifest: Manifest) -> tuple[str, Manifest]:
        """Check that every listed part is there, write the manifest (the commit), then
        collect what it supersedes. Returns the manifest's name and the manifest as written."""
        self._check_parts_written(manifest)
        name, manifest = self._write_manifest(manifest)
        try:
            self.collect_garbage()
        except Exception as exc:  # noqa: BLE001 - the run is committed; leftovers wait for `driftloop gc`
            logger.warning("scoring output %s: committed %s, but removing superseded runs failed (%s); "
                           "`driftloop gc --apply` removes them later", self.shown, name, exc)
        return name, manifest

    def _write_manifest(self, manifest: Manifest) -> tuple[str, Manifest]:
        """The commit itself: one manifest object, written after every part is there.
        (Fault tests wrap this method to act in the moment before it.)"""
        committed = datetime.now(UTC)
        manifest = manifest.model_copy(update={"created_at": committed})
        name = f"{committed.strftime(_TIME_FORMAT)}-{manifest.run_id}.json"
        self._put(f"{MANIFESTS}/{name}", manifest.model_dump_json(indent=2).encode())
        return name, manifest

    def _check_parts_written(self, manifest: Manifest) -> None:
        prefix = self._full(f"{RUNS}/{manifest.run_id}")
        self.fs.invalidate_cache(prefix)
        try:
            listed = self.fs.find(prefix, detail=True)
        except FileNotFoundError:
            listed = {}
        sizes = {p.removeprefix(self.path + "/"): info.get("size") for p, info in listed.items()}
        for part in [*manifest.parts, *manifest.quarantine]:
            if sizes.get(part.path) != part.bytes:
                raise OutputError(
                    f"scoring output {self.shown}: run {manifest.run_id}'s part {part.path} is "
                    + ("missing" if part.path not in sizes else f"{sizes[part.path]} bytes, expected {part.bytes}")
                    + " before its manifest was written; nothing was committed: score again"
                )

    def abort(self, run_id: str) -> None:
        """Remove a failed run's parts (best effort: `driftloop gc` removes what is left)."""
        try:
            self._remove(f"{RUNS}/{run_id}")
        except Exception as exc:  # noqa: BLE001 - the run's own error matters more
            logger.warning("scoring output %s: could not remove failed run %s (%s)", self.shown, run_id, exc)

    # --- reading ---------------------------------------------------------------------

    def manifest_names(self) -> list[str]:
        return [n for n in self._names(MANIFESTS) if n.endswith(".json") and not n.startswith(".")]

    def load_manifest(self, name: str) -> Manifest:
        where = f"{self.shown}/{MANIFESTS}/{name}"
        try:
            raw = self.fs.cat_file(self._full(f"{MANIFESTS}/{name}"))
            manifest = Manifest.model_validate_json(raw)
        except FileNotFoundError:
            raise
        except (ValidationError, ValueError) as exc:
            raise OutputError(f"manifest {where} is not a driftloop manifest ({exc}); remove it and score again") from None
        if manifest.format_version > FORMAT_VERSION:
            raise OutputError(f"manifest {where} has format version {manifest.format_version}, newer than this "
                              f"driftloop reads ({FORMAT_VERSION}); upgrade driftloop")
        return manifest

    def current(self) -> tuple[str, Manifest] | None:
        """The newest committed manifest, or None when nothing was committed."""
        for _ in range(_READ_ATTEMPTS):
            names = self.manifest_names()
            if not names:
                return None
            try:
                return names[-1], self.load_manifest(names[-1])
            except FileNotFoundError:
                continue  # superseded and collected between listing and reading: list again
        raise OutputError(f"scoring output {self.shown}: its manifests kept changing while being read; read again")

    def read(self, *, quarantine: bool = False) -> pl.DataFrame:
        """The current run's predictions (or quarantine), each part checked against the
        manifest's size and sha256."""
        for _ in range(_READ_ATTEMPTS):
            found = self.current()
            if found is None:
                # (a first run in the new layout may be under way beside the old parts)
                if _is_legacy([n for n in self._names() if n not in (MARKER, MANIFESTS, RUNS)]):
                    return self._read_legacy(quarantine)
                raise OutputError(
                    f"{self.shown} is not a committed scoring output (no manifest under {MANIFESTS}/); score into "
                    "it first, or point at the output a `driftloop score` run printed"
                )
            name, manifest = found
            try:
                return self._read_parts(manifest.quarantine if quarantine else manifest.parts)
            except _PartProblem as problem:
                names = self.manifest_names()
                if names and names[-1] != name:
                    continue  # superseded while read, its parts being collected: read the newer run
                raise OutputError(
                    f"scoring output {self.shown}: manifest {MANIFESTS}/{name} lists part {problem.path}, which "
                    f"{problem.what}; the output was changed outside driftloop: score its input again to rewrite it"
                ) from None
        raise OutputError(f"scoring output {self.shown} kept being replaced while being read; read again")

    def read_part(self, part: PartInfo) -> pl.DataFrame:
        """One part, checked against its recorded size and sha256."""
        try:
            return self._read_parts([part])
        except _PartProblem as problem:
            raise OutputError(f"{self.uri}: part {problem.path} {problem.what}") from None

    def remove_part(self, part: PartInfo) -> None:
        self._remove(part.path)

    def _read_parts(self, parts: list[PartInfo]) -> pl.DataFrame:
        frames = []
        for part in parts:
            try:
                data = self.fs.cat_file(self._full(part.path))
            except FileNotFoundError:
                raise _PartProblem(part.path, "is missing") from None
            if len(data) != part.bytes:
                raise _PartProblem(part.path, f"has {len(data)} bytes, not the {part.bytes} recorded")
            digest = hashlib.sha256(data).hexdigest()
            if digest != part.sha256:
                raise _PartProblem(part.path, f"has sha256 {digest}, not the {part.sha256} recorded")
            frames.append(pl.read_parquet(io.BytesIO(data)))
        return pl.concat(frames) if frames else pl.DataFrame()

    def _read_legacy(self, quarantine: bool) -> pl.DataFrame:
        where = self._full(QUARANTINE) if quarantine else self.path
        frames = []
        for part in sorted(self.fs.glob(f"{where}/part-*.parquet")):
            with self.fs.open(part, "rb") as fh:
                frames.append(pl.read_parquet(fh))
        return pl.concat(frames) if frames else pl.DataFrame()

    # --- collection ------------------------------------------------------------------

    def collect_garbage(self, *, now: datetime | None = None, grace: timedelta = ORPHAN_GRACE,
                        apply: bool = True) -> list[str]:
        """Remove (when ``apply``) what the current manifest does not need: superseded runs
        (manifest first, then parts), run prefixes without a manifest untouched for
        ``grace`` (crashed runs; a younger one may be a run in progress), the pre-manifest
        layout's files once a manifest exists, and stale temporary files. Returns the
        paths, relative to the output."""
        now = now or datetime.now(UTC)
        if not {MARKER, MANIFESTS} & set(self._names()):
            return []  # not (or no longer) a driftloop output: nothing here is ours to remove
        names = self.manifest_names()
        doomed: list[str] = []
        for name in names[:-1]:
            doomed += [f"{MANIFESTS}/{name}", f"{RUNS}/{_run_of(name)}"]
        live = {_run_of(names[-1])} if names else set()
        superseded = {_run_of(n) for n in names[:-1]}
        for run in self._names(RUNS):
            if run in live or run in superseded:
                continue
            newest = self._newest_write(f"{RUNS}/{run}")
            if newest is None or newest < now - grace:
                doomed.append(f"{RUNS}/{run}")
        for name in self._names(MANIFESTS):
            if name.startswith(".tmp-"):
                newest = self._newest_write(f"{MANIFESTS}/{name}")
                if newest is None or newest < now - grace:
                    doomed.append(f"{MANIFESTS}/{name}")
        if names:  # the pre-manifest layout's files, superseded by the manifest
            doomed += [n for n in self._names() if n in (LEGACY_SUCCESS, QUARANTINE) or _LEGACY_PART.match(n)]
        if apply:
            for relpath in doomed:  # in order: a superseded manifest goes before its parts
                self._remove(relpath)
        return doomed

    def _newest_write(self, relpath: str) -> datetime | None:
        return newest_write(self.fs, self._full(relpath))


class _PartProblem(Exception):
    def __init__(self, path: str, what: str) -> None:
        super().__init__(f"{path} {what}")
        self.path = path
        self.what = what


# Parts a run may hold in memory while their puts are under way (each ~15 MB per 100k
# rows of 20 features).
PUTS_IN_FLIGHT = 2


class RunWriter:
    """One run's parts, written in any order (from a writer thread, or handed back by
    partition tasks), then committed by one manifest.

    ``write_part`` encodes a part on the caller's thread and puts it (a durable write and
    rename on a local disk, one PUT on an object store) on a thread of its own, so the
    next part encodes while the disk or network catches up: on a local disk the fsync
    took 0.2-0.9 s of a 2-3 s run at 2 threads (bench/scoring.py), all of it on the
    writer thread before. At most ``PUTS_IN_FLIGHT`` puts wait; a part is recorded once
    its put has finished, and ``parts``, ``commit`` and ``abort`` wait for every put
    first (a put's error is raised there, or by the next ``write_part``)."""

    def __init__(self, output: ScoringOutput, run_id: str) -> None:
        self.output = output
        self.run_id = run_id
        self._parts: dict[str, PartInfo] = {}
        self._quarantine: dict[str, PartInfo] = {}
        self._lock = threading.Lock()
        self._puts: ThreadPoolExecutor | None = None
        self._in_flight: deque[Future[None]] = deque()

    def write_part(self, frame: pl.DataFrame, *, partition: str, index: int, quarantine: bool = False) -> PartInfo:
        info, data = self.output.encode_part(self.run_id, frame, partition=partition, index=index, quarantine=quarantine)
        with self._lock:
            if self._puts is None:
                self._puts = ThreadPoolExecutor(max_workers=1, thread_name_prefix="driftloop-put")
            self._in_flight.append(self._puts.submit(self._put_and_add, info, data, quarantine))
            waiting = [self._in_flight.popleft() for _ in range(max(0, len(self._in_flight) - PUTS_IN_FLIGHT))]
        for put in waiting:
            put.result()
        return info

    def _put_and_add(self, info: PartInfo, data: bytes, quarantine: bool) -> None:
        self.output.put_part(info, data)
        self.add(info, quarantine=quarantine)

    def flush(self) -> None:
        """Wait for every put under way; raise the first one's error."""
        with self._lock:
            waiting, self._in_flight = list(self._in_flight), deque()
            puts, self._puts = self._puts, None
        try:
            for put in waiting:
                put.result()
        finally:
            if puts is not None:
                puts.shutdown(wait=True)

    def parts(self, *, quarantine: bool = False) -> list[PartInfo]:
        """The parts written so far (predictions, or the quarantine's)."""
        self.flush()
        with self._lock:
            return list((self._quarantine if quarantine else self._parts).values())

    def add(self, info: PartInfo, *, quarantine: bool = False) -> None:
        """Record a part written elsewhere; a re-written part replaces its earlier entry."""
        with self._lock:
            (self._quarantine if quarantine else self._parts)[info.path] = info

    def commit(self, *, model_name: str, model_version: int, input_uri: str, rows_in: int, rows_scored: int,
               rows_quarantined: int) -> Manifest:
        self.flush()
        with self._lock:
            parts, quarantine = list(self._parts.values()), list(self._quarantine.values())
        if sum(p.rows for p in parts) != rows_scored or sum(p.rows for p in quarantine) != rows_quarantined:
            raise OutputError(
                f"scoring output {self.output.shown}: run {self.run_id}'s parts hold {sum(p.rows for p in parts)} "
                f"scored and {sum(p.rows for p in quarantine)} quarantined rows, not the {rows_scored} and "
                f"{rows_quarantined} counted; nothing was committed"
            )
        manifest = Manifest(
            run_id=self.run_id, model_name=model_name, model_version=model_version, input_uri=mask_uri(input_uri),
            parts=parts, quarantine=quarantine, rows_in=rows_in, rows_scored=rows_scored,
            rows_quarantined=rows_quarantined, created_at=datetime.now(UTC),
        )
        return self.output.commit(manifest)[1]

    def abort(self) -> None:
        try:
            self.flush()  # no part lands after the run's prefix is removed
        except Exception as exc:  # noqa: BLE001 - the run's own error matters more; its parts go anyway
            logger.debug("scoring output %s: a put of failed run %s failed too (%s)", self.output.shown, self.run_id, exc)
        self.output.abort(self.run_id)


# --- the readers' entry points -------------------------------------------------------


def read_predictions(uri: str) -> pl.DataFrame:
    """The predictions of the output's current (newest committed) run, verified."""
    return ScoringOutput(uri).read()


def read_quarantine(uri: str) -> pl.DataFrame:
    """The rows the output's current run quarantined, verified (empty when none)."""
    return ScoringOutput(uri).read(quarantine=True)


def current_manifest(uri: str) -> Manifest | None:
    found = ScoringOutput(uri).current()
    return found[1] if found else None
