"""Multiclass monitoring: scored outputs carry a probability per class, and NannyML's
CBPE estimates multiclass ROC AUC from them; with labels, realized agrees with estimated
on data like the reference."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl

from driftloop.onnx_model import load_model, predict_scores
from driftloop.spec import MonitoringPolicy, load_spec
from driftloop.tasks.export import build_onnx
from driftloop.tasks.fit import fit_model, prepare_training_data
from driftloop.tasks.monitor import run_monitoring
from driftloop.tasks.score import prediction_frame
from driftloop.tasks.split import split_dataset
from tests.support.data import make_loans, write_spec

COLUMNS = {
    "id": {"dtype": "int"}, "ts": {"dtype": "datetime"}, "amount": {"dtype": "float", "min": 0},
    "ratio": {"dtype": "float", "nullable": True}, "band": {"dtype": "category", "allowed": ["low", "mid", "high"]},
    "prev_ok": {"dtype": "bool"}, "term": {"dtype": "int"},
    "grade": {"dtype": "category", "allowed": ["low", "mid", "high"]},
}


def graded(n: int, seed: int) -> pl.DataFrame:
    """Loans with a noisy three-way grade the features predict well, not perfectly."""
    noise = np.random.default_rng(seed + 100).normal(1.0, 0.25, n)
    frame = make_loans(n, seed=seed)
    score = frame["amount"].to_numpy() * noise
    return frame.with_columns(pl.Series("grade", np.where(score < 700, "low", np.where(score < 1400, "mid", "high"))))


def test_cbpe_estimates_multiclass_roc_auc_and_matches_realized(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, {
        "task": "multiclass_classification", "target": "grade", "segment": None,
        "features": ["amount", "ratio", "prev_ok", "term"], "columns": COLUMNS,
    }))
    split = split_dataset(graded(20_000, seed=1), spec, seed=0)
    data, encoding, classes = prepare_training_data(spec, split.train, split.valid)
    fitted = fit_model("xgboost", {"max_depth": 4, "learning_rate": 0.1}, data, seed=0)
    model = load_model(build_onnx(fitted, encoding, spec, {"classes": list(classes)}))

    def scored(frame: pl.DataFrame) -> pl.DataFrame:
        out = prediction_frame(model, spec, frame, predict_scores(model, frame), model_name="m", model_version=1, scored_at=datetime.now(UTC))
        return out.with_columns(frame["grade"])

    reference, analysis = scored(split.holdout), scored(graded(6_000, seed=7))
    per_class = reference.select("probability_low", "probability_mid", "probability_high").to_numpy()
    np.testing.assert_allclose(per_class.sum(axis=1), 1.0, atol=1e-5)

    report = run_monitoring(reference, analysis, spec, MonitoringPolicy(), with_plots=False)

    assert report.estimated_metric == "roc_auc"
    estimated = {r["chunk_index"]: r["value"] for r in report.rows("estimated")}
    realized = {r["chunk_index"]: r["value"] for r in report.rows("realized") if r["name"] == "roc_auc"}
    assert estimated and set(estimated) == set(realized)
    assert all(0.7 < v <= 1.0 for v in estimated.values()), estimated
    gaps = [abs(estimated[i] - realized[i]) for i in estimated]
    assert max(gaps) < 0.05, (estimated, realized)
