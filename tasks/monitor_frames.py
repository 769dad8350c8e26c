"""The frames NannyML is given: NannyML itself (imported with its telemetry off and
without FLAML), the prepared polars frame and its pandas view, the chunking, and the
analysis in batches of whole chunks (the memory levers).
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import polars as pl

from driftloop.spec import DatasetSpec, MonitoringPolicy
from driftloop.tasks.monitor_report import MonitoringError

# Analysis rows per pass through the calculators (rounded down to whole chunks). Each pass
# holds a few copies of its rows (the data reconstruction's above all): at 200,000 the
# bench's monitoring peaked at 1.03 GB, at 50,000 at 0.91 GB, ~1 s slower of ~9.
BATCH_ROWS = 50_000
# Resampled reference rows per pass in a calibration (no analysis held beside them).
CALIBRATION_BATCH_ROWS = 200_000


@dataclass(frozen=True)
class Levers:
    """How monitoring keeps its memory down; all on by default. ``bench/monitoring.py``
    switches them off one at a time to measure each. None of them changes a result."""

    batch_rows: int | None = BATCH_ROWS  # whole chunks per pass; None: the whole analysis in one pandas frame
    categoricals: bool = True  # string and flag features as pandas categoricals instead of Python strings
    # The analysis's float features as float32 (the reference stays as it is). Off: it halves
    # those columns but moves statistics by ~1e-7 (bench/monitoring.py --levers).
    float32: bool = False
    views: bool = True  # pandas frames over polars' numeric buffers instead of copies (pandas_view)
    # With categoricals: univariate drift sees their categories as integer codes
    # (CategoryCodes), not strings. NannyML's categorical drift methods sort every chunk's
    # values (np.unique): on strings that took a fifth of a monitoring run, on integers
    # it is ~100x faster. Only univariate drift: the data reconstruction's imputer
    # treats a null beside an unseen code differently from a null beside an unseen string.
    category_codes: bool = True


DEFAULT_LEVERS = Levers()


def nannyml() -> Any:
    os.environ["NML_DISABLE_USAGE_LOGGING"] = "1"  # before the first import, always
    if "nannyml" not in sys.modules and "flaml" not in sys.modules:
        # NannyML imports FLAML's AutoML at import time for two calculators monitoring
        # does not use (DLE, which regression monitoring does use, and the domain
        # classifier), and FLAML imports XGBoost: ~45 MB of RSS for nothing. A stand-in
        # that imports the real FLAML on first use; removed once NannyML is imported, so
        # anyone importing flaml afterwards gets the real module.
        sys.modules["flaml"] = _lazy_flaml()
        try:
            import nannyml
        finally:
            del sys.modules["flaml"]
    import nannyml

    return nannyml


def _lazy_flaml() -> types.ModuleType:
    module = types.ModuleType("flaml", "driftloop's stand-in while NannyML imports; see tasks.monitor_frames.nannyml")

    class AutoML:
        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            import flaml  # the real one: the stand-in is gone from sys.modules by now

            return flaml.AutoML(*args, **kwargs)

    module.AutoML = AutoML  # type: ignore[attr-defined]
    return module


def chunking(policy: MonitoringPolicy, reference_rows: int) -> dict[str, Any]:
    if policy.chunk_period:
        return {"chunk_period": policy.chunk_period}
    # Default: one chunk more than the minimum, as large as that allows (less noise).
    return {"chunk_size": policy.chunk_size or max(10, reference_rows // (policy.min_reference_chunks + 1))}


def to_pandas(frame: pl.DataFrame, spec: DatasetSpec) -> Any:
    """The frame as NannyML gets it, in pandas (see :func:`prepare`)."""
    return prepare(frame, spec).to_pandas()


def check_reference_chunks(reference: Any, spec: DatasetSpec, policy: MonitoringPolicy, chunk_args: dict[str, Any]) -> int:
    nml = nannyml()
    if "chunk_period" in chunk_args:
        if not spec.timestamp:
            raise MonitoringError(f"chunk_period needs a timestamp column; spec '{spec.name}' has none: use chunk_size")
        chunker = nml.chunk.PeriodBasedChunker(offset=chunk_args["chunk_period"], timestamp_column_name=spec.timestamp)
    else:
        chunker = nml.chunk.SizeBasedChunker(chunk_size=chunk_args["chunk_size"], incomplete="keep")
    count = len(chunker.split(reference))
    if count < policy.min_reference_chunks:
        size = chunk_args.get("chunk_size") or chunk_args.get("chunk_period")
        raise MonitoringError(
            f"monitoring '{spec.name}': the reference ({len(reference)} rows) makes {count} chunk(s) of "
            f"{size}, fewer than min_reference_chunks={policy.min_reference_chunks}; with so few reference "
            "chunks the drift thresholds are meaningless (with one, every chunk alerts). Use a smaller "
            "chunk_size or a shorter chunk_period"
        )
    return count


def prepare(frame: pl.DataFrame, spec: DatasetSpec, *, categoricals: bool = False, float32: bool = False) -> pl.DataFrame:
    """The frame NannyML is given, still in polars: sorted by time (not copied when it
    already is), flags as the strings "true"/"false" (NannyML's data reconstruction imputes
    a numpy bool column as continuous and fails; as strings they are categorical
    everywhere) and, with ``categoricals``, string features as categoricals (one byte a
    row in pandas instead of a Python string)."""
    if spec.timestamp and spec.timestamp in frame.columns and not frame[spec.timestamp].is_sorted():
        frame = frame.sort(spec.timestamp, maintain_order=True)
    flags = [c for c in spec.feature_columns if c in frame.columns and frame.schema[c] == pl.Boolean]
    frame = frame.with_columns(pl.col(flags).cast(pl.String))
    if categoricals:
        strings = [c for c in spec.feature_columns if c in frame.columns and frame.schema[c] == pl.String]
        frame = frame.with_columns(pl.col(strings).cast(pl.Categorical))
    if float32:
        floats = [c for c in spec.feature_columns if c in frame.columns and frame.schema[c] == pl.Float64]
        frame = frame.with_columns(pl.col(floats).cast(pl.Float32))
    return frame


@dataclass(frozen=True)
class CategoryCodes:
    """Each categorical feature's values, in the order of their integer codes: the
    reference's values sorted (as NannyML sorts them), then values the reference lacks.
    The same value has the same code in the reference and in every analysis batch, and
    the codes sort as the strings do, so univariate drift's bins are the same bins in the
    same order as with the strings: its results are equal."""

    values: dict[str, tuple[str, ...]]

    @classmethod
    def of(cls, reference: pl.DataFrame, columns: list[str]) -> CategoryCodes:
        """Codes for those of ``columns`` that hold strings (categorical or not): numbers
        treated as categories already sort fast, and as numbers, not as strings."""
        strings = [c for c in columns if c in reference.columns and reference.schema[c] in (pl.String, pl.Categorical)]
        return cls({c: tuple(sorted(reference[c].cast(pl.String).drop_nulls().unique().to_list())) for c in strings})

    def extended(self, frame: pl.DataFrame) -> CategoryCodes:
        """These codes, plus codes after them for ``frame``'s values they lack."""
        values = dict(self.values)
        for column, known in self.values.items():
            if column in frame.columns:
                seen = set(known)
                new = sorted(v for v in frame[column].cast(pl.String).drop_nulls().unique().to_list() if v not in seen)
                values[column] = known + tuple(new)
        return CategoryCodes(values)

    def coded(self, frame: Any, source: pl.DataFrame) -> Any:
        """``frame`` (the pandas form of ``source``) with the categorical columns as pandas
        categoricals over their codes; the other columns are shared, not copied. A value
        without a code is an error: extend the codes with ``source`` first."""
        import numpy as np
        import pandas as pd

        coded = source.select(
            pl.col(c).cast(pl.String).replace_strict(list(known), list(range(len(known))), return_dtype=pl.Int32)
            for c, known in self.values.items() if c in source.columns
        )
        columns = {c: frame[c].values for c in frame.columns}
        for column in coded.columns:
            columns[column] = pd.Categorical.from_codes(coded[column].fill_null(-1).to_numpy(),
                                                        categories=np.arange(len(self.values[column])))
        return pd.DataFrame(columns, index=frame.index, copy=False)


def nannyml_frame(frame: pl.DataFrame, levers: Levers) -> Any:
    """The prepared ``frame`` in pandas as NannyML gets it: a view or a copy (``levers``)."""
    return pandas_view(frame) if levers.views else frame.to_pandas()


def pandas_view(frame: pl.DataFrame) -> Any:
    """``frame.to_pandas()`` without copying numeric columns that have no nulls: pandas
    columns over polars' own buffers (read-only numpy views), one block per column. Same
    column dtypes as ``to_pandas`` (checked; a column that would differ is converted)."""
    import pandas as pd

    template = frame.head(0).to_pandas()
    columns: dict[str, Any] = {}
    for name in frame.columns:
        series = frame[name]
        if series.dtype.is_numeric() and series.null_count() == 0:
            values = series.to_numpy()
            if values.dtype == template[name].dtype:
                columns[name] = values
                continue
        columns[name] = series.to_pandas()
    return pd.DataFrame(columns, copy=False)


def analysis_batches(frame: pl.DataFrame, chunk_args: dict[str, Any], batch_rows: int | None) -> Iterator[tuple[int, int, pl.DataFrame]]:
    """(first chunk index, first row, rows) of whole chunks, ``batch_rows`` at most (at
    least one chunk); period chunks, or no ``batch_rows``: the whole frame at once."""
    size = chunk_args.get("chunk_size")
    if size is None or batch_rows is None or frame.height <= batch_rows:
        yield 0, 0, frame
        return
    step = max(1, batch_rows // size) * size
    for offset in range(0, frame.height, step):
        yield offset // size, offset, frame.slice(offset, step)
