"""Performance monitoring's set-up: which metric is estimated without labels (CBPE for
classification, DLE for regression) and which are realized where labels have arrived,
in NannyML's names, with the probability column(s).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from driftloop.spec import DatasetSpec, MonitoringPolicy
from driftloop.tasks.monitor_report import MonitoringError

logger = logging.getLogger(__name__)

_ESTIMATED_DEFAULT = {"binary_classification": "roc_auc", "multiclass_classification": "roc_auc", "regression": "mae"}
_PROBLEM = {"binary_classification": "classification_binary", "multiclass_classification": "classification_multiclass", "regression": "regression"}
# Our metric names (driftloop.metrics) -> NannyML 0.13's, per task; the same names serve
# CBPE/DLE and PerformanceCalculator. Absent: metrics NannyML lacks (log_loss, r2, the
# weighted multiclass ones; pr_auc for multiclass, which tasks.evaluate does not report).
# NannyML's multiclass roc_auc and f1 are macro averages (one-vs-rest for roc_auc).
NANNYML_METRIC: dict[str, dict[str, str]] = {
    "binary_classification": {"roc_auc": "roc_auc", "pr_auc": "average_precision", "f1": "f1", "accuracy": "accuracy"},
    "multiclass_classification": {
        "roc_auc": "roc_auc", "roc_auc_macro": "roc_auc", "f1": "f1", "f1_macro": "f1", "accuracy": "accuracy",
    },
    "regression": {"mae": "mae", "rmse": "rmse"},
}



def nannyml_metric(task: str, metric: str) -> str | None:
    """NannyML's name for our ``metric`` on ``task``; None where NannyML lacks it."""
    return NANNYML_METRIC[task].get(metric)


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
            known = ", ".join(NANNYML_METRIC[spec.task])
            raise MonitoringError(f"NannyML cannot estimate {metric!r} for {spec.task}; estimated_metric may be: {known}")
    realized = realized_metrics(spec.task, [spec.gate_metric, metric]) if metric is not None else {}
    return PerformanceSetup(metric, nml_metric, problem, proba, realized)


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



def fit_estimator(nml: Any, spec: DatasetSpec, perf: PerformanceSetup, chunk_args: dict[str, Any], ref: Any) -> Any:
    """The estimator of ``perf.metric`` (DLE for regression, CBPE otherwise) fitted on the
    reference ``ref`` (pandas); None when no metric is estimated."""
    if perf.nml_metric is None:
        return None
    common = {"timestamp_column_name": spec.timestamp, **chunk_args}
    if perf.problem == "regression":
        return nml.DLE(
            feature_column_names=spec.feature_columns, y_pred="prediction", y_true=spec.target,
            metrics=[perf.nml_metric], **common,
        ).fit(ref)
    return nml.CBPE(
        y_pred_proba=perf.proba, y_pred="prediction", y_true=spec.target, problem_type=perf.problem,
        metrics=[perf.nml_metric], **common,
    ).fit(ref)
