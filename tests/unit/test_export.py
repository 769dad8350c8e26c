"""ONNX export: the artifact scores raw rows (categoricals included) exactly like the
native model, for both algorithms, on 100k+ rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from driftloop.onnx_model import load_model
from driftloop.spec import load_spec
from driftloop.tasks.export import (
    PARITY_MIN_ROWS,
    _convert_ensemble,
    binary_classifier_as_margin,
    build_onnx,
    check_parity,
    native_scores,
    parity_rows,
)
from driftloop.tasks.fit import fit_model, prepare_training_data, round_lightgbm_thresholds
from driftloop.tasks.split import split_dataset
from tests.support.data import make_loans, write_spec

PARAMS = {"xgboost": {"max_depth": 6, "learning_rate": 0.1}, "lightgbm": {"num_leaves": 63, "learning_rate": 0.1}}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    spec = load_spec(write_spec(tmp_path_factory.mktemp("spec")))
    split = split_dataset(make_loans(20_000, seed=3), spec, seed=0)
    data, encoding, _classes = prepare_training_data(spec, split.train, split.valid)
    return spec, split, data, encoding


@pytest.mark.parametrize("algorithm", ["xgboost", "lightgbm"])
def test_parity_on_100k_rows_with_categoricals(prepared, algorithm: str) -> None:
    spec, split, data, encoding = prepared
    fitted = fit_model(algorithm, PARAMS[algorithm], data, seed=0)
    onnx_bytes = build_onnx(fitted, encoding, spec, {"model": spec.name})
    rows = parity_rows(split.train, split.holdout, list(encoding.features), rows=PARITY_MIN_ROWS, seed=1)
    assert rows.height >= 100_000 and rows["band"].n_unique() == 3
    report = check_parity(fitted, encoding, onnx_bytes, rows, spec.task)
    assert report.passed, report.summary()
    assert report.max_abs_diff <= 1e-5 and report.label_flips == 0

    model = load_model(onnx_bytes)
    assert model.inputs == [
        ("amount", "float"), ("ratio", "float"), ("band", "string"), ("prev_ok", "float"), ("term", "float"),
    ]  # one input per spec feature: numeric and bool as float32, text as string
    assert model.metadata["algorithm"] == algorithm


def test_unseen_category_scores_as_missing(prepared) -> None:
    spec, split, data, encoding = prepared
    fitted = fit_model("lightgbm", PARAMS["lightgbm"], data, seed=0)
    onnx_bytes = build_onnx(fitted, encoding, spec, {})
    rows = split.holdout.head(50)
    as_unknown = rows.with_columns(pl.lit("platinum").alias("band"))
    as_null = rows.with_columns(pl.lit(None, dtype=pl.String).alias("band"))
    from driftloop.onnx_model import predict_scores

    model = load_model(onnx_bytes)
    np.testing.assert_array_equal(predict_scores(model, as_unknown), predict_scores(model, as_null))
    native = native_scores(fitted, encoding.matrix(as_null), spec.task)
    np.testing.assert_allclose(predict_scores(model, as_unknown), native, atol=1e-6)


def test_rounded_lightgbm_thresholds_leave_float32_predictions_unchanged(prepared) -> None:
    import lightgbm as lgb

    _spec, split, data, encoding = prepared
    raw = lgb.train({"objective": "binary", "num_leaves": 63, "verbose": -1, "seed": 0}, lgb.Dataset(data.x_train, data.y_train), 50)
    rounded = round_lightgbm_thresholds(raw.model_to_string())
    x = encoding.matrix(parity_rows(split.train, split.holdout, list(encoding.features), rows=50_000, seed=2))
    np.testing.assert_array_equal(raw.predict(x), rounded.predict(x))
    thresholds = [
        float(v) for line in rounded.model_to_string().splitlines() if line.startswith("threshold=")
        for v in line.removeprefix("threshold=").split()
    ]
    assert thresholds and all(float(np.float32(t)) == t for t in thresholds)


@pytest.mark.parametrize("task", ["regression", "multiclass_classification"])
def test_parity_for_regression_and_multiclass(tmp_path: Path, task: str) -> None:
    columns = {
        "amount": {"dtype": "float", "min": 0}, "ratio": {"dtype": "float", "nullable": True},
        "band": {"dtype": "category", "allowed": ["low", "mid", "high"]}, "prev_ok": {"dtype": "bool"},
        "term": {"dtype": "int"}, "ts": {"dtype": "datetime"}, "id": {"dtype": "int"},
    }
    if task == "regression":
        spec = load_spec(write_spec(tmp_path, {"task": task, "target": "amount_next", "columns": {**columns, "amount_next": {"dtype": "float"}}}))
        frame = make_loans(6000).with_columns((pl.col("amount") * 1.1 + pl.col("term") * 3).alias("amount_next"))
    else:
        spec = load_spec(write_spec(tmp_path, {"task": task, "target": "grade", "segment": None,
                                               "features": ["amount", "ratio", "prev_ok", "term"],
                                               "columns": {**columns, "grade": {"dtype": "category"}}}))
        frame = make_loans(6000).with_columns(pl.col("band").alias("grade"))
    split = split_dataset(frame, spec, seed=0)
    data, encoding, _classes = prepare_training_data(spec, split.train, split.valid)
    for algorithm in ("xgboost", "lightgbm"):
        fitted = fit_model(algorithm, PARAMS[algorithm], data, seed=0)
        onnx_bytes = build_onnx(fitted, encoding, spec, {})
        rows = parity_rows(split.train, split.holdout, list(encoding.features), rows=20_000, seed=1)
        report = check_parity(fitted, encoding, onnx_bytes, rows, spec.task)
        assert report.passed, f"{algorithm}: {report.summary()}"


@pytest.mark.parametrize("algorithm", ["xgboost", "lightgbm"])
def test_margin_rewrite_keeps_the_classifier_outputs(prepared, algorithm: str) -> None:
    """The faster regressor form gives ONNX Runtime's classifier probabilities to float32
    rounding and labels p >= 0.5, with nothing else in the graph changed."""
    import copy

    import onnxruntime as ort

    _spec, split, data, encoding = prepared
    fitted = fit_model(algorithm, PARAMS[algorithm], data, seed=0)
    classifier = _convert_ensemble(fitted, len(encoding.features))
    rewritten = copy.deepcopy(classifier)
    binary_classifier_as_margin(rewritten)
    assert [n.op_type for n in rewritten.graph.node].count("TreeEnsembleClassifier") == 0
    assert [o.name for o in rewritten.graph.output] == [o.name for o in classifier.graph.output]

    x = encoding.matrix(split.holdout).astype(np.float32)

    def run(model):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"features": x})

    (label_before, proba_before), (label_after, proba_after) = run(classifier), run(rewritten)
    np.testing.assert_allclose(proba_after, proba_before, atol=1e-6)
    np.testing.assert_array_equal(label_after, (proba_after[:, 1] >= 0.5).astype(label_after.dtype))
    assert label_after.shape == label_before.shape
