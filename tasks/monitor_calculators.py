"""NannyML's calculators as monitoring configures them (univariate and multivariate
drift, realized performance), their calibration on the reference (drift thresholds for a
false-alarm rate, read from the calibration store when stored there), and one pass of
the analysis through the fitted calculators a few whole chunks at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

from driftloop.metrics import HIGHER_IS_BETTER
from driftloop.spec import DatasetSpec, MonitoringPolicy
from driftloop.tasks.calibration import (
    CALIBRATION_VERSION,
    MULTIVARIATE_SPLITS,
    Calibration,
    CalibrationKey,
    CalibrationStore,
    cross_halves,
    frame_sha256,
    multivariate_threshold,
    realized_thresholds,
    resample_batches,
    univariate_thresholds,
)
from driftloop.tasks.monitor_frames import (
    CALIBRATION_BATCH_ROWS,
    DEFAULT_LEVERS,
    CategoryCodes,
    Levers,
    analysis_batches,
    check_reference_chunks,
    chunking,
    nannyml,
    nannyml_frame,
    prepare,
)
from driftloop.tasks.monitor_performance import PerformanceSetup, fit_estimator, performance_setup
from driftloop.tasks.monitor_report import (
    MonitoringError,
    long_results,
    merged,
    renamed,
    shift_chunks,
)


def categorical_features(spec: DatasetSpec) -> list[str]:
    return [c for c in spec.feature_columns if spec.column_spec(c).dtype in ("category", "string", "bool")]


def labels_as_strings(frame: pl.DataFrame, spec: DatasetSpec) -> pl.DataFrame:
    """Multiclass labels compare as the strings the model predicts."""
    if spec.task == "multiclass_classification" and spec.target in frame.columns:
        return frame.with_columns(pl.col(spec.target).cast(pl.String))
    return frame


@dataclass(frozen=True)
class PreparedReference:
    """The reference as the calculators are fitted on it: ``reference`` prepared (polars),
    ``ref`` its NannyML frame, ``drift_ref`` what univariate drift reads (categoricals as
    :class:`CategoryCodes` where the lever is on, else ``ref``) and the codes."""

    reference: pl.DataFrame
    ref: Any
    drift_ref: Any
    codes: CategoryCodes | None


def prepare_reference(reference: pl.DataFrame, spec: DatasetSpec, levers: Levers) -> PreparedReference:
    """What monitoring and its calibration both fit on, prepared once the same way."""
    reference = prepare(labels_as_strings(reference, spec), spec, categoricals=levers.categoricals)
    codes = (CategoryCodes.of(reference, categorical_features(spec))
             if levers.categoricals and levers.category_codes else None)
    ref = nannyml_frame(reference, levers)
    return PreparedReference(reference, ref, codes.coded(ref, reference) if codes is not None else ref, codes)


class Calculators:
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


def calibrate(calculators: Calculators, ref: Any, *, chunk_rows: int, alert_rate: float, draws: int,
              realized: dict[str, list[str]], problem: str, proba: str | dict[str, str] | None,
              batch_rows: int = CALIBRATION_BATCH_ROWS, drift_ref: Any | None = None) -> Calibration:
    """The thresholds for a false-alarm rate ``alert_rate`` (see ``tasks.calibration``):
    ``draws`` chunks of ``chunk_rows`` resampled from the reference ``ref`` (pandas) through
    the univariate calculator and, where the reference has labels, the realized performance
    calculator; the multivariate statistic on halves of the reference. The draws go through
    ``batch_rows // chunk_rows`` chunks at a time (at least one). Without the timestamp:
    NannyML would sort the draws by time and every chunk would hold a few rows many times
    over. ``drift_ref``: ``ref`` as univariate drift reads it (:class:`CategoryCodes`); the
    realized calculator reads the same draws' target and prediction columns."""
    batch = max(1, batch_rows // chunk_rows)
    by_size = {"chunk_size": chunk_rows}
    drift_ref = ref if drift_ref is None else drift_ref
    univariate = calculators.univariate(drift_ref, by_size, None)
    performance = None
    if realized and calculators.spec.target in ref.columns:
        performance = calculators.realized(drift_ref, by_size, None, list(realized), problem, proba)
    null_uni: list[dict[str, Any]] = []
    null_perf: list[dict[str, Any]] = []
    for chunks in resample_batches(drift_ref, chunk_rows=chunk_rows, draws=draws, seed=0, batch=batch):
        null_uni += long_results(univariate.calculate(chunks), "univariate")
        if performance is not None:
            null_perf += renamed(long_results(performance.calculate(chunks), "realized"), realized)
        del chunks
    # Rows the reconstruction was fitted on reconstruct better than new ones: fit on one
    # half of the reference and draw chunks from the other, both ways round.
    null_multi: list[list[float]] = []
    for fold, (fit_half, held_out) in enumerate(cross_halves(ref, splits=MULTIVARIATE_SPLITS)):
        multivariate = calculators.multivariate(fit_half, by_size, None)
        values: list[float] = []
        for chunks in resample_batches(held_out, chunk_rows=chunk_rows, seed=1 + fold, batch=batch,
                                       draws=max(25, draws // (2 * MULTIVARIATE_SPLITS))):
            values += [r["value"] for r in long_results(multivariate.calculate(chunks), "multivariate") if r["value"] is not None]
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



def stored_or_calibrated(calculators: Calculators, reference: pl.DataFrame, ref: Any, perf: PerformanceSetup, *,
                          chunk_rows: int, calibrations: CalibrationStore | None,
                          batch_rows: int = CALIBRATION_BATCH_ROWS, drift_ref: Any | None = None) -> tuple[Calibration, str]:
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
                            batch_rows=batch_rows, drift_ref=drift_ref)
    if calibrations is not None and key is not None:
        calibrations.save(key, calibration)
    return calibration, "computed"


def ensure_calibration(reference: pl.DataFrame, spec: DatasetSpec, policy: MonitoringPolicy, calibrations: CalibrationStore,
                       *, chunk_rows: int | None = None, levers: Levers = DEFAULT_LEVERS) -> tuple[Calibration, str] | None:
    """The calibration a monitoring run of ``reference`` with ``policy`` uses, stored in
    ``calibrations`` if it was not yet ("stored" or "computed"). ``chunk_rows``: the chunk
    size (default: the policy's, as monitoring chooses it; period chunks need it given, as
    their full chunk depends on the analysis). None when the policy calibrates nothing."""
    if policy.alert_rate is None:
        return None
    prepared = prepare_reference(reference, spec, levers)
    ref = prepared.ref
    chunk_rows = chunk_rows or chunking(policy, len(ref)).get("chunk_size")
    if chunk_rows is None:
        raise MonitoringError("period chunks: give ensure_calibration the full chunk's rows (chunk_rows)")
    check_reference_chunks(ref, spec, policy, {"chunk_size": chunk_rows})
    calculators = Calculators(nannyml(), spec, policy, categorical_features(spec))
    return stored_or_calibrated(calculators, prepared.reference, ref, performance_setup(spec, policy, ref),
                                chunk_rows=chunk_rows, calibrations=calibrations, drift_ref=prepared.drift_ref)



@dataclass
class Results:
    """NannyML's results of the whole analysis (estimated, realized: None when not computed)."""

    univariate: Any
    multivariate: Any
    estimated: Any | None
    realized: Any | None

    def figures(self) -> dict[str, Any]:
        """NannyML's plotly figures by name."""
        figures = {
            "univariate_drift": self.univariate.filter(period="all").plot(kind="drift"),
            "multivariate_drift": self.multivariate.plot(),
        }
        if self.estimated is not None:
            figures["estimated_performance"] = self.estimated.plot()
        if self.realized is not None:
            figures["realized_performance"] = self.realized.plot()
        return figures


@dataclass
class Fitted:
    """The calculators fitted on the reference (estimator, realized: None when not run)."""

    univariate: Any
    multivariate: Any
    estimator: Any | None
    realized: Any | None

    def run(self, analysis: pl.DataFrame, chunk_args: dict[str, Any], levers: Levers, target: str,
            codes: CategoryCodes | None = None) -> Results:
        """The prepared ``analysis`` through every calculator, whole chunks at a time
        (``levers.batch_rows``), the batches' results merged: the results of one pass.
        ``codes``: the fit's category codes, extended with the analysis's values."""
        parts: dict[str, list[Any]] = {"univariate": [], "multivariate": [], "estimated": [], "realized": []}
        for chunk_offset, row_offset, rows in analysis_batches(analysis, chunk_args, levers.batch_rows):
            batch = nannyml_frame(rows, levers)
            drift_batch = codes.coded(batch, rows) if codes is not None else batch
            del rows
            parts["univariate"].append(shift_chunks(self.univariate.calculate(drift_batch), chunk_offset, row_offset))
            del drift_batch
            parts["multivariate"].append(shift_chunks(self.multivariate.calculate(batch), chunk_offset, row_offset))
            if self.realized is not None:
                parts["realized"].append(shift_chunks(self.realized.calculate(batch), chunk_offset, row_offset))
            if self.estimator is not None:
                batch = batch.drop(columns=[target], errors="ignore")
                parts["estimated"].append(shift_chunks(self.estimator.estimate(batch), chunk_offset, row_offset))
            del batch
        return Results(
            merged(parts["univariate"]), merged(parts["multivariate"]),
            merged(parts["estimated"]) if parts["estimated"] else None,
            merged(parts["realized"]) if parts["realized"] else None,
        )


def fit_calculators(calculators: Calculators, ref: Any, chunk_args: dict[str, Any], perf: PerformanceSetup,
                    *, realized: bool, drift_ref: Any | None = None) -> Fitted:
    """Every calculator fitted on the reference ``ref`` (pandas). The data reconstruction's
    fit first: its working set (~4 copies of the reference's features) then comes before
    the other calculators' fitted state, not on top of it. ``drift_ref``: ``ref`` as
    univariate drift reads it (:class:`CategoryCodes`)."""
    timestamp = calculators.spec.timestamp
    multivariate = calculators.multivariate(ref, chunk_args, timestamp)
    univariate = calculators.univariate(ref if drift_ref is None else drift_ref, chunk_args, timestamp)
    if hasattr(univariate.result, "reference_data"):
        # A copy of the reference, for NannyML's distribution plots only (not drawn here);
        # every result filtered from this one would copy it again.
        univariate.result.reference_data = None
    estimator = fit_estimator(calculators.nml, calculators.spec, perf, chunk_args, ref)
    # Run on the whole analysis, unlabelled rows included (NannyML skips them per chunk):
    # its chunks are then the same as the drift and estimation chunks, index for index.
    performance = (calculators.realized(ref, chunk_args, timestamp, list(perf.realized), perf.problem, perf.proba)
                   if realized and perf.realized else None)
    return Fitted(univariate, multivariate, estimator, performance)
