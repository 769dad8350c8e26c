"""Monitoring with NannyML: univariate and multivariate drift, performance estimated
without labels (CBPE for classification, DLE for regression) and realized where labels
have arrived; then the policy's verdict.

Realized performance is computed for the estimated metric and for the spec's gate metric.
The policy retrains on realized performance too: concept drift (the relation of the
features to the target changes) shows neither in feature drift nor in CBPE, only in
realized performance once labels arrive.

The reference is the model version's holdout, scored by its own ONNX artifact at
training time. NannyML's usage telemetry is switched off before it is imported.

This module wires the parts and holds the Prefect tasks. The parts: the frames NannyML
gets (``monitor_frames``), the calculators and their calibration
(``monitor_calculators``), performance estimation's set-up (``monitor_performance``), the
report and NannyML's results as its rows (``monitor_report``), the policy's verdict
(``monitor_policy``), the summary in words (``monitor_summary``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import polars as pl
from prefect import task
from prefect.cache_policies import NONE

from driftloop.spec import DatasetSpec, GateSpec, MonitoringPolicy
from driftloop.tasks.calibration import (
    Calibration,
    CalibrationStore,
    apply_thresholds,
    partial_chunks,
)
from driftloop.tasks.monitor_calculators import (
    Calculators,
    Fitted,
    Results,
    categorical_features,
    fit_calculators,
    labels_as_strings,
    prepare_reference,
    stored_or_calibrated,
)
from driftloop.tasks.monitor_frames import (
    DEFAULT_LEVERS,
    CategoryCodes,
    Levers,
    check_reference_chunks,
    chunking,
    nannyml,
    prepare,
)
from driftloop.tasks.monitor_performance import PerformanceSetup, performance_setup
from driftloop.tasks.monitor_policy import PolicyDecision, decide_retraining
from driftloop.tasks.monitor_report import (
    Chunk,
    MonitorReport,
    chunk_sizes,
    labelled_rows,
    long_results,
    renamed,
)


@dataclass(frozen=True)
class MonitorFit:
    """NannyML's calculators fitted on a reference, ready for analysis windows. Fitted
    before the analysis is read (:func:`fit_monitoring`): the fits' working sets (the data
    reconstruction's is ~4 copies of the reference's features) are then gone before the
    analysis arrives, instead of on top of it."""

    spec: DatasetSpec
    policy: MonitoringPolicy
    levers: Levers
    reference: pl.DataFrame  # as prepared for NannyML
    ref: Any  # its pandas form
    drift_ref: Any  # the pandas form univariate drift reads (categorical features as codes)
    chunk_args: dict[str, Any]
    calculators: Calculators
    perf: PerformanceSetup  # from the reference's columns alone
    fitted: Fitted
    codes: CategoryCodes | None  # the categorical features' integer codes (Levers.category_codes)


def fit_monitoring(reference: pl.DataFrame, spec: DatasetSpec, policy: MonitoringPolicy, *,
                   levers: Levers = DEFAULT_LEVERS) -> MonitorFit:
    """Every calculator monitoring runs, fitted on ``reference`` (features, ``prediction``,
    ``probability`` and the target). Realized performance is fitted too; a window without
    labels skips it."""
    prepared = prepare_reference(reference, spec, levers)
    reference, ref, drift_ref, codes = prepared.reference, prepared.ref, prepared.drift_ref, prepared.codes
    chunk_args = chunking(policy, len(ref))
    check_reference_chunks(ref, spec, policy, chunk_args)
    calculators = Calculators(nannyml(), spec, policy, categorical_features(spec))
    perf = performance_setup(spec, policy, ref)
    fitted = fit_calculators(calculators, ref, chunk_args, perf, realized=spec.target in ref.columns, drift_ref=drift_ref)
    return MonitorFit(spec, policy, levers, reference, ref, drift_ref, chunk_args, calculators, perf, fitted, codes)


def monitor_analysis(fit: MonitorFit, analysis: pl.DataFrame, *, with_plots: bool = True,
                     calibrations: CalibrationStore | None = None) -> MonitorReport:
    """``analysis`` (the reference's columns; the target where labels arrived) through the
    fitted calculators a few whole chunks at a time (``fit.levers``): the results are those
    of one pass. With ``calibrations``, the drift and realized thresholds' calibration is
    read from it when one for this reference, chunk size and policy is stored, else
    computed and stored."""
    spec, policy, levers, chunk_args = fit.spec, fit.policy, fit.levers, fit.chunk_args
    analysis = labels_as_strings(analysis, spec)
    has_labels = spec.target in analysis.columns and any_label(analysis[spec.target])
    perf = performance_setup(spec, policy, fit.ref, analysis)
    fitted = fit.fitted
    if perf.metric is None:  # multiclass output of an early build, without per-class probabilities
        fitted = replace(fitted, estimator=None, realized=None)
    if not has_labels:
        fitted = replace(fitted, realized=None)
    analysis = prepare(analysis, spec, categoricals=levers.categoricals, float32=levers.float32)
    codes = fit.codes.extended(analysis) if fit.codes is not None else None
    results = fitted.run(analysis, chunk_args, levers, spec.target, codes)
    del analysis
    rows, labelled, chunk_rows = report_rows(results, perf, chunk_args)

    sizes = chunk_sizes(results.univariate)
    full_chunk = chunk_args.get("chunk_size") or (sorted(sizes.values())[len(sizes) // 2] if sizes else None)
    calibration, calibration_source = None, None
    if policy.alert_rate is not None and full_chunk:
        calibration, calibration_source = stored_or_calibrated(
            fit.calculators, fit.reference, fit.ref, perf, chunk_rows=full_chunk, calibrations=calibrations,
            drift_ref=fit.drift_ref)
    partial = partial_chunks(sizes, chunk_args.get("chunk_size"))
    if calibration is not None or partial:
        rows = apply_thresholds(rows, calibration or Calibration(0.0, 0, 0, 0, 0), set(partial))
    return MonitorReport(
        chunks_of(rows), rows, perf.metric, has_labels, results.figures() if with_plots else {},
        gate_metric=spec.gate_metric, labelled_rows=labelled, chunk_rows=chunk_rows,
        calibration=calibration, partial_chunks=partial, calibration_source=calibration_source,
    )


def run_monitoring(reference: pl.DataFrame, analysis: pl.DataFrame, spec: DatasetSpec, policy: MonitoringPolicy, *,
                   with_plots: bool = True, calibrations: CalibrationStore | None = None,
                   levers: Levers = DEFAULT_LEVERS) -> MonitorReport:
    """NannyML on ``analysis`` against ``reference``: :func:`fit_monitoring` then
    :func:`monitor_analysis`. A caller that can read the analysis later should call the
    two itself, reading it in between (the monitor flow does)."""
    return monitor_analysis(fit_monitoring(reference, spec, policy, levers=levers), analysis,
                            with_plots=with_plots, calibrations=calibrations)


def any_label(column: pl.Series) -> bool:
    """Whether any row has a label (null, or NaN in a float column, is none)."""
    if column.dtype.is_float():
        column = column.fill_nan(None)
    return bool(column.is_not_null().any())


def report_rows(results: Results, perf: PerformanceSetup,
                chunk_args: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[int, int], int | None]:
    """The report's rows (drift, estimated and realized performance, in our metric names),
    labelled rows per chunk, and the rows of a full chunk (period chunks: the median)."""
    rows = long_results(results.univariate, "univariate") + long_results(results.multivariate, "multivariate")
    if results.estimated is not None and perf.nml_metric is not None and perf.metric is not None:
        rows += renamed(long_results(results.estimated, "estimated"), {perf.nml_metric: [perf.metric]})
    labelled: dict[int, int] = {}
    chunk_rows: int | None = chunk_args.get("chunk_size")
    if results.realized is not None:
        rows += renamed(long_results(results.realized, "realized"), perf.realized)
        labelled, sizes = labelled_rows(results.realized)
        if chunk_rows is None and sizes:
            chunk_rows = sorted(sizes)[len(sizes) // 2]
    return rows, labelled, chunk_rows


def chunks_of(rows: list[dict[str, Any]]) -> list[Chunk]:
    seen: dict[int, Chunk] = {}
    for r in rows:
        seen.setdefault(r["chunk_index"], Chunk(r["chunk_index"], r["chunk_key"], r["chunk_start"], r["chunk_end"]))
    return sorted(seen.values(), key=lambda c: c.index)


@task(name="nannyml-fit", cache_policy=NONE)
def fit_monitoring_task(reference: pl.DataFrame, spec: DatasetSpec, policy: MonitoringPolicy) -> MonitorFit:
    return fit_monitoring(reference, spec, policy)


@task(name="nannyml", cache_policy=NONE)
def monitor_task(fit: MonitorFit, analysis: pl.DataFrame, calibrations: CalibrationStore | None = None) -> MonitorReport:
    return monitor_analysis(fit, analysis, calibrations=calibrations)


@task(name="policy", cache_policy=NONE)
def decide_task(
    report: MonitorReport, policy: MonitoringPolicy, gate: GateSpec | None = None, gate_metric: str | None = None,
) -> PolicyDecision:
    return decide_retraining(report, policy, gate=gate, gate_metric=gate_metric)
