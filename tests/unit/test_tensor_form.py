"""The tensor-op ONNX form (``tasks.export_tensor``): the same scores as the native
booster, missing values and zeros included, with standard ONNX ops only."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import onnx
import polars as pl
import pytest

from driftloop.features import fit_encoding, target_vector
from driftloop.onnx_model import artifact_metadata, load_model, predict_scores
from driftloop.spec import DatasetSpec, load_spec, parse_spec
from driftloop.tasks.export import build_onnx, check_parity
from driftloop.tasks.export_tensor import (
    TensorFormUnsupported,
    build_tensor_onnx,
    ensemble_of,
    tensor_model,
)
from driftloop.tasks.fit import (
    FittedModel,
    fit_model,
    prepare_training_data,
    round_lightgbm_thresholds,
)
from driftloop.tasks.split import split_dataset
from tests.support.data import make_loans, write_spec

FEATURES = [f"f{i}" for i in range(6)]
TRAIN_ROWS = 8_000
SCORE_ROWS = 30_000

# Standard ONNX ops only: what every execution provider implements.
STANDARD_OPS = {
    "Concat", "Gather", "GatherElements", "GreaterOrEqual", "Greater", "LessOrEqual", "Equal", "IsNaN", "Or",
    "Cast", "Add", "Mul", "Sub", "ReduceSum", "Sigmoid", "Abs", "Where", "Identity", "Reshape", "Shape",
    "Expand",
}


def make_spec(task: str) -> DatasetSpec:
    columns = {"id": {"dtype": "int"}, **{f: {"dtype": "float", "nullable": True} for f in FEATURES},
               "y": {"dtype": "int" if task == "binary_classification" else "float"}}
    return parse_spec({"name": f"tensor_{task}", "task": task, "target": "y", "id": "id", "columns": columns,
                       "features": FEATURES}, source="test_tensor_form")


def make_frame(n: int, seed: int, task: str, *, score_time: bool) -> pl.DataFrame:
    """Features with missing values (20% in f0..f3, and its being missing matters to the
    target), f4 with many exact zeros; f5 has no missing values at training time, so
    LightGBM's nodes on it get missing_type None, and some at scoring time."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, len(FEATURES))).astype(np.float32)
    x[:, 4] = np.where(rng.random(n) < 0.3, 0.0, x[:, 4])
    missing = rng.random((n, len(FEATURES))) < 0.2
    missing[:, 5] = score_time & (rng.random(n) < 0.2)
    x[missing] = np.nan
    z = np.nan_to_num(x)
    signal = z[:, 0] + 1.5 * np.isnan(x[:, 1]) - z[:, 2] * z[:, 3] + (x[:, 4] == 0) + 0.8 * z[:, 5] - 0.5
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-signal))).astype(np.int64) if task == "binary_classification" \
        else (10.0 * signal + rng.standard_normal(n)).astype(np.float64)
    frame = pl.DataFrame({"id": np.arange(n), **{f: x[:, i] for i, f in enumerate(FEATURES)}, "y": y})
    return frame.with_columns(pl.col(FEATURES).fill_nan(None))  # nulls, as validated rows carry them


@cache  # models are read, never changed, by the tests
def train(algorithm: str, task: str, *, trees: int = 40, **extra: object) -> tuple[DatasetSpec, FittedModel, object]:
    spec = make_spec(task)
    frame = make_frame(TRAIN_ROWS, 1, task, score_time=False)
    encoding = fit_encoding(spec, frame)
    x, y = encoding.matrix(frame), target_vector(spec, frame)
    binary = task == "binary_classification"
    if algorithm == "xgboost":
        import xgboost as xgb

        params = {"objective": "binary:logistic" if binary else "reg:squarederror", "max_depth": 5,
                  "learning_rate": 0.3, "nthread": 1, "seed": 0, **extra}
        booster = xgb.train(params, xgb.DMatrix(x, label=y), num_boost_round=trees)
    else:
        import lightgbm as lgb

        params = {"objective": "binary" if binary else "regression", "num_leaves": 31, "max_depth": 10, "learning_rate": 0.3,
                  "num_threads": 1, "seed": 0, "verbose": -1, **extra}
        raw = lgb.train(params, lgb.Dataset(x, label=y), num_boost_round=trees)
        booster = round_lightgbm_thresholds(raw.model_to_string())
    return spec, FittedModel(algorithm, booster, params, trees, float("nan")), encoding  # type: ignore[arg-type]


@cache
def score_rows(task: str) -> pl.DataFrame:
    return make_frame(SCORE_ROWS, 2, task, score_time=True)


@pytest.mark.parametrize("layout", ["perfect", "compact"])
@pytest.mark.parametrize("task", ["binary_classification", "regression"])
@pytest.mark.parametrize("algorithm", ["xgboost", "lightgbm"])
def test_matches_native_with_missing_values(algorithm: str, task: str, layout: str) -> None:
    spec, fitted, encoding = train(algorithm, task)
    rows = score_rows(task)
    assert rows.select(pl.col(FEATURES).null_count()).to_numpy().min() > 1000  # every feature has missing rows
    tensor = build_tensor_onnx(fitted, encoding, spec, {"model": spec.name}, layout=layout)  # type: ignore[arg-type]
    report = check_parity(fitted, encoding, tensor, rows, task)  # type: ignore[arg-type]
    assert report.passed, report.summary()
    assert report.max_abs_diff <= 1e-5 and report.label_flips == 0
    assert load_model(tensor).metadata["tensor_layout"] == layout


@pytest.mark.parametrize("algorithm", ["xgboost", "lightgbm"])
def test_missing_values_reach_every_kind_of_node(algorithm: str) -> None:
    """Both default directions are used (XGBoost), and LightGBM's None (never missing in
    training) and NaN missing types both appear: the parity above covers each."""
    spec, fitted, _encoding = train(algorithm, "binary_classification")
    ensemble = ensemble_of(fitted, spec.task, spec.name)
    internal = np.concatenate([t.missing_left[t.left >= 0] for t in ensemble.trees])
    assert internal.any() and not internal.all()
    if algorithm == "lightgbm":
        dump = fitted.booster.dump_model()
        kinds: set[str] = set()

        def walk(node: dict) -> None:
            if "split_feature" in node:
                kinds.add(node["missing_type"])
                walk(node["left_child"])
                walk(node["right_child"])

        for tree in dump["tree_info"]:
            walk(tree["tree_structure"])
        assert {"None", "NaN"} <= kinds


def test_lightgbm_zero_as_missing() -> None:
    """missing_type Zero: 0 and NaN take the default side (f4 is 0 in 30% of rows)."""
    spec, fitted, encoding = train("lightgbm", "binary_classification", zero_as_missing=True)
    zero_nodes = sum(int(t.zero_is_missing.sum()) for t in ensemble_of(fitted, spec.task, spec.name).trees)
    assert zero_nodes > 0
    tensor = build_tensor_onnx(fitted, encoding, spec, {})  # type: ignore[arg-type]
    report = check_parity(fitted, encoding, tensor, score_rows(spec.task), spec.task)  # type: ignore[arg-type]
    assert report.passed, report.summary()


def test_xgboost_base_score_is_a_probability() -> None:
    """XGBoost 2.x stores base_score for binary:logistic as a probability: it enters the
    sum as its logit. With few shallow trees, a wrong base margin shows at once."""
    spec, fitted, encoding = train("xgboost", "binary_classification", trees=3, base_score=0.2, max_depth=2)
    assert ensemble_of(fitted, spec.task, spec.name).base_margin == pytest.approx(np.log(0.2 / 0.8), abs=1e-6)
    tensor = build_tensor_onnx(fitted, encoding, spec, {})  # type: ignore[arg-type]
    report = check_parity(fitted, encoding, tensor, score_rows(spec.task), spec.task)  # type: ignore[arg-type]
    assert report.passed, report.summary()


@pytest.mark.parametrize("algorithm", ["xgboost", "lightgbm"])
def test_values_equal_to_a_threshold(algorithm: str) -> None:
    """x == t goes right in XGBoost (x < t goes left) and left in LightGBM (x <= t): rows
    that sit exactly on every split threshold of the model, one split per row."""
    spec, fitted, encoding = train(algorithm, "binary_classification")
    splits = {
        (int(tree.feature[n]), float(tree.threshold[n]))
        for tree in ensemble_of(fitted, spec.task, spec.name).trees for n in np.flatnonzero(tree.left >= 0)
    }
    base = score_rows(spec.task)
    x = encoding.matrix(base.head(len(splits)))
    for row, (feature, threshold) in enumerate(sorted(splits)):
        x[row, feature] = threshold
    rows = pl.DataFrame({f: x[:, i] for i, f in enumerate(FEATURES)}).with_columns(pl.col(FEATURES).fill_nan(None))
    tensor = build_tensor_onnx(fitted, encoding, spec, {})  # type: ignore[arg-type]
    report = check_parity(fitted, encoding, tensor, rows, spec.task)  # type: ignore[arg-type]
    assert report.passed, report.summary()

    wrong = ensemble_of(fitted, spec.task, spec.name)
    wrong.left_if = "less_equal" if wrong.left_if == "less" else "less"
    wrong_report = check_parity(fitted, encoding, tensor_model(wrong, encoding, spec, {}), rows, spec.task)  # type: ignore[arg-type]
    assert wrong_report.max_abs_diff > 1e-3


@pytest.mark.parametrize("algorithm", ["xgboost", "lightgbm"])
def test_a_wrong_missing_direction_is_caught(algorithm: str) -> None:
    """The parity rows do exercise missing values: send every missing value the wrong
    way and the check fails."""
    spec, fitted, encoding = train(algorithm, "binary_classification")
    ensemble = ensemble_of(fitted, spec.task, spec.name)
    for tree in ensemble.trees:
        tree.missing_left = ~tree.missing_left
    wrong = tensor_model(ensemble, encoding, spec, {})  # type: ignore[arg-type]
    report = check_parity(fitted, encoding, wrong, score_rows(spec.task), spec.task)  # type: ignore[arg-type]
    assert not report.passed and report.label_flips > 0


def test_same_contract_as_the_tree_kernel_form_and_standard_ops_only() -> None:
    """Same inputs, output and metadata as build_onnx; no ai.onnx.ml op; the graph's size
    does not grow with the number of trees."""
    spec, fitted, encoding = train("xgboost", "binary_classification")
    metadata = {"model": spec.name, "classes": None}
    kernel = load_model(build_onnx(fitted, encoding, spec, metadata))  # type: ignore[arg-type]
    tensor_bytes = build_tensor_onnx(fitted, encoding, spec, metadata)  # type: ignore[arg-type]
    tensor = load_model(tensor_bytes)
    assert tensor.inputs == kernel.inputs
    assert tensor.metadata["score_output"] == kernel.metadata["score_output"]
    assert {k: v for k, v in tensor.metadata.items() if k not in ("form", "tensor_layout", "trees", "depth")} \
        == kernel.metadata
    rows = score_rows(spec.task)
    np.testing.assert_allclose(predict_scores(tensor, rows), predict_scores(kernel, rows), atol=1e-6)

    graph = onnx.load_from_string(tensor_bytes).graph
    assert {n.op_type for n in graph.node} <= STANDARD_OPS
    assert all(n.domain in ("", "ai.onnx") for n in graph.node)
    spec_more, more_trees, encoding_more = train("xgboost", "binary_classification", trees=120)
    bigger = onnx.load_from_string(build_tensor_onnx(more_trees, encoding_more, spec_more, {})).graph  # type: ignore[arg-type]
    assert len(bigger.node) == len(graph.node)



def test_both_forms_carry_the_one_metadata_builders_output() -> None:
    """Both forms' metadata is ``artifact_metadata``'s, for the same model: equal apart
    from what the tensor form adds about itself."""
    spec, fitted, encoding = train("lightgbm", "binary_classification")
    metadata = {"model": spec.name, "classes": None}
    common = artifact_metadata(metadata, task=spec.task, algorithm=fitted.algorithm, encoding=encoding,
                               score_output="probabilities")
    kernel = load_model(build_onnx(fitted, encoding, spec, metadata))  # type: ignore[arg-type]
    tensor = load_model(build_tensor_onnx(fitted, encoding, spec, metadata, layout="compact"))  # type: ignore[arg-type]
    assert kernel.metadata == common
    form = {k: tensor.metadata[k] for k in ("form", "tensor_layout", "trees", "depth")}
    assert form["form"] == "tensor" and form["tensor_layout"] == "compact"
    assert tensor.metadata == artifact_metadata(metadata, task=spec.task, algorithm=fitted.algorithm,
                                                encoding=encoding, score_output="probabilities", **form)

@pytest.mark.parametrize("algorithm", ["xgboost", "lightgbm"])
def test_categorical_features_through_fit_model(tmp_path: Path, algorithm: str) -> None:
    """The project's own training path (early stopping, sliced booster, LightGBM rounding)
    on the loans data: a categorical feature (LabelEncoder in the graph, unseen -> NaN) and
    a nullable one."""
    spec = load_spec(write_spec(tmp_path))
    split = split_dataset(make_loans(6_000, seed=3), spec, seed=0)
    data, encoding, _classes = prepare_training_data(spec, split.train, split.valid)
    params = {"xgboost": {"max_depth": 6, "learning_rate": 0.2}, "lightgbm": {"num_leaves": 31, "learning_rate": 0.2}}
    fitted = fit_model(algorithm, params[algorithm], data, seed=0)  # type: ignore[arg-type]
    tensor = build_tensor_onnx(fitted, encoding, spec, {"model": spec.name})
    rows = pl.concat([split.holdout, split.holdout.with_columns(pl.lit("platinum").alias("band"),
                                                                  pl.lit(None, dtype=pl.Float64).alias("ratio"))])
    report = check_parity(fitted, encoding, tensor, rows, spec.task)
    assert report.passed, report.summary()
    domains = {n.domain for n in onnx.load_from_string(tensor).graph.node if n.op_type != "LabelEncoder"}
    assert domains <= {""}


def test_unsupported_models_are_refused_by_name() -> None:
    import lightgbm as lgb
    import xgboost as xgb

    spec = make_spec("binary_classification")
    frame = make_frame(2_000, 1, "binary_classification", score_time=False)
    encoding = fit_encoding(spec, frame)
    x = encoding.matrix(frame)
    y3 = np.arange(len(x)) % 3

    multiclass = xgb.train({"objective": "multi:softprob", "num_class": 3, "max_depth": 2}, xgb.DMatrix(x, label=y3), 2)
    with pytest.raises(TensorFormUnsupported, match=r"model tensor_binary_classification: .*multiclass"):
        build_tensor_onnx(FittedModel("xgboost", multiclass, {}, 2, 0.0), encoding, spec, {})

    # A LightGBM categorical split (the project encodes categories as numbers, but a
    # booster trained elsewhere may carry them).
    codes = np.floor(np.abs(np.nan_to_num(x[:, 0])) * 3).astype(np.float32)
    xc = np.column_stack([codes, x[:, 1:]])
    yc = (codes % 2).astype(int)
    booster = lgb.train({"objective": "binary", "verbose": -1, "min_data_per_group": 5, "cat_smooth": 1},
                        lgb.Dataset(xc, label=yc, categorical_feature=[0]), 3)
    with pytest.raises(TensorFormUnsupported, match=r"model tensor_binary_classification: .*categorical split"):
        build_tensor_onnx(FittedModel("lightgbm", booster, {}, 3, 0.0), encoding, spec, {})

    # The booster's objective must match the spec's task.
    regressor = xgb.train({"objective": "reg:squarederror", "max_depth": 2}, xgb.DMatrix(x, label=y3), 2)
    with pytest.raises(TensorFormUnsupported, match="reg:squarederror"):
        build_tensor_onnx(FittedModel("xgboost", regressor, {}, 2, 0.0), encoding, spec, {})
