"""The monitoring report and how NannyML's result frames become its rows: one record per
chunk x column (or metric) x method, the chunks' sizes and labelled rows, and the
results of several analysis batches merged into one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from driftloop.errors import DriftloopError
from driftloop.tasks.calibration import Calibration


class MonitoringError(DriftloopError):
    """Monitoring cannot run as configured (for example too few reference chunks)."""



@dataclass
class Chunk:
    index: int
    key: str
    start: str | None
    end: str | None


@dataclass
class MonitorReport:
    chunks: list[Chunk]
    results: list[dict[str, Any]]  # one per chunk x (kind, name, method)
    estimated_metric: str | None
    has_labels: bool
    figures: dict[str, Any] = field(default_factory=dict)  # name -> plotly figure
    gate_metric: str | None = None  # the spec's gate metric, realized where NannyML has it
    # Labelled rows per analysis chunk index, and the rows of a full chunk: the realized
    # rule ignores chunks that are mostly unlabelled (or a tiny last chunk). Kept out of
    # ``results``, whose rows have the registry's fixed columns.
    labelled_rows: dict[int, int] = field(default_factory=dict)
    chunk_rows: int | None = None
    calibration: Calibration | None = None  # the drift thresholds' calibration (None: NannyML's defaults)
    partial_chunks: dict[int, int] = field(default_factory=dict)  # chunk index -> rows, reported without alerts
    calibration_source: str | None = None  # "stored" (read back) or "computed" (this run); None without calibration

    def rows(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.results if r["kind"] == kind]


def long_results(result: Any, kind: str) -> list[dict[str, Any]]:
    """NannyML's multi-level result frame as one record per chunk x column x method."""
    frame = result.filter(period="analysis").to_df()
    chunk_cols = {c[-1]: c for c in frame.columns if c[0] == "chunk"}
    groups: dict[tuple[str, ...], dict[str, tuple]] = {}
    for col in frame.columns:
        if col[0] == "chunk":
            continue
        groups.setdefault(tuple(col[:-1]), {})[col[-1]] = col
    out = []
    for i in range(len(frame)):
        row = frame.iloc[i]
        for name_parts, fields in groups.items():
            name = name_parts[0]
            method = name_parts[1] if len(name_parts) > 1 else kind
            value = row[fields["value"]] if "value" in fields else None
            if kind == "realized" and "realized" in fields:
                value = row[fields["realized"]]
            out.append({
                "chunk_index": int(row[chunk_cols["chunk_index"]]),
                "chunk_key": str(row[chunk_cols["key"]]),
                "chunk_start": str(row[chunk_cols["start_date"]]) if "start_date" in chunk_cols and row[chunk_cols["start_date"]] is not None else None,
                "chunk_end": str(row[chunk_cols["end_date"]]) if "end_date" in chunk_cols and row[chunk_cols["end_date"]] is not None else None,
                "kind": kind, "name": str(name), "method": str(method),
                "value": _num(value),
                "lower_threshold": _num(row[fields["lower_threshold"]]) if "lower_threshold" in fields else None,
                "upper_threshold": _num(row[fields["upper_threshold"]]) if "upper_threshold" in fields else None,
                "alert": bool(row[fields["alert"]]) if "alert" in fields and row[fields["alert"]] is not None and not _isnan(row[fields["alert"]]) else False,
            })
    return out


def renamed(rows: list[dict[str, Any]], names: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Rows named by NannyML's metric as one row per our metric name (two of ours can share
    one of NannyML's: multiclass roc_auc and roc_auc_macro)."""
    return [{**r, "name": ours} for r in rows for ours in names.get(r["name"], [r["name"]])]


def labelled_rows(result: Any) -> tuple[dict[int, int], list[int]]:
    """Labelled rows and all rows per analysis chunk, from PerformanceCalculator's chunk
    columns (``end_index`` is inclusive; ``targets_missing_rate`` is per chunk)."""
    frame = result.filter(period="analysis").to_df()
    labelled: dict[int, int] = {}
    sizes: list[int] = []
    for i in range(len(frame)):
        row = frame.iloc[i]
        size = int(row[("chunk", "end_index")]) - int(row[("chunk", "start_index")]) + 1
        missing = _num(row[("chunk", "targets_missing_rate")]) or 0.0
        labelled[int(row[("chunk", "chunk_index")])] = round(size * (1.0 - missing))
        sizes.append(size)
    return labelled, sizes


def chunk_sizes(result: Any) -> dict[int, int]:
    """Rows per analysis chunk (``end_index`` is inclusive)."""
    frame = result.filter(period="analysis").to_df()
    col = {c[-1]: c for c in frame.columns if c[0] == "chunk"}  # 2 or 3 header levels
    return {
        int(index): int(end) - int(start) + 1
        for index, start, end in zip(frame[col["chunk_index"]], frame[col["start_index"]], frame[col["end_index"]], strict=True)
    }


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _num(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def shift_chunks(result: Any, chunk_offset: int, row_offset: int) -> Any:
    """A batch's analysis results renumbered as chunks of the whole analysis: chunk index,
    row indices and the size-based chunk key ``[first:last]``. Drops the copies of the
    batch and, after the first batch, of the reference that univariate results keep
    (``analysis_data``, ``reference_data``: each result has its own, 40 MB a batch on the
    bench): only the per-chunk rows are needed, and the merged result takes the first
    batch's reference."""
    if hasattr(result, "analysis_data"):
        result.analysis_data = None
    if chunk_offset > 0 and hasattr(result, "reference_data"):
        result.reference_data = None
    if chunk_offset == 0 and row_offset == 0:
        return result
    data = result.data
    col = {c[-1]: c for c in data.columns if c[0] == "chunk"}
    rows = data[col["period"]] == "analysis"
    data.loc[rows, col["chunk_index"]] = data.loc[rows, col["chunk_index"]] + chunk_offset
    data.loc[rows, col["start_index"]] = data.loc[rows, col["start_index"]] + row_offset
    data.loc[rows, col["end_index"]] = data.loc[rows, col["end_index"]] + row_offset

    def shifted(key: str) -> str:
        first, last = key.strip("[]").split(":")
        return f"[{int(first) + row_offset}:{int(last) + row_offset}]"

    data.loc[rows, col["key"]] = data.loc[rows, col["key"]].map(shifted)
    return result


def merged(results: list[Any]) -> Any:
    """One result of the batches' results: the reference rows once, then every batch's
    analysis rows (for ``long_results`` and NannyML's plots)."""
    import pandas as pd

    if len(results) == 1:
        return results[0]
    merged = results[-1]
    if hasattr(merged, "reference_data"):
        merged.reference_data = results[0].reference_data

    def period(data: Any) -> Any:
        return data[next(c for c in data.columns if c[0] == "chunk" and c[-1] == "period")]

    first = results[0].data
    parts = [first[period(first) != "analysis"], *[r.data[period(r.data) == "analysis"] for r in results]]
    merged.data = pd.concat(parts, ignore_index=True)
    return merged
