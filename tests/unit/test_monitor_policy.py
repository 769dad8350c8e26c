"""The monitoring policy acts on realized performance: concept drift (the features'
relation to the target changes, the features do not) is invisible to feature drift and to
CBPE and shows only in realized performance once labels arrive."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import numpy as np
import polars as pl
import pytest

from driftloop.onnx_model import load_model, predict_scores
from driftloop.spec import DatasetSpec, GateSpec, MonitoringPolicy, Threshold, load_spec
from driftloop.tasks.export import build_onnx
from driftloop.tasks.fit import fit_model, prepare_training_data
from driftloop.tasks.monitor import run_monitoring
from driftloop.tasks.monitor_policy import PERFORMANCE_EVENT, decide_retraining
from driftloop.tasks.monitor_report import Chunk, MonitorReport
from driftloop.tasks.monitor_summary import chunk_summaries, render_summary
from driftloop.tasks.score import prediction_frame
from driftloop.tasks.split import split_dataset
from tests.support.data import make_loans, write_spec

ROWS = 2400  # analysis rows: 10 full chunks of the default 240 (reference 1200 // 5)
POLICY = MonitoringPolicy()  # performance: 2 alerts of the last 3 chunks


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    spec = load_spec(write_spec(tmp_path_factory.mktemp("spec")))
    split = split_dataset(make_loans(8000, seed=1), spec, seed=0)
    data, encoding, _ = prepare_training_data(spec, split.train, split.valid)
    fitted = fit_model("xgboost", {"max_depth": 3, "learning_rate": 0.1}, data, seed=0)
    model = load_model(build_onnx(fitted, encoding, spec, {}))

    def scored(frame: pl.DataFrame) -> pl.DataFrame:
        out = prediction_frame(model, spec, frame, predict_scores(model, frame), model_name="m", model_version=1,
                               scored_at=datetime.now(UTC))
        return out.with_columns(frame[spec.target])

    analysis = scored(make_loans(ROWS, seed=7))
    return {
        "spec": spec,
        "reference": scored(split.holdout),
        "analysis": analysis,
        "stationary": run_monitoring(scored(split.holdout), analysis, spec, POLICY, with_plots=False),
    }


def concept_drift(frame: pl.DataFrame, from_row: int) -> pl.DataFrame:
    """From ``from_row`` on, repayment depends on the ratio the other way round (higher
    ratio, more repaid) and on nothing else; the features stay as they were."""
    rng = np.random.default_rng(3)
    ratio = frame["ratio"].fill_null(0.5).to_numpy()
    relabelled = (2.5 * ratio - 1.25 + rng.logistic(size=frame.height) > 0).astype(np.int64)
    keep = np.arange(frame.height) < from_row
    return frame.with_columns(pl.Series("repaid", np.where(keep, frame["repaid"].to_numpy(), relabelled)))


def realized(report: MonitorReport, metric: str = "roc_auc") -> list[dict]:
    return sorted((r for r in report.rows("realized") if r["name"] == metric), key=lambda r: r["chunk_index"])


def test_concept_drift_fires_on_realized_performance_only_with_labels(setup: dict) -> None:
    spec: DatasetSpec = setup["spec"]
    drifted = concept_drift(setup["analysis"], from_row=ROWS // 2)
    # The newest chunk's labels have not arrived yet.
    drifted = drifted.with_columns(pl.when(pl.int_range(pl.len()) < ROWS - 240).then(pl.col("repaid")).alias("repaid"))
    report = run_monitoring(setup["reference"], drifted, spec, POLICY, with_plots=False)

    # Same chunks for every kind, although the last has no labels (NannyML skips them).
    assert {r["chunk_index"] for r in report.rows("realized")} == {r["chunk_index"] for r in report.rows("estimated")}
    assert report.labelled_rows[9] == 0 and report.labelled_rows[8] == 240
    values = [r["value"] for r in realized(report)]
    assert values[9] is None
    assert max(values[6:9]) < 0.6 < min(values[:4]), values
    # CBPE sees nothing: it reads the model's scores, which did not change.
    assert not any(r["alert"] for r in report.rows("estimated"))

    estimated_only = decide_retraining(report, POLICY)
    assert estimated_only.event != PERFORMANCE_EVENT
    decision = decide_retraining(report, POLICY, gate=spec.gate, gate_metric="roc_auc")
    assert decision.fired and decision.event == PERFORMANCE_EVENT
    reason = next(r for r in decision.reasons if r.startswith("realized roc_auc"))
    assert "alerted against the reference in 3 of the last 3 labelled chunks" in reason
    assert "[1920:2159]" in reason and "[2160:2399]" not in reason  # unlabelled chunk not counted

    unlabelled = run_monitoring(setup["reference"], drifted.drop("repaid"), spec, POLICY, with_plots=False)
    assert not unlabelled.has_labels and not unlabelled.rows("realized")
    no_labels = decide_retraining(unlabelled, POLICY, gate=spec.gate, gate_metric="roc_auc")
    assert no_labels.event != PERFORMANCE_EVENT
    assert not any("realized" in r for r in no_labels.reasons)


def test_stationary_control_with_labels_does_not_fire(setup: dict) -> None:
    report: MonitorReport = setup["stationary"]
    values = [r["value"] for r in realized(report)]
    assert len(values) == 10 and all(0.65 < v < 0.9 for v in values), values
    decision = decide_retraining(report, POLICY, gate=setup["spec"].gate, gate_metric="roc_auc")
    assert decision.event != PERFORMANCE_EVENT
    assert not any("realized" in r for r in decision.reasons)


def test_the_gates_absolute_bar_fires_without_a_reference_alert(setup: dict) -> None:
    report: MonitorReport = setup["stationary"]
    recent = realized(report)[-3:]
    assert not any(r["alert"] for r in recent)  # NannyML's reference-relative rule is quiet

    strict = GateSpec(thresholds={"roc_auc": Threshold(min=0.99)})  # never reached
    decision = decide_retraining(report, POLICY, gate=strict, gate_metric="roc_auc")
    assert decision.fired and decision.event == PERFORMANCE_EVENT
    reason = next(r for r in decision.reasons if r.startswith("realized"))
    assert reason.startswith("realized roc_auc below the gate's min 0.99 in 3 of the last 3 labelled chunks")
    assert all(f"{r['value']:.3f}" in reason for r in recent)
    assert "alerted" not in reason

    lenient = GateSpec(thresholds={"roc_auc": Threshold(min=0.5)})
    assert decide_retraining(report, POLICY, gate=lenient, gate_metric="roc_auc").event != PERFORMANCE_EVENT
    # The gate's own metric is the default; a metric NannyML cannot compute has no rows.
    assert decide_retraining(report, POLICY, gate=strict.model_copy(update={"metric": "roc_auc"})).event == PERFORMANCE_EVENT
    log_loss_bar = GateSpec(thresholds={"log_loss": Threshold(max=0.01)})
    assert decide_retraining(report, POLICY, gate=log_loss_bar, gate_metric="log_loss").event != PERFORMANCE_EVENT


def test_a_tiny_last_chunk_is_ignored_and_the_gate_metric_is_realized(setup: dict) -> None:
    # 5 full chunks of 240 and a last one of 30 whose labels are all wrong.
    frame = setup["analysis"].head(1230)
    frame = frame.with_columns(
        pl.when(pl.int_range(pl.len()) >= 1200).then(1 - pl.col("repaid")).otherwise(pl.col("repaid")).alias("repaid")
    )
    spec = setup["spec"].model_copy(update={"gate": GateSpec(metric="pr_auc")})  # NannyML: average_precision
    report = run_monitoring(setup["reference"], frame, spec, POLICY, with_plots=False)
    assert report.chunk_rows == 240 and report.labelled_rows[5] == 30
    tail = realized(report)[-1]
    # Its value is terrible, but a partial chunk is reported without alerts.
    assert tail["chunk_index"] == 5 and tail["value"] < 0.5 and not tail["alert"], tail
    assert report.partial_chunks == {5: 30}

    one_of_last = MonitoringPolicy(performance={"alerts": 1, "of_last": 1})
    assert decide_retraining(report, one_of_last, gate_metric="roc_auc").event != PERFORMANCE_EVENT
    # Judged against a gate bar it would be degraded: the labelled-rows rule keeps it out.
    strict = GateSpec(thresholds={"roc_auc": Threshold(min=0.6)})
    assert decide_retraining(report, one_of_last, gate=strict, gate_metric="roc_auc").event != PERFORMANCE_EVENT
    uncounted = dataclasses.replace(report, chunk_rows=None)
    assert decide_retraining(uncounted, one_of_last, gate=strict, gate_metric="roc_auc").event == PERFORMANCE_EVENT

    pr_auc = realized(report, "pr_auc")
    assert len(pr_auc) == 6 and all(0 < r["value"] <= 1 for r in pr_auc)
    summaries = chunk_summaries(report)
    assert [c["realized"] for c in summaries] == [r["value"] for r in realized(report)]  # the estimated metric's
    assert [c["realized_gate"] for c in summaries] == [r["value"] for r in pr_auc]
    assert "realized pr_auc" in render_summary("m:1", report, decide_retraining(report, POLICY), None)


def test_lower_is_better_metrics_use_the_gates_max() -> None:
    def row(i: int, value: float) -> dict:
        return {"chunk_index": i, "chunk_key": f"c{i}", "chunk_start": None, "chunk_end": None, "kind": "realized",
                "name": "mae", "method": "realized", "value": value, "lower_threshold": None, "upper_threshold": None,
                "alert": False}

    report = MonitorReport([Chunk(i, f"c{i}", None, None) for i in range(4)],
                           [row(0, 1.0), row(1, 1.0), row(2, 3.0), row(3, 3.5)], "mae", True)
    gate = GateSpec(thresholds={"mae": Threshold(max=2.0)})
    decision = decide_retraining(report, POLICY, gate=gate, gate_metric="mae")
    assert decision.event == PERFORMANCE_EVENT
    assert "realized mae above the gate's max 2 in 2 of the last 3 labelled chunks (c2: 3.000, c3: 3.500)" in decision.reasons[0]
    assert decide_retraining(report, POLICY, gate=GateSpec(thresholds={"mae": Threshold(max=4.0)}), gate_metric="mae").fired is False


def test_performance_better_than_the_reference_is_no_reason_to_retrain() -> None:
    from driftloop.tasks.monitor_policy import worse_than_threshold
    from driftloop.tasks.monitor_report import Chunk

    def row(i: int, value: float) -> dict:
        return {"chunk_index": i, "chunk_key": f"[{i}]", "chunk_start": None, "chunk_end": None, "kind": "estimated",
                "name": "roc_auc", "method": "estimated", "value": value, "lower_threshold": 0.80,
                "upper_threshold": 0.90, "alert": not 0.80 <= value <= 0.90}

    better = [row(i, 0.95) for i in range(3)]
    report = MonitorReport([Chunk(i, f"[{i}]", None, None) for i in range(3)], better, "roc_auc", False)
    assert not decide_retraining(report, POLICY).fired and not any(worse_than_threshold(r) for r in better)
    worse = [row(i, 0.70) for i in range(3)]
    report = MonitorReport([Chunk(i, f"[{i}]", None, None) for i in range(3)], worse, "roc_auc", False)
    assert decide_retraining(report, POLICY).event == PERFORMANCE_EVENT
