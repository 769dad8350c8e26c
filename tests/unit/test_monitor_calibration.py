"""Drift alerts with a known false-alarm rate: thresholds calibrated by resampling the
reference. A stationary stream rarely alerts and never fires the policy; a real shift is
found in nearly every chunk; a partial last chunk is reported without alerts."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
import pytest

from driftloop.onnx_model import load_model, predict_scores
from driftloop.spec import MonitoringPolicy, load_spec
from driftloop.tasks.export import build_onnx
from driftloop.tasks.fit import fit_model, prepare_training_data
from driftloop.tasks.monitor import run_monitoring
from driftloop.tasks.monitor_policy import decide_retraining
from driftloop.tasks.monitor_summary import render_summary
from driftloop.tasks.score import prediction_frame
from driftloop.tasks.split import split_dataset
from tests.support.data import make_loans, write_spec

CHUNK = 240  # the default: the 1,200-row reference // (min_reference_chunks + 1)
FULL_CHUNKS = 32
POLICY = MonitoringPolicy()  # alert_rate 0.01


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    spec = load_spec(write_spec(tmp_path_factory.mktemp("spec")))
    split = split_dataset(make_loans(8000, seed=1), spec, seed=0)
    data, encoding, _ = prepare_training_data(spec, split.train, split.valid)
    model = load_model(build_onnx(fit_model("xgboost", {"max_depth": 3}, data, seed=0), encoding, spec, {}))

    def scored(frame: pl.DataFrame) -> pl.DataFrame:
        return prediction_frame(model, spec, frame, predict_scores(model, frame), model_name="m", model_version=1,
                                scored_at=datetime.now(UTC))

    # The same distribution as the reference, 32 full chunks and a partial one of 60 rows.
    stationary = make_loans(FULL_CHUNKS * CHUNK + 60, seed=21)
    sd = float(stationary["amount"].std())
    shifted = stationary.with_columns(pl.col("amount") + sd)
    reference = scored(split.holdout).with_columns(split.holdout[spec.target])
    # Stationary streams of other seeds: the calibrated rate must hold beyond one draw.
    others = [scored(make_loans(FULL_CHUNKS * CHUNK, seed=seed)) for seed in (22, 23, 24)]
    return {"spec": spec, "reference": reference, "stationary": scored(stationary), "shifted": scored(shifted),
            "stationary_seeds": others}


def univariate(report) -> list[dict]:
    return report.rows("univariate")


def test_a_stationary_stream_alerts_at_the_calibrated_rate_and_never_fires(setup: dict) -> None:
    report = run_monitoring(setup["reference"], setup["stationary"], setup["spec"], POLICY, with_plots=False)
    assert report.calibration is not None and report.calibration.chunk_rows == CHUNK
    checks = univariate(report)
    assert len({r["chunk_index"] for r in checks}) == FULL_CHUNKS + 1
    alert_fraction = sum(r["alert"] for r in checks) / len(checks)
    multivariate_alerts = sum(r["alert"] for r in report.rows("multivariate"))
    print(f"\nstationary: {alert_fraction:.4f} of {len(checks)} chunk x feature checks alert, "
          f"{multivariate_alerts} of {FULL_CHUNKS + 1} multivariate chunks")
    assert alert_fraction <= 2 * POLICY.alert_rate
    decision = decide_retraining(report, POLICY, gate=setup["spec"].gate, gate_metric="roc_auc")
    assert not decision.fired, decision.reasons
    # Every drift row carries the calibrated threshold it was judged by.
    assert all(r["upper_threshold"] is not None and r["lower_threshold"] is None for r in checks)
    assert report.calibration.univariate[("amount", "jensen_shannon")] > 0
    assert "probability 0.01" in render_summary("m:1", report, decision, None)


def test_the_calibrated_rate_holds_on_several_stationary_seeds(setup: dict) -> None:
    """Pooled over three more stationary streams, alerts stay near the policy's rate and
    the policy never fires: the margin is relative to the rate the calibration promises."""
    fractions = []
    for frame in setup["stationary_seeds"]:
        report = run_monitoring(setup["reference"], frame, setup["spec"], POLICY, with_plots=False)
        checks = univariate(report)
        fractions.append((sum(r["alert"] for r in checks), len(checks)))
        assert not decide_retraining(report, POLICY, gate=setup["spec"].gate, gate_metric="roc_auc").fired
    alerts, checks = map(sum, zip(*fractions, strict=True))
    print(f"\nstationary seeds: {fractions}; pooled {alerts / checks:.4f} (policy {POLICY.alert_rate})")
    assert alerts / checks <= 2 * POLICY.alert_rate
    assert all(a / n <= 3 * POLICY.alert_rate for a, n in fractions)


def test_the_partial_last_chunk_is_reported_without_alerts(setup: dict) -> None:
    report = run_monitoring(setup["reference"], setup["shifted"], setup["spec"], POLICY, with_plots=False)
    last = max(c.index for c in report.chunks)
    assert report.partial_chunks == {last: 60}
    assert not any(r["alert"] for r in report.results if r["chunk_index"] == last)
    summary = render_summary("m:1", report, decide_retraining(report, POLICY), None)
    assert f"Chunk {report.chunks[-1].key} (60 rows, fewer than a full chunk) is reported without alerts." in summary


def test_a_one_sd_shift_is_found_in_nearly_every_chunk(setup: dict) -> None:
    report = run_monitoring(setup["reference"], setup["shifted"], setup["spec"], POLICY, with_plots=False)
    full = [r for r in univariate(report) if r["name"] == "amount" and r["chunk_index"] not in report.partial_chunks]
    power = sum(r["alert"] for r in full) / len(full)
    others = [r for r in univariate(report) if r["name"] != "amount" and r["chunk_index"] not in report.partial_chunks]
    print(f"\npower: amount shifted by 1 sd flagged in {power:.0%} of {len(full)} chunks; "
          f"other features alert in {sum(r['alert'] for r in others) / len(others):.3f} of their checks")
    assert power >= 0.9
    assert decide_retraining(report, POLICY).drifting_features == ["amount"]
