"""Monitoring with NannyML: univariate and multivariate drift, performance estimated
without labels (CBPE for classification, DLE for regression) and realized where labels
have arrived; then the policy's verdict.

Realized performance is computed for the estimated metric and for the spec's gate metric.
The policy retrains on realized performance too: concept drift (the relation of the
features to the target changes) shows neither in feature drift nor in CBPE, only in
realized performance once labels arrive.

The reference is the model version's holdout, scored by its own ONNX artifact at
training time. NannyML's usage telemetry is switched off before it is imported.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import polars as pl
from prefect import task
from prefect.cache_policies import NONE

from driftloop.errors import DriftloopError
from driftloop.metrics import HIGHER_IS_BETTER
from driftloop.spec import DatasetSpec, GateSpec, MonitoringPolicy
from driftloop.tasks.calibration import (
    CALIBRATION_VERSION,
    MULTIVARIATE_SPLITS,
    Calibration,
    CalibrationKey,
    CalibrationStore,
    apply_thresholds,
    cross_halves,
    frame_sha256,
    multivariate_threshold,
    partial_chunks,
    realized_thresholds,
    resample_batches,
    univariate_thresholds,
)

logger = logging.getLogger(__name__)

DRIFT_EVENT = "driftloop.model.drift-detected"
PERFORMANCE_EVENT = "driftloop.model.performance-degraded"
_ESTIMATED_DEFAULT = {"binary_classification": "roc_auc", "multiclass_classification": "roc_auc", "regression": "mae"}
_PROBLEM = {"binary_classification": "classification_binary", "multiclass_classification": "classification_multiclass", "regression": "regression"}
# Our metric names (driftloop.metrics) -> NannyML 0.13's, per task; the same names serve
# CBPE/DLE and PerformanceCalculator. Absent: metrics NannyML lacks (log_loss, r2, the
# weighted multiclass ones; pr_auc for multiclass, which tasks.evaluate does not report).
# NannyML's multiclass roc_auc and f1 are macro averages (one-vs-rest for roc_auc).
_NANNYML_METRIC: dict[str, dict[str, str]] = {
    "binary_classification": {"roc_auc": "roc_auc", "pr_auc": "average_precision", "f1": "f1", "accuracy": "accuracy"},
    "multiclass_classification": {
        "roc_auc": "roc_auc", "roc_auc_macro": "roc_auc", "f1": "f1", "f1_macro": "f1", "accuracy": "accuracy",
    },
    "regression": {"mae": "mae", "rmse": "rmse"},
}


class MonitoringError(DriftloopError):
    """Monitoring cannot run as configured (for example too few reference chunks)."""


def _nannyml() -> Any:
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
    module = types.ModuleType("flaml", "driftloop's stand-in while NannyML imports; see tasks.monitor._nannyml")

    class AutoML:
        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            import flaml  # the real one: the stand-in is gone from sys.modules by now

            return flaml.AutoML(*args, **kwargs)

    module.AutoML = AutoML  # type: ignore[attr-defined]
    return module


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


@dataclass
class PolicyDecision:
    fired: bool
    event: str | None
    reasons: list[str]
    drifting_features: list[str]
    window: list[int]


def nannyml_metric(task: str, metric: str) -> str | None:
    """NannyML's name for our ``metric`` on ``task``; None where NannyML lacks it."""
    return _NANNYML_METRIC[task].get(metric)


def chunking(policy: MonitoringPolicy, reference_rows: int) -> dict[str, Any]:
    if policy.chunk_period:
        return {"chunk_period": policy.chunk_period}
    # Default: one chunk more than the minimum, as large as that allows (less noise).
    return {"chunk_size": policy.chunk_size or max(10, reference_rows // (policy.min_reference_chunks + 1))}


def to_pandas(frame: pl.DataFrame, spec: DatasetSpec) -> Any:
    """The frame as NannyML gets it, in pandas (see :func:`prepare`)."""
    return prepare(frame, spec).to_pandas()


def check_reference_chunks(reference: Any, spec: DatasetSpec, policy: MonitoringPolicy, chunk_args: dict[str, Any]) -> int:
    nml = _nannyml()
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


def _long_results(result: Any, kind: str) -> list[dict[str, Any]]:
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


def _renamed(rows: list[dict[str, Any]], names: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Rows named by NannyML's metric as one row per our metric name (two of ours can share
    one of NannyML's: multiclass roc_auc and roc_auc_macro)."""
    return [{**r, "name": ours} for r in rows for ours in names.get(r["name"], [r["name"]])]


def _labelled_rows(result: Any) -> tuple[dict[int, int], list[int]]:
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


def _chunk_sizes(result: Any) -> dict[int, int]:
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


BATCH_ROWS = 200_000  # analysis rows per pass through the calculators (rounded down to whole chunks)


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


def _shift_chunks(result: Any, chunk_offset: int, row_offset: int) -> Any:
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


def _merged(results: list[Any]) -> Any:
    """One result of the batches' results: the reference rows once, then every batch's
    analysis rows (for ``_long_results`` and NannyML's plots)."""
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


class _Calculators:
    """NannyML's calculators as monitoring configures them, fitted on the reference (or a
    part of it)."""

    def __init__(self, nml: Any, spec: DatasetSpec, policy: MonitoringPolicy, categorical: list[str]) -> None:
        self.nml, self.spec, self.policy, self.categorical = nml, spec, policy, categorical
        self.features = spec.feature_columns

    def univariate(self, fit_on: Any, chunks: dict[str, Any], timestamp: str | None) -> Any:
        return self.nml.UnivariateDriftCalculator(
            column_names=self.features, treat_as_categorical=self.categorical or None,
            continuous_methods=list(self.policy.continuous_methods), categorical_methods=list(self.policy.categorical_methods),
            timestamp_column_name=timestamp, **chunks,
        ).fit(fit_on)

    def multivariate(self, fit_on: Any, chunks: dict[str, Any], timestamp: str | None) -> Any:
        return self.nml.DataReconstructionDriftCalculator(
            column_names=self.features, timestamp_column_name=timestamp, **chunks,
        ).fit(fit_on)

    def realized(self, fit_on: Any, chunks: dict[str, Any], timestamp: str | None, metrics: list[str],
                 problem: str, proba: str | dict[str, str] | None) -> Any:
        calc_args = {} if problem == "regression" else {"y_pred_proba": proba}
        return self.nml.PerformanceCalculator(
            metrics=metrics, y_true=self.spec.target, y_pred="prediction", problem_type=problem,
            timestamp_column_name=timestamp, **calc_args, **chunks,
        ).fit(fit_on)


def calibrate(calculators: _Calculators, ref: Any, *, chunk_rows: int, alert_rate: float, draws: int,
              realized: dict[str, list[str]], problem: str, proba: str | dict[str, str] | None,
              batch_rows: int = BATCH_ROWS) -> Calibration:
    """The thresholds for a false-alarm rate ``alert_rate`` (see ``tasks.calibration``):
    ``draws`` chunks of ``chunk_rows`` resampled from the reference ``ref`` (pandas) through
    the univariate calculator and, where the reference has labels, the realized performance
    calculator; the multivariate statistic on halves of the reference. The draws go through
    ``batch_rows // chunk_rows`` chunks at a time (at least one). Without the timestamp:
    NannyML would sort the draws by time and every chunk would hold a few rows many times
    over."""
    batch = max(1, batch_rows // chunk_rows)
    by_size = {"chunk_size": chunk_rows}
    univariate = calculators.univariate(ref, by_size, None)
    performance = None
    if realized and calculators.spec.target in ref.columns:
        performance = calculators.realized(ref, by_size, None, list(realized), problem, proba)
    null_uni: list[dict[str, Any]] = []
    null_perf: list[dict[str, Any]] = []
    for chunks in resample_batches(ref, chunk_rows=chunk_rows, draws=draws, seed=0, batch=batch):
        null_uni += _long_results(univariate.calculate(chunks), "univariate")
        if performance is not None:
            null_perf += _renamed(_long_results(performance.calculate(chunks), "realized"), realized)
        del chunks
    # Rows the reconstruction was fitted on reconstruct better than new ones: fit on one
    # half of the reference and draw chunks from the other, both ways round.
    null_multi: list[list[float]] = []
    for fold, (fit_half, held_out) in enumerate(cross_halves(ref, splits=MULTIVARIATE_SPLITS)):
        multivariate = calculators.multivariate(fit_half, by_size, None)
        values: list[float] = []
        for chunks in resample_batches(held_out, chunk_rows=chunk_rows, seed=1 + fold, batch=batch,
                                       draws=max(25, draws // (2 * MULTIVARIATE_SPLITS))):
            values += [r["value"] for r in _long_results(multivariate.calculate(chunks), "multivariate") if r["value"] is not None]
        null_multi.append(values)
        del fit_half, held_out, multivariate
    return Calibration(
        alert_rate=alert_rate, draws=draws, chunk_rows=chunk_rows, reference_rows=len(ref),
        checks=len({(r["name"], r["method"]) for r in null_uni}),
        univariate=univariate_thresholds(null_uni, alert_rate=alert_rate, chunk_rows=chunk_rows, reference_rows=len(ref)),
        multivariate=multivariate_threshold(null_multi, alert_rate=alert_rate, chunk_rows=chunk_rows, reference_rows=len(ref)),
        realized=realized_thresholds(null_perf, alert_rate=alert_rate, chunk_rows=chunk_rows, reference_rows=len(ref),
                                     higher_is_better={n: HIGHER_IS_BETTER.get(n, True) for names in realized.values() for n in names}),
    )


def calibration_key(reference: pl.DataFrame, spec: DatasetSpec, policy: MonitoringPolicy, *, chunk_rows: int,
                    categorical: list[str], realized: dict[str, list[str]], proba: str | dict[str, str] | None,
                    nannyml_version: str) -> CalibrationKey:
    """What a calibration of ``reference`` (as prepared for NannyML) depends on: the content
    of the columns it reads, the chunk size, and the policy fields, spec columns, metrics and
    versions that change the thresholds."""
    columns = [*spec.feature_columns, "prediction",
               *([proba] if isinstance(proba, str) else sorted((proba or {}).values())), spec.target]
    columns = [c for c in dict.fromkeys(columns) if c in reference.columns]
    # Categorical or string, the same values calibrate the same: hash the strings.
    content = reference.select(columns).with_columns(pl.col(pl.Categorical).cast(pl.String))
    settings = {
        "version": CALIBRATION_VERSION, "nannyml": nannyml_version, "task": spec.task,
        "alert_rate": policy.alert_rate, "draws": policy.calibration_draws,
        "continuous_methods": list(policy.continuous_methods), "categorical_methods": list(policy.categorical_methods),
        "features": list(spec.feature_columns), "categorical": categorical, "target": spec.target,
        "probability": proba, "realized": realized, "multivariate_splits": MULTIVARIATE_SPLITS,
    }
    return CalibrationKey(reference_sha256=frame_sha256(content), chunk_rows=chunk_rows, settings=settings)


@dataclass(frozen=True)
class PerformanceSetup:
    """What performance monitoring computes: our estimated metric and NannyML's name for it
    (None: drift only), NannyML's problem type, the probability column(s), and the realized
    metrics (NannyML's name -> ours)."""

    metric: str | None
    nml_metric: str | None
    problem: str
    proba: str | dict[str, str] | None
    realized: dict[str, list[str]]


def performance_setup(spec: DatasetSpec, policy: MonitoringPolicy, reference: Any, analysis: Any | None = None) -> PerformanceSetup:
    """The performance side of monitoring for frames with these columns (``analysis``
    None: the reference's alone)."""
    metric = policy.estimated_metric or _ESTIMATED_DEFAULT[spec.task]
    problem = _PROBLEM[spec.task]
    proba: str | dict[str, str] | None = "probability"
    if problem == "classification_multiclass":
        proba = class_probability_columns(reference, reference if analysis is None else analysis)
    if proba is None:
        metric = None  # scored by an early build without per-class probabilities: drift only
        logger.warning("no probability_<class> columns in the scored output: performance is not estimated")
    nml_metric = None
    if metric is not None:
        nml_metric = nannyml_metric(spec.task, metric)
        if nml_metric is None:
            known = ", ".join(_NANNYML_METRIC[spec.task])
            raise MonitoringError(f"NannyML cannot estimate {metric!r} for {spec.task}; estimated_metric may be: {known}")
    realized = realized_metrics(spec.task, [spec.gate_metric, metric]) if metric is not None else {}
    return PerformanceSetup(metric, nml_metric, problem, proba, realized)


def _stored_or_calibrated(calculators: _Calculators, reference: pl.DataFrame, ref: Any, perf: PerformanceSetup, *,
                          chunk_rows: int, calibrations: CalibrationStore | None,
                          batch_rows: int) -> tuple[Calibration, str]:
    """The calibration for ``reference`` (prepared; ``ref`` its pandas form) and
    ``chunk_rows``: read from ``calibrations`` when stored there and intact, else computed
    (and stored). Returns it with "stored" or "computed"."""
    policy = calculators.policy
    assert policy.alert_rate is not None
    key = None
    if calibrations is not None:
        key = calibration_key(reference, calculators.spec, policy, chunk_rows=chunk_rows, categorical=calculators.categorical,
                              realized=perf.realized, proba=perf.proba, nannyml_version=calculators.nml.__version__)
        stored = calibrations.load(key)
        if stored is not None:
            return stored, "stored"
    calibration = calibrate(calculators, ref, chunk_rows=chunk_rows, alert_rate=policy.alert_rate,
                            draws=policy.calibration_draws, realized=perf.realized, problem=perf.problem, proba=perf.proba,
                            batch_rows=batch_rows)
    if calibrations is not None and key is not None:
        calibrations.save(key, calibration)
    return calibration, "computed"


def ensure_calibration(reference: pl.DataFrame, spec: DatasetSpec, policy: MonitoringPolicy, calibrations: CalibrationStore,
                       *, chunk_rows: int | None = None, levers: Levers = Levers()) -> tuple[Calibration, str] | None:
    """The calibration a monitoring run of ``reference`` with ``policy`` uses, stored in
    ``calibrations`` if it was not yet ("stored" or "computed"). ``chunk_rows``: the chunk
    size (default: the policy's, as monitoring chooses it; period chunks need it given, as
    their full chunk depends on the analysis). None when the policy calibrates nothing."""
    if policy.alert_rate is None:
        return None
    nml = _nannyml()
    categorical = [c for c in spec.feature_columns if spec.column_spec(c).dtype in ("category", "string", "bool")]
    if spec.task == "multiclass_classification" and spec.target in reference.columns:
        reference = reference.with_columns(pl.col(spec.target).cast(pl.String))
    reference = prepare(reference, spec, categoricals=levers.categoricals)
    ref = pandas_view(reference) if levers.views else reference.to_pandas()
    chunk_rows = chunk_rows or chunking(policy, len(ref)).get("chunk_size")
    if chunk_rows is None:
        raise MonitoringError("period chunks: give ensure_calibration the full chunk's rows (chunk_rows)")
    check_reference_chunks(ref, spec, policy, {"chunk_size": chunk_rows})
    calculators = _Calculators(nml, spec, policy, categorical)
    return _stored_or_calibrated(calculators, reference, ref, performance_setup(spec, policy, ref), chunk_rows=chunk_rows,
                                 calibrations=calibrations, batch_rows=levers.batch_rows or BATCH_ROWS)


def run_monitoring(reference: pl.DataFrame, analysis: pl.DataFrame, spec: DatasetSpec, policy: MonitoringPolicy, *,
                   with_plots: bool = True, calibrations: CalibrationStore | None = None,
                   levers: Levers = Levers()) -> MonitorReport:
    """NannyML on ``analysis`` against ``reference``. Both carry the features,
    ``prediction``, ``probability`` and (reference always, analysis where arrived) the
    target. The calculators are fitted on the reference once and the analysis goes through
    them a few whole chunks at a time (``levers``): the results are those of one pass.
    With ``calibrations``, the drift and realized thresholds' calibration is read from it
    when one for this reference, chunk size and policy is stored, else computed and stored."""
    nml = _nannyml()
    features = spec.feature_columns
    categorical = [c for c in features if spec.column_spec(c).dtype in ("category", "string", "bool")]
    if spec.task == "multiclass_classification":  # labels compare as the strings the model predicts
        reference, analysis = (
            f.with_columns(pl.col(spec.target).cast(pl.String)) if spec.target in f.columns else f for f in (reference, analysis)
        )
    reference = prepare(reference, spec, categoricals=levers.categoricals)
    ref = pandas_view(reference) if levers.views else reference.to_pandas()
    chunk_args = chunking(policy, len(ref))
    check_reference_chunks(ref, spec, policy, chunk_args)
    common = {"timestamp_column_name": spec.timestamp, **chunk_args}
    calculators = _Calculators(nml, spec, policy, categorical)
    results: list[dict[str, Any]] = []
    figures: dict[str, Any] = {}

    has_labels = spec.target in analysis.columns and _any_label(analysis[spec.target])
    perf = performance_setup(spec, policy, ref, analysis)
    metric, nml_metric, problem, proba, realized_names = (
        perf.metric, perf.nml_metric, perf.problem, perf.proba, perf.realized)

    # The data reconstruction's fit first: its working set (~4 copies of the reference's
    # features) then comes before the other calculators' fitted state, not on top of it.
    multivariate_calc = calculators.multivariate(ref, chunk_args, spec.timestamp)
    univariate_calc = calculators.univariate(ref, chunk_args, spec.timestamp)
    if hasattr(univariate_calc.result, "reference_data"):
        # A copy of the reference, for NannyML's distribution plots only (not drawn here);
        # every result filtered from this one would copy it again.
        univariate_calc.result.reference_data = None
    estimator = None
    if nml_metric is not None and problem == "regression":
        estimator = nml.DLE(
            feature_column_names=features, y_pred="prediction", y_true=spec.target, metrics=[nml_metric], **common,
        ).fit(ref)
    elif nml_metric is not None:
        estimator = nml.CBPE(
            y_pred_proba=proba, y_pred="prediction", y_true=spec.target, problem_type=problem, metrics=[nml_metric], **common,
        ).fit(ref)
    # The whole analysis, unlabelled rows included (NannyML skips them per chunk): its
    # chunks are then the same as the drift and estimation chunks, index for index.
    performance = (calculators.realized(ref, chunk_args, spec.timestamp, list(realized_names), problem, proba)
                   if has_labels and realized_names else None)

    # Prepared after the fits (their working sets are the peak): sorted, flags as strings,
    # categoricals, as the reference.
    analysis = prepare(analysis, spec, categoricals=levers.categoricals, float32=levers.float32)
    parts: dict[str, list[Any]] = {"univariate": [], "multivariate": [], "estimated": [], "realized": []}
    for chunk_offset, row_offset, rows in analysis_batches(analysis, chunk_args, levers.batch_rows):
        batch = pandas_view(rows) if levers.views else rows.to_pandas()
        del rows
        parts["univariate"].append(_shift_chunks(univariate_calc.calculate(batch), chunk_offset, row_offset))
        parts["multivariate"].append(_shift_chunks(multivariate_calc.calculate(batch), chunk_offset, row_offset))
        if performance is not None:
            parts["realized"].append(_shift_chunks(performance.calculate(batch), chunk_offset, row_offset))
        if estimator is not None:
            batch = batch.drop(columns=[spec.target], errors="ignore")
            parts["estimated"].append(_shift_chunks(estimator.estimate(batch), chunk_offset, row_offset))
        del batch
    univariate = _merged(parts["univariate"])
    multivariate = _merged(parts["multivariate"])
    estimated = _merged(parts["estimated"]) if parts["estimated"] else None
    realized = _merged(parts["realized"]) if parts["realized"] else None
    results += _long_results(univariate, "univariate")
    results += _long_results(multivariate, "multivariate")
    if estimated is not None and nml_metric is not None and metric is not None:
        results += _renamed(_long_results(estimated, "estimated"), {nml_metric: [metric]})
    labelled_rows: dict[int, int] = {}
    chunk_rows: int | None = chunk_args.get("chunk_size")
    if realized is not None:
        results += _renamed(_long_results(realized, "realized"), realized_names)
        labelled_rows, sizes = _labelled_rows(realized)
        if chunk_rows is None and sizes:  # period chunks: the median chunk is the full one
            chunk_rows = sorted(sizes)[len(sizes) // 2]

    chunk_sizes = _chunk_sizes(univariate)
    full_chunk = chunk_args.get("chunk_size") or (sorted(chunk_sizes.values())[len(chunk_sizes) // 2] if chunk_sizes else None)
    calibration = None
    calibration_source = None
    if policy.alert_rate is not None and full_chunk:
        calibration, calibration_source = _stored_or_calibrated(
            calculators, reference, ref, perf, chunk_rows=full_chunk, calibrations=calibrations,
            batch_rows=levers.batch_rows or BATCH_ROWS)

    if with_plots:
        figures["univariate_drift"] = univariate.filter(period="all").plot(kind="drift")
        figures["multivariate_drift"] = multivariate.plot()
        if estimated is not None:
            figures["estimated_performance"] = estimated.plot()
        if realized is not None:
            figures["realized_performance"] = realized.plot()

    partial = partial_chunks(chunk_sizes, chunk_args.get("chunk_size"))
    if calibration is not None or partial:
        results = apply_thresholds(results, calibration or Calibration(0.0, 0, 0, 0, 0), set(partial))
    seen: dict[int, Chunk] = {}
    for r in results:
        seen.setdefault(r["chunk_index"], Chunk(r["chunk_index"], r["chunk_key"], r["chunk_start"], r["chunk_end"]))
    return MonitorReport(
        sorted(seen.values(), key=lambda c: c.index), results, metric, has_labels, figures,
        gate_metric=spec.gate_metric, labelled_rows=labelled_rows, chunk_rows=chunk_rows,
        calibration=calibration, partial_chunks=partial, calibration_source=calibration_source,
    )


def _any_label(column: pl.Series) -> bool:
    """Whether any row has a label (null, or NaN in a float column, is none)."""
    if column.dtype.is_float():
        column = column.fill_nan(None)
    return bool(column.is_not_null().any())


def realized_metrics(task: str, metrics: list[str]) -> dict[str, list[str]]:
    """NannyML metric -> our metric names, for the ``metrics`` NannyML can compute; the
    others are skipped with a warning."""
    out: dict[str, list[str]] = {}
    for metric in dict.fromkeys(metrics):
        nml_name = nannyml_metric(task, metric)
        if nml_name is None:
            logger.warning("NannyML has no realized %s for %s: monitoring skips it", metric, task)
            continue
        out.setdefault(nml_name, []).append(metric)
    return out


def class_probability_columns(reference: Any, analysis: Any) -> dict[str, str] | None:
    """class label -> its probability column, when both frames have them."""
    from driftloop.tasks.score import PROBABILITY_PREFIX

    columns = {c.removeprefix(PROBABILITY_PREFIX): c for c in reference.columns if c.startswith(PROBABILITY_PREFIX)}
    if not columns or not set(columns.values()) <= set(analysis.columns):
        return None
    return columns


def decide(
    report: MonitorReport, policy: MonitoringPolicy, *, gate: GateSpec | None = None, gate_metric: str | None = None,
) -> PolicyDecision:
    """Apply the policy to the most recent chunks. Drift alone is reported; it triggers
    retraining only through the rules the policy enables.

    Performance rules (``policy.performance``): the estimated metric alerting, and, given
    ``gate_metric`` (default: ``gate.metric``), its realized value degrading in labelled
    chunks (see :func:`realized_reason`). Without a gate metric only estimated performance
    counts, as before."""
    indices = [c.index for c in report.chunks]
    reasons: list[str] = []
    event: str | None = None

    perf_rows = sorted(report.rows("estimated"), key=lambda r: r["chunk_index"])
    if policy.performance is not None and perf_rows:
        recent = perf_rows[-policy.performance.of_last:]
        alerts = sum(worse_than_threshold(r) for r in recent)
        if alerts >= policy.performance.alerts:
            event = PERFORMANCE_EVENT
            reasons.append(
                f"estimated {report.estimated_metric} alerted (worse than its threshold) in {alerts} of the last "
                f"{len(recent)} chunks (policy: {policy.performance.alerts} of {policy.performance.of_last})"
            )
    gate_metric = gate_metric or (gate.metric if gate else None)
    if policy.performance is not None and gate_metric:
        realized = realized_reason(report, policy, gate, gate_metric)
        if realized is not None:
            event = PERFORMANCE_EVENT
            reasons.append(realized)

    window = indices[-policy.window:]
    drifting = sorted({r["name"] for r in report.rows("univariate") if r["alert"] and r["chunk_index"] in window})
    multivariate_alerts = [r["chunk_index"] for r in report.rows("multivariate") if r["alert"] and r["chunk_index"] in window]
    if policy.multivariate_drift and multivariate_alerts:
        event = event or DRIFT_EVENT
        reasons.append(f"multivariate drift (data reconstruction) alerted in chunk(s) {multivariate_alerts}")
    if policy.min_drifting_features is not None and len(drifting) >= policy.min_drifting_features:
        event = event or DRIFT_EVENT
        reasons.append(f"{len(drifting)} features drift in the last {len(window)} chunks (policy: at least {policy.min_drifting_features})")
    if event is None:
        if drifting or multivariate_alerts:
            reasons.append("drift reported, but no retraining rule fired")
        else:
            reasons.append("no alerts in the policy window")
    return PolicyDecision(event is not None, event, reasons, drifting, window)


def labelled_enough(report: MonitorReport, chunk_index: int) -> bool:
    """Whether a chunk has at least half a full chunk of labelled rows: realized metrics on
    a handful of rows (a tiny last chunk, labels just starting to arrive) are noise. A
    report without counts (read back from the registry) counts every chunk."""
    if report.chunk_rows is None or chunk_index not in report.labelled_rows:
        return True
    return 2 * report.labelled_rows[chunk_index] >= report.chunk_rows


def worse_than_threshold(row: dict[str, Any]) -> bool:
    """A performance alert on the bad side: better than the reference is no reason to retrain."""
    if not row["alert"] or row["value"] is None:
        return False
    if HIGHER_IS_BETTER.get(row["name"], True):
        return row["lower_threshold"] is not None and row["value"] < row["lower_threshold"]
    return row["upper_threshold"] is not None and row["value"] > row["upper_threshold"]


def realized_reason(report: MonitorReport, policy: MonitoringPolicy, gate: GateSpec | None, metric: str) -> str | None:
    """Why realized ``metric`` warrants retraining, or None. Of the last
    ``policy.performance.of_last`` chunks with a realized value and enough labels, at least
    ``policy.performance.alerts`` must be degraded: NannyML's realized alert fired (relative
    to the reference) or the value is worse than the gate's absolute bar for ``metric``
    (``min`` when higher is better, ``max`` when lower is)."""
    assert policy.performance is not None
    rows = sorted(
        (r for r in report.rows("realized") if r["name"] == metric and r["value"] is not None
         and labelled_enough(report, r["chunk_index"])),
        key=lambda r: r["chunk_index"],
    )
    if not rows:
        return None
    recent = rows[-policy.performance.of_last:]
    higher = HIGHER_IS_BETTER.get(metric, True)
    bound = gate.thresholds.get(metric) if gate else None
    limit = (bound.min if higher else bound.max) if bound else None
    below = [r for r in recent if limit is not None and (r["value"] < limit if higher else r["value"] > limit)]
    alerted = [r for r in recent if worse_than_threshold(r)]
    degraded = {r["chunk_index"] for r in below + alerted}
    if len(degraded) < policy.performance.alerts:
        return None

    def values(chosen: list[dict[str, Any]]) -> str:
        return ", ".join(f"{r['chunk_key']}: {r['value']:.3f}" for r in chosen)

    of = f"of the last {len(recent)} labelled chunks"
    parts = []
    if below:
        side = "below the gate's min" if higher else "above the gate's max"
        parts.append(f"realized {metric} {side} {limit:g} in {len(below)} {of} ({values(below)})")
    if alerted:
        parts.append(f"realized {metric} alerted against the reference in {len(alerted)} {of} ({values(alerted)})")
    return "; ".join(parts) + (
        f" (policy: {policy.performance.alerts} of {policy.performance.of_last} degraded; {len(degraded)} are)"
    )


def chunk_summaries(report: MonitorReport) -> list[dict[str, Any]]:
    """Per chunk: span, drifting features, estimated and realized metric (realized: the
    estimated metric's; ``realized_gate``: the gate metric's, None unless it differs)."""
    out = []
    for chunk in report.chunks:
        rows = [r for r in report.results if r["chunk_index"] == chunk.index]
        est_row = next((r for r in rows if r["kind"] == "estimated"), None)
        est = est_row["value"] if est_row else None
        realized = [r for r in rows if r["kind"] == "realized"]
        # The estimated metric's realized row first (a report read back from the registry
        # has no estimated_metric: the estimated row's name says it).
        name = report.estimated_metric or (est_row["name"] if est_row else None)
        real_row = next((r for r in realized if r["name"] == name), realized[0] if realized else None)
        real = real_row["value"] if real_row else None
        gate = report.gate_metric if report.gate_metric and report.gate_metric != name else None
        real_gate = next((r["value"] for r in realized if gate and r["name"] == gate), None)
        out.append({
            "start": chunk.start, "end": chunk.end, "key": chunk.key,
            "drifting_features": sorted({r["name"] for r in rows if r["kind"] == "univariate" and r["alert"]}),
            "multivariate_alert": any(r["alert"] for r in rows if r["kind"] == "multivariate"),
            "estimated": est, "realized": real, "realized_gate": real_gate,
            "labelled_rows": report.labelled_rows.get(chunk.index),
            "performance_alert": any(r["alert"] for r in rows if r["kind"] == "estimated"),
        })
    return out


def render_summary(model_ref: str, report: MonitorReport, decision: PolicyDecision, event: dict[str, Any] | None) -> str:
    metric = report.estimated_metric or "metric"
    better = "higher" if HIGHER_IS_BETTER.get(metric, True) else "lower"
    summaries = chunk_summaries(report)
    gate = report.gate_metric if any(c["realized_gate"] is not None for c in summaries) else None
    gate_header = f" realized {gate} |" if gate else ""
    lines = [
        f"# Monitoring {model_ref}",
        "",
        f"**Policy: {'FIRED - ' + str(decision.event) if decision.fired else 'no retraining'}**",
        "",
        *[f"- {r}" for r in decision.reasons],
        "",
        f"| chunk | start | end | drifting features | estimated {metric} | realized {metric} |{gate_header}",
        "|---|---|---|---|---:|---:|" + ("---:|" if gate else ""),
    ]
    for c in summaries:
        est = f"{c['estimated']:.4f}" + (" ⚠" if c["performance_alert"] else "") if c["estimated"] is not None else "-"
        real = f"{c['realized']:.4f}" if c["realized"] is not None else "-"
        real_gate = f" {c['realized_gate']:.4f} |" if c["realized_gate"] is not None else " - |"
        feats = ", ".join(c["drifting_features"]) + (" (+multivariate)" if c["multivariate_alert"] else "")
        lines.append(
            f"| {c['key']} | {c['start'] or ''} | {c['end'] or ''} | {feats or '-'} | {est} | {real} |{real_gate if gate else ''}"
        )
    lines += ["", f"({better} {metric} is better.)"]
    if gate:
        lines += [f"({'higher' if HIGHER_IS_BETTER.get(gate, True) else 'lower'} {gate} is better.)"]
    if report.calibration is not None:
        lines += ["", f"Drift alerts: {report.calibration.describe()}."]
    keys = {c.index: c.key for c in report.chunks}
    for index, rows in sorted(report.partial_chunks.items()):
        lines.append(f"Chunk {keys.get(index, index)} ({rows} rows, fewer than a full chunk) is reported without alerts.")
    if event:
        lines += ["", f"Event emitted: `{event['event']}` for `{event['resource']['prefect.resource.id']}`"]
    return "\n".join(lines)


@task(name="nannyml", cache_policy=NONE)
def monitor_task(reference: pl.DataFrame, analysis: pl.DataFrame, spec: DatasetSpec, policy: MonitoringPolicy,
                 calibrations: CalibrationStore | None = None) -> MonitorReport:
    return run_monitoring(reference, analysis, spec, policy, calibrations=calibrations)


@task(name="policy", cache_policy=NONE)
def decide_task(
    report: MonitorReport, policy: MonitoringPolicy, gate: GateSpec | None = None, gate_metric: str | None = None,
) -> PolicyDecision:
    return decide(report, policy, gate=gate, gate_metric=gate_metric)
