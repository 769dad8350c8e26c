"""ONNX export with the feature encoding inside the graph, and the parity gate.

Design: the artifact scores raw validated rows. Each categorical feature goes through an
``ai.onnx.ml.LabelEncoder`` (level -> index, unseen -> NaN), numeric ones pass through,
a ``Concat`` builds the matrix the tree ensemble was trained on. No sidecar to keep in
step with the model: the sha256 of the .onnx covers everything.

LightGBM boosters arrive with float32-exact thresholds (``tasks.fit.fit_model`` rounds
them), so the float32 comparisons of ONNX make the same decisions as native LightGBM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
from prefect import task
from prefect.cache_policies import NONE

from driftloop.features import FeatureEncoding
from driftloop.onnx_model import artifact_metadata, load_model, metadata_props, predict_scores
from driftloop.spec import DatasetSpec
from driftloop.tasks.evaluate import predicted_labels
from driftloop.tasks.fit import FittedModel

TARGET_OPSET = 15
ML_OPSET = 3
PARITY_TOLERANCE = 1e-5
PARITY_MIN_ROWS = 100_000


@dataclass
class ParityReport:
    """``max_abs_diff``: the largest |native - onnx| over the rows (probabilities); for
    regression it is relative to max(1, |prediction|)."""

    rows: int
    max_abs_diff: float
    label_flips: int
    tolerance: float
    passed: bool

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"ONNX parity {verdict}: max |native - onnx| = {self.max_abs_diff:.3g} "
            f"(limit {self.tolerance:g}), {self.label_flips} label flips on {self.rows:,} rows"
        )


def native_scores(fitted: FittedModel, x: np.ndarray, task: str) -> np.ndarray:
    if fitted.algorithm == "xgboost":
        import xgboost as xgb

        out = fitted.booster.predict(xgb.DMatrix(x))
    else:
        out = fitted.booster.predict(x)
    return np.asarray(out)


def _convert_ensemble(fitted: FittedModel, n_features: int) -> Any:
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType

    initial = [("features", FloatTensorType([None, n_features]))]
    if fitted.algorithm == "xgboost":
        booster = fitted.booster.copy()
        booster.feature_names = None  # the converter wants f0..fN
        booster.feature_types = None
        return onnxmltools.convert_xgboost(booster, initial_types=initial, target_opset=TARGET_OPSET)
    return onnxmltools.convert_lightgbm(fitted.booster, initial_types=initial, zipmap=False, target_opset=TARGET_OPSET)


def binary_classifier_as_margin(model: Any) -> None:
    """Rewrite a binary ``TreeEnsembleClassifier`` (one margin, LOGISTIC) in place as
    ``TreeEnsembleRegressor`` (the margin) -> ``Sigmoid`` -> ``[1 - p, p]``.

    Same trees, thresholds and float32 arithmetic, so the same probabilities; ONNX
    Runtime's regressor kernel runs about 15% faster on these ensembles than its
    classifier kernel (bench/scoring.py, "experiments"). The label output becomes
    ``p >= 0.5``, the rule driftloop's predictions use. Anything else is left as it is.
    """
    from onnx import TensorProto, helper

    graph = model.graph
    found = [n for n in graph.node if n.op_type == "TreeEnsembleClassifier"]
    if len(found) != 1:
        return
    (node,) = found
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    one_margin = set(attrs.get("class_ids", [])) == {0} and len(attrs.get("classlabels_int64s", [])) == 2
    if not one_margin or attrs.get("post_transform") != b"LOGISTIC" or len(node.output) != 2:
        return
    label_out, proba_out = node.output
    tag = node.name or "trees"
    regressor = helper.make_node(
        "TreeEnsembleRegressor", list(node.input), [f"{tag}__margin"], domain="ai.onnx.ml", name=f"{tag}__regressor",
        n_targets=1, aggregate_function="SUM", post_transform="NONE",
        target_ids=[0] * len(attrs["class_ids"]), target_nodeids=attrs["class_nodeids"],
        target_treeids=attrs["class_treeids"], target_weights=attrs["class_weights"],
        **{k: v for k, v in attrs.items() if k.startswith("nodes_") or k == "base_values"},
    )
    constants = [
        helper.make_tensor(f"{tag}__one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor(f"{tag}__half", TensorProto.FLOAT, [], [0.5]),
    ]
    tail = [
        helper.make_node("Sigmoid", [f"{tag}__margin"], [f"{tag}__p"]),
        helper.make_node("Sub", [f"{tag}__one", f"{tag}__p"], [f"{tag}__q"]),
        helper.make_node("Concat", [f"{tag}__q", f"{tag}__p"], [proba_out], axis=1),
        # Ops that exist at opset 9 (the LightGBM converter's default domain version).
        helper.make_node("Less", [f"{tag}__p", f"{tag}__half"], [f"{tag}__negative"]),
        helper.make_node("Not", [f"{tag}__negative"], [f"{tag}__positive"]),
        helper.make_node("Cast", [f"{tag}__positive"], [f"{tag}__label"], to=TensorProto.INT64),
        helper.make_node("Reshape", [f"{tag}__label", f"{tag}__flat"], [label_out]),
    ]
    constants.append(helper.make_tensor(f"{tag}__flat", TensorProto.INT64, [1], [-1]))
    at = list(graph.node).index(node)
    graph.node.remove(node)
    for offset, new in enumerate([regressor, *tail]):
        graph.node.insert(at + offset, new)
    graph.initializer.extend(constants)


def encoding_nodes(encoding: FeatureEncoding) -> tuple[list[Any], list[Any], str]:
    """The raw-input contract every ONNX form shares: one ``[N, 1]`` input per feature
    (float, or string for a categorical one, encoded by ``LabelEncoder`` with unseen ->
    NaN), concatenated into the ``[N, F]`` float matrix named ``features``."""
    from onnx import TensorProto, helper

    nodes, inputs, columns = [], [], []
    for name in encoding.features:
        if name in encoding.categories:
            inputs.append(helper.make_tensor_value_info(name, TensorProto.STRING, [None, 1]))
            levels = list(encoding.categories[name])
            nodes.append(helper.make_node(
                "LabelEncoder", [name], [f"{name}__code"], domain="ai.onnx.ml",
                keys_strings=levels, values_floats=[float(i) for i in range(len(levels))],
                default_float=float("nan"), name=f"encode_{name}",
            ))
            columns.append(f"{name}__code")
        else:
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, 1]))
            columns.append(name)
    nodes.append(helper.make_node("Concat", columns, ["features"], axis=1, name="assemble_features"))
    return nodes, inputs, "features"


def build_onnx(fitted: FittedModel, encoding: FeatureEncoding, spec: DatasetSpec, metadata: dict[str, Any]) -> bytes:
    """The model as ONNX bytes: raw feature inputs -> encoding -> tree ensemble."""
    import onnx
    from onnx import helper

    model = _convert_ensemble(fitted, len(encoding.features))
    if spec.task == "binary_classification":
        binary_classifier_as_margin(model)
    graph = model.graph
    (features_input,) = [i for i in graph.input if i.name == "features"]
    graph.input.remove(features_input)

    pre_nodes, inputs, _ = encoding_nodes(encoding)

    graph.input.extend(inputs)
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(pre_nodes + existing)
    for opset in model.opset_import:
        if opset.domain == "ai.onnx.ml":
            opset.version = max(opset.version, ML_OPSET)
    domains = {o.domain for o in model.opset_import}
    if "ai.onnx.ml" not in domains:
        model.opset_import.append(helper.make_opsetid("ai.onnx.ml", ML_OPSET))
    if "" not in domains:  # Concat lives in the default domain
        model.opset_import.append(helper.make_opsetid("", TARGET_OPSET))

    outputs = [o.name for o in graph.output]
    score_output = "variable" if spec.task == "regression" else "probabilities"
    if score_output not in outputs:
        raise RuntimeError(f"converted {fitted.algorithm} model has outputs {outputs}, expected {score_output!r}")
    meta = artifact_metadata(metadata, task=spec.task, algorithm=fitted.algorithm, encoding=encoding,
                             score_output=score_output)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, metadata_props(meta))
    model.producer_name = "driftloop"
    onnx.checker.check_model(model)
    return model.SerializeToString()


def parity_rows(train: pl.DataFrame, holdout: pl.DataFrame, features: list[str], *, rows: int, seed: int) -> pl.DataFrame:
    """The holdout plus synthetic rows drawn column by column from the training values,
    so that combinations the holdout lacks exercise the trees too."""
    rng = np.random.default_rng(seed)
    n_synth = max(0, rows - holdout.height)
    synthetic = pl.DataFrame(
        {name: train[name].gather(rng.integers(0, train.height, n_synth)) for name in features}
    )
    return pl.concat([holdout.select(features), synthetic])


def check_parity(fitted: FittedModel, encoding: FeatureEncoding, onnx_bytes: bytes, frame: pl.DataFrame, task_kind: str) -> ParityReport:
    native = native_scores(fitted, encoding.matrix(frame), task_kind)
    return compare_scores(native, predict_scores(load_model(onnx_bytes), frame), task_kind)


def compare_scores(native: np.ndarray, exported: np.ndarray, task_kind: str) -> ParityReport:
    """How far another form's scores are from the native model's on the same rows."""
    if task_kind == "binary_classification" and native.ndim == 2:
        native = native[:, 1]
    abs_diff = np.abs(native.astype(np.float64) - exported.astype(np.float64))
    if task_kind == "regression":
        # float32 carries ~7 significant digits: compare relative to the prediction's size.
        abs_diff = abs_diff / np.maximum(1.0, np.abs(native.astype(np.float64)))
        flips = 0
    diff = float(abs_diff.max()) if len(native) else 0.0
    if task_kind != "regression":
        flips = int(np.sum(predicted_labels(task_kind, native) != predicted_labels(task_kind, exported)))  # type: ignore[arg-type]
    return ParityReport(len(native), diff, flips, PARITY_TOLERANCE, diff <= PARITY_TOLERANCE and flips == 0)


@task(name="export-onnx", cache_policy=NONE, task_run_name="export-onnx-{fitted.algorithm}")
def export_task(fitted: FittedModel, encoding: FeatureEncoding, spec: DatasetSpec, metadata: dict[str, Any]) -> bytes:
    return build_onnx(fitted, encoding, spec, metadata)


@task(name="parity", cache_policy=NONE)
def parity_task(fitted: FittedModel, encoding: FeatureEncoding, onnx_bytes: bytes, train: pl.DataFrame,
                holdout: pl.DataFrame, task_kind: str, min_rows: int, seed: int) -> ParityReport:
    rows = parity_rows(train, holdout, list(encoding.features), rows=min_rows, seed=seed)
    return check_parity(fitted, encoding, onnx_bytes, rows, task_kind)
