"""The one reader of the project's inputs: ingestion, scoring and monitoring's label files
all come through here.

An input is a file, a directory or a glob of CSV/Parquet files, local or any fsspec URI
(``s3://bucket/day=2024-06-01/``). One function, :func:`input_format`, decides what a
file is: its first bytes when they are at hand (Parquet starts with ``PAR1``), else its
name; compression (``.gz``, ``.bz2``, ...) is inferred from the name. CSV is read with
every column as text (the spec types it later); records the parser cannot split, or
that hold bytes that are not UTF-8, come back in a ``malformed`` frame for the
quarantine instead of being dropped.

:func:`list_input_files` and :func:`parquet_row_groups` name the pieces of an input
without reading it, so partitioned scoring can hand out references, never data.

A URI with credentials in it (``s3://key:secret@...``, ``?X-Amz-Signature=...``) is
refused here before anything is opened (:func:`driftloop.redact.refuse_credentials`).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec.utils import infer_compression

from driftloop.errors import SourceError
from driftloop.redact import mask_uri, refuse_credentials

logger = logging.getLogger(__name__)

InputFormat = Literal["parquet", "csv"]

ROW = "_row"  # a quarantine record's row position in its input (null: not a row the reader could split)
PARQUET_MAGIC = b"PAR1"
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".txt")
_GLOB_CHARS = "*?["

# Invalid UTF-8 bytes decode to these private-use code points (one per byte value), so
# a bad byte survives to the quarantine instead of being replaced or dropped.
_BAD_BYTE_BASE = 0x10FF00
_BAD_BYTE_PATTERN = "[\U0010ff00-\U0010ffff]"
_BAD_BYTE_HANDLER = "driftloop-mark-bad-bytes"


def _mark_bad_bytes(error: UnicodeError) -> tuple[str, int]:
    assert isinstance(error, UnicodeDecodeError)
    bad = error.object[error.start : error.end]
    return "".join(chr(_BAD_BYTE_BASE + b) for b in bad), error.end


def _bad_byte_errors() -> str:
    """The codec error handler's name, registered on first use (nothing on import)."""
    try:
        codecs.lookup_error(_BAD_BYTE_HANDLER)
    except LookupError:
        codecs.register_error(_BAD_BYTE_HANDLER, _mark_bad_bytes)
    return _BAD_BYTE_HANDLER


# --- what an input is ----------------------------------------------------------------


@dataclass(frozen=True)
class InputFile:
    """One file of an input: a reference a task can be given instead of data."""

    uri: str  # as given for a one-file input; protocol-qualified for files found in a directory or glob
    format: InputFormat
    compression: str | None
    size: int | None


def _strip_compression(name: str) -> str:
    compression = infer_compression(name)
    return name.rsplit(".", 1)[0] if compression else name


def input_format(uri: str, head: bytes | None = None) -> InputFormat:
    """Parquet or CSV: the content decides when its first (decompressed) bytes are given,
    else the name (after any compression suffix); anything else is read as CSV."""
    if head is not None and head[:4] == PARQUET_MAGIC:
        return "parquet"
    if _strip_compression(uri.lower()).endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "csv"


def _is_data_file(name: str) -> bool:
    return _strip_compression(name.lower()).endswith(PARQUET_SUFFIXES + CSV_SUFFIXES)


def _hidden(relpath: str) -> bool:
    """Bookkeeping beside data (``_SUCCESS``, ``_manifests/``, ``.tmp-*``), never data."""
    return any(part.startswith(("_", ".")) for part in relpath.split("/") if part)


def _qualified(fs: Any, path: str) -> str:
    from driftloop.outputs import is_local_fs

    return path if is_local_fs(fs) else fs.unstrip_protocol(path)


def list_input_files(uri: str) -> list[InputFile]:
    """The files of an input, in name order: the file itself, every CSV/Parquet file
    under a directory (recursively; names starting with ``_`` or ``.`` are bookkeeping and
    skipped), or the files a glob matches."""
    from driftloop.demo_data import resolve_demo_uri

    uri = resolve_demo_uri(refuse_credentials(uri))
    shown = mask_uri(uri)
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as exc:
        raise SourceError(f"input {shown} cannot be opened: {exc}") from None
    path = path.rstrip("/") or path
    try:
        if any(ch in path for ch in _GLOB_CHARS):
            found = {p: info for p, info in fs.glob(path, detail=True).items() if info.get("type") == "file"}
            if not found:
                raise SourceError(f"input {shown} matches no files; check the pattern")
        else:
            info = fs.info(path)
            if info.get("type") != "directory":
                return [InputFile(uri, input_format(uri), infer_compression(uri), info.get("size"))]
            listed = fs.find(path, detail=True)
            found = {p: i for p, i in listed.items() if not _hidden(p[len(path):]) and _is_data_file(p)}
            if not found:
                raise SourceError(f"input {shown} is a directory with no .parquet or .csv files; "
                                  "point at a file, or put the data files in it")
    except FileNotFoundError:
        raise SourceError(f"input {shown} does not exist; check the path or URI") from None
    except SourceError:
        raise
    except (OSError, ValueError) as exc:
        raise SourceError(f"input {shown} cannot be listed: {exc}") from None
    return [InputFile(_qualified(fs, p), input_format(p), infer_compression(p), info.get("size"))
            for p, info in sorted(found.items())]


def input_key(uri: str) -> str:
    """What identifies one input for the predictions table: its masked URI and a
    fingerprint of the files it resolves to (path, size and the store's version tag:
    mtime, ETag or checksum). Scoring the same files again gives the same key (the run
    replaces its rows); another file with the same name, or changed content, another."""
    files = list_input_files(uri)
    digest = hashlib.sha256()
    for file in files:
        fs, path = fsspec.core.url_to_fs(file.uri)
        try:
            info = fs.info(path)
        except (OSError, ValueError):
            info = {}
        version = next((str(info[k]) for k in ("ETag", "etag", "md5Hash", "checksum", "mtime", "LastModified",
                                                 "last_modified") if info.get(k) is not None), "")
        digest.update(f"{mask_uri(file.uri)}\0{info.get('size', file.size)}\0{version}\n".encode())
    return f"{mask_uri(uri)}#{digest.hexdigest()[:20]}"


def parquet_row_groups(uri: str) -> list[int]:
    """The row count of each row group of a Parquet file: the ranges partitioned scoring
    splits one large file into (read from the footer only)."""
    with _open(uri) as handle:
        try:
            metadata = pq.ParquetFile(handle).metadata
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several error types for corrupt files
            raise SourceError(f"input {mask_uri(uri)} is not a readable Parquet file: {exc}") from None
        return [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]


def _open(uri: str) -> Any:
    """A binary handle on the decompressed content; a missing file is a SourceError."""
    shown = mask_uri(refuse_credentials(uri))
    try:
        return fsspec.open(uri, "rb", compression="infer").open()
    except FileNotFoundError:
        raise SourceError(f"input {shown} does not exist; check the path or URI") from None
    except IsADirectoryError:
        raise SourceError(f"input {shown} is a directory; pass a CSV or Parquet file") from None
    except (OSError, ValueError, ImportError) as exc:
        raise SourceError(f"input {shown} cannot be read: {exc}") from None


def _sniff(handle: Any) -> bytes:
    head = handle.read(4)
    handle.seek(0)
    return head


# --- whole inputs (ingestion, label files) --------------------------------------------


@dataclass
class RawInput:
    """Rows as read, before validation, plus what the reader could not parse."""

    frame: pl.DataFrame
    malformed: pl.DataFrame
    source: str  # masked: never a credential
    content_hash: str


def read_input(uri: str) -> RawInput:
    """Every row of a file, directory or glob, read once and hashed as read. The content
    hash of a one-file input is the sha256 of its bytes (dataset ids stay what they were);
    of several, the sha256 of their hashes in name order."""
    files = list_input_files(uri)
    shown = mask_uri(uri)
    if len({f.format for f in files}) > 1:
        raise SourceError(f"input {shown} mixes CSV and Parquet files; give files of one format")
    frames, malformed, digests = [], [], []
    for file in files:
        frame, bad, digest = _read_whole(file)
        frames.append(frame)
        malformed.append(bad)
        digests.append(digest)
    try:
        frame = frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")
    except pl.exceptions.PolarsError as exc:
        raise SourceError(f"input {shown}: its files do not share one schema ({exc}); give files with the same columns") from None
    bad = pl.concat(malformed)
    if frame.height + bad.height == 0:
        raise SourceError(f"input {shown} has a header but no data rows; nothing to ingest")
    content_hash = digests[0] if len(digests) == 1 else hashlib.sha256("\n".join(digests).encode()).hexdigest()
    return RawInput(frame=frame, malformed=bad, source=shown, content_hash=content_hash)


def _read_whole(file: InputFile) -> tuple[pl.DataFrame, pl.DataFrame, str]:
    shown = mask_uri(file.uri)
    with _open(file.uri) as handle:
        try:
            data = handle.read()
        except (OSError, ValueError, EOFError) as exc:
            raise SourceError(f"input {shown} cannot be read: {exc}") from None
    if not data.strip():
        raise SourceError(f"input {shown} is empty; expected a header line and data rows")
    digest = hashlib.sha256(data).hexdigest()
    if input_format(file.uri, data[:4]) == "parquet":
        try:
            return pl.read_parquet(io.BytesIO(data)), malformed_frame([]), digest
        except Exception as exc:  # noqa: BLE001 - polars raises several error types for corrupt files
            raise SourceError(f"input {shown} is not a readable Parquet file: {exc}") from None
    frame, bad = read_csv_bytes(data, shown)
    return frame, bad, digest


# --- streamed inputs (scoring) ---------------------------------------------------------


@dataclass
class InputBatch:
    frame: pl.DataFrame
    malformed: pl.DataFrame  # records the reader could not split (CSV only)


def iter_input(uri: str, batch_size: int) -> tuple[Iterator[InputBatch], int | None]:
    """Batches of a file, directory or glob, in bounded memory, and the total row count
    when the format says it cheaply (Parquet footers). The first file is opened here, so
    a missing or unreadable input fails now, not at the first batch."""
    files = list_input_files(uri)
    first, total = _file_batches(files[0], batch_size)
    if len(files) == 1:
        return first, total
    if all(f.format == "parquet" for f in files):
        total = sum(sum(parquet_row_groups(f.uri)) for f in files)
    else:
        total = None

    def chained() -> Iterator[InputBatch]:
        yield from first
        for file in files[1:]:
            batches, _ = _file_batches(file, batch_size)
            yield from batches

    return chained(), total


def _file_batches(file: InputFile, batch_size: int,
                  row_groups: tuple[int, int] | None = None) -> tuple[Iterator[InputBatch], int | None]:
    """Batches of one file; of row groups ``[start, stop)`` only, when given (Parquet)."""
    shown = mask_uri(file.uri)
    handle = _open(file.uri)
    if input_format(file.uri, _sniff(handle)) == "parquet":
        try:
            source = handle
            if file.compression:  # Parquet needs seeks: a compressed file is read whole
                source = io.BytesIO(handle.read())
            # pre_buffer keeps read data until the file is done: memory grew with file size.
            parquet = pq.ParquetFile(source, pre_buffer=False)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several error types for corrupt files
            handle.close()
            raise SourceError(f"input {shown} is not a readable Parquet file: {exc}") from None
        groups = list(range(*row_groups)) if row_groups else None
        # Decoded on the reading thread alone: batches are read in a pipeline beside
        # validation, scoring and writing, and pyarrow's pool only added hand-offs and
        # competed with them (XGBoost at 2 threads, streamed: 1.07x with use_threads off).
        batches = (InputBatch(pl.from_arrow(b), malformed_frame([]))
                   for b in parquet.iter_batches(batch_size=batch_size, row_groups=groups, use_threads=False))
        rows = parquet.metadata.num_rows if groups is None else sum(parquet.metadata.row_group(g).num_rows for g in groups)
        return _closing(handle, batches), rows
    if row_groups is not None:
        handle.close()
        raise SourceError(f"input {shown} is CSV: only Parquet files can be split by row groups")
    return _closing(handle, _iter_csv(handle, shown, batch_size)), None


def iter_file(file: InputFile, batch_size: int, row_groups: tuple[int, int] | None = None) -> tuple[Iterator[InputBatch], int | None]:
    """Batches of one file of an input (one partition of partitioned scoring): the whole
    file, or Parquet row groups ``[start, stop)``; and its row count when cheap."""
    return _file_batches(file, batch_size, row_groups)


def _closing(handle: Any, batches: Iterator[InputBatch]) -> Iterator[InputBatch]:
    """The batches, then the input handle closed: when they run out, fail or are closed."""
    try:
        yield from batches
    finally:
        handle.close()


def _iter_csv(handle: Any, shown: str, batch_size: int) -> Iterator[InputBatch]:
    first = handle.readline()
    if not first.strip():
        raise SourceError(f"input {shown} is empty; expected a header line and data rows")
    handle.seek(0)
    bad: list[dict[str, object]] = []
    parse_options, convert_options = csv_text_options(csv_header(first, shown), bad)
    reader = pacsv.open_csv(
        handle,
        read_options=pacsv.ReadOptions(block_size=1 << 22),
        parse_options=parse_options,
        convert_options=convert_options,
    )
    pending: list[pl.DataFrame] = []
    pending_rows = 0
    for record_batch in reader:
        frame = pl.from_arrow(record_batch)
        pending.append(frame)
        pending_rows += frame.height
        while pending_rows >= batch_size:
            merged = pl.concat(pending)
            malformed = malformed_frame(_drain(bad))
            yield InputBatch(merged.head(batch_size), malformed)
            rest = merged.slice(batch_size)
            pending, pending_rows = [rest], rest.height
    if pending_rows or bad:
        yield InputBatch(pl.concat(pending) if pending else pl.DataFrame(), malformed_frame(_drain(bad)))


def _drain(records: list[dict[str, object]]) -> list[dict[str, object]]:
    """Take the records collected so far. pyarrow's parse callbacks append from other
    threads meanwhile: remove exactly what was taken (an append lands after it), never
    clear the list wholesale, which would lose a record appended in between."""
    taken = records[: len(records)]
    del records[: len(taken)]
    return taken


# --- CSV -----------------------------------------------------------------------------


def read_csv_bytes(data: bytes, uri: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Parse CSV text with every column as text. Records with the wrong number of fields
    or with bytes that are not UTF-8 go to the returned malformed frame."""
    try:
        return _parse_csv(data, uri)
    except pa.ArrowInvalid as exc:
        # A record with a bad byte and the wrong field count fails in the field-count
        # callback (its text is not UTF-8), not as a UTF-8 error: the slow path takes it too.
        if "UTF8" not in str(exc) and "utf8" not in str(exc).lower() and not _bad_byte_offsets(data, first=True):
            raise SourceError(f"input {uri} is not a readable CSV file: {exc}") from None
    # Slow path, only for files with invalid UTF-8: mark the bad bytes, then quarantine
    # the records that hold them.
    marked = data.decode("utf-8", errors=_bad_byte_errors()).encode("utf-8")
    frame, malformed = _parse_csv(marked, uri)
    has_bad = pl.any_horizontal(
        pl.col(c).str.contains(_BAD_BYTE_PATTERN).fill_null(False) for c in frame.columns
    )
    bad = frame.with_row_index(ROW).filter(has_bad)
    raw = _raw_records_with_bad_bytes(data, frame.width)
    if len(raw) == bad.height:  # each as the file holds it (quotes and all), with its first bad byte's offset
        encoding_failures = [_malformed_record(f"utf8(byte {offset})", text) for offset, text in raw]
    else:  # not expected: the fields as parsed, joined
        encoding_failures = [
            _malformed_record("utf8", _escape_bad_bytes(",".join(v or "" for v in row[1:])))
            for row in bad.iter_rows()
        ]
    frame = frame.filter(~has_bad)
    malformed = pl.concat([malformed, malformed_frame(encoding_failures)])
    logger.warning("%s: %d record(s) hold bytes that are not UTF-8", uri, len(encoding_failures))
    return frame, malformed


def _parse_csv(data: bytes, uri: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    bad_records: list[dict[str, object]] = []
    parse_options, convert_options = csv_text_options(csv_header(data, uri), bad_records)
    table = pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(use_threads=True),
        parse_options=parse_options,
        convert_options=convert_options,
    )
    return pl.from_arrow(table), malformed_frame(bad_records)


def csv_text_options(names: list[str], bad_records: list[dict[str, object]]) -> tuple[pacsv.ParseOptions, pacsv.ConvertOptions]:
    """pyarrow CSV options shared by whole and streamed reads: every column as text, empty
    as null; a record with the wrong number of fields is appended to ``bad_records``
    (for the quarantine) instead of being dropped."""

    def on_invalid_row(row: pacsv.InvalidRow) -> str:
        bad_records.append(
            _malformed_record(
                f"field_count(expected {row.expected_columns}, found {row.actual_columns})",
                _escape_bad_bytes(row.text),
            )
        )
        return "skip"  # recorded above: it goes to the quarantine, not away

    return (
        pacsv.ParseOptions(invalid_row_handler=on_invalid_row),
        pacsv.ConvertOptions(
            column_types={name: pa.string() for name in names},
            strings_can_be_null=True,
            null_values=[""],
            quoted_strings_can_be_null=True,
        ),
    )


def csv_header(data: bytes, uri: str) -> list[str]:
    first_line = data.split(b"\n", 1)[0].decode("utf-8", errors="replace").rstrip("\r")
    names = next(csv.reader([first_line]))
    blank = [i for i, n in enumerate(names) if not n.strip()]
    if blank:
        raise SourceError(f"input {uri}: header column {blank[0] + 1} has no name; name every column")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SourceError(f"input {uri}: header names {dupes} more than once; make column names unique")
    return names


def _bad_byte_offsets(data: bytes, *, first: bool = False) -> list[int]:
    """The offset of every byte of ``data`` that is not valid UTF-8 (one decode pass;
    ``first``: stop at the first)."""
    offsets: list[int] = []
    pos, view = 0, memoryview(data)
    while pos < len(data):
        try:
            codecs.utf_8_decode(view[pos:], "strict", True)
            break
        except UnicodeDecodeError as exc:
            offsets.extend(range(pos + exc.start, pos + exc.end))
            pos += exc.end
            if first:
                break
    return offsets


def _raw_records_with_bad_bytes(data: bytes, columns: int) -> list[tuple[int, str]]:
    """The records of CSV ``data`` that hold bytes that are not UTF-8 and have
    ``columns`` fields (the others went to the quarantine as field-count failures), in
    file order: the offset of each one's first bad byte, and its text exactly as the
    file holds it (the bad bytes escaped as ``\\xNN``; a record may span lines inside
    quotes). Record bounds follow the quotes from a known record boundary forward, so the
    file is scanned once however many records are bad."""
    found: list[tuple[int, str]] = []
    cursor = 0  # a record boundary: the quotes before it are balanced
    for offset in _bad_byte_offsets(data):
        if offset < cursor:
            continue  # in the record just taken
        start = data.rfind(b"\n", cursor, offset) + 1 or cursor
        while start > cursor and data.count(b'"', cursor, start) % 2:  # inside a quoted field: began a line earlier
            start = data.rfind(b"\n", cursor, start - 1) + 1 or cursor
        end = data.find(b"\n", offset)
        while end != -1 and data.count(b'"', start, end) % 2:  # a quoted newline: the record goes on
            end = data.find(b"\n", end + 1)
        end = len(data) if end == -1 else end
        cursor = end + 1
        text = data[start:end].removesuffix(b"\r").decode("utf-8", errors=_bad_byte_errors())
        if len(next(csv.reader(io.StringIO(text)), [])) == columns:
            found.append((offset, _escape_bad_bytes(text)))
    return found


def _escape_bad_bytes(value: str) -> str:
    return "".join(
        f"\\x{ord(ch) - _BAD_BYTE_BASE:02x}" if ord(ch) >= _BAD_BYTE_BASE else ch for ch in value
    )


def _malformed_record(check: str, raw_text: str) -> dict[str, object]:
    return {ROW: None, "_columns": [None], "_checks": [check], "_values": [raw_text]}


def malformed_frame(records: list[dict[str, object]]) -> pl.DataFrame:
    """Quarantine records for what the reader could not split, in the quarantine's schema."""
    schema = {
        ROW: pl.Int64,
        "_columns": pl.List(pl.String),
        "_checks": pl.List(pl.String),
        "_values": pl.List(pl.String),
    }
    return pl.DataFrame(records, schema=schema)
