"""The one scorer: run a driftloop ONNX artifact on validated rows.

An artifact takes one input per feature, named as in the spec: numeric and bool
features as float32 ``[N, 1]``, categorical ones as string ``[N, 1]`` (the category
encoding is inside the graph). Its metadata says how to read its outputs. Only
onnxruntime is needed here: edge devices import this without training libraries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import polars as pl

METADATA_KEY = "driftloop"



def artifact_metadata(base: dict[str, Any], *, task: str, algorithm: str, encoding: Any, score_output: str,
                      **form: Any) -> dict[str, Any]:
    """The metadata every driftloop ONNX artifact carries under ``METADATA_KEY``, whatever
    its form: the caller's ``base`` (model name, classes, spec, ...), the task, algorithm,
    raw inputs and their encoding (a ``driftloop.features.FeatureEncoding``), the output
    to read, then what only this form adds (``form``: e.g. ``form="tensor"``). The one
    place the artifact's contract is written; ``load_model`` reads it back."""
    return {
        **base,
        "task": task,
        "algorithm": algorithm,
        "inputs": [[n, "string" if n in encoding.categories else "float"] for n in encoding.features],
        "encoding": encoding.to_dict(),
        "score_output": score_output,
        **form,
    }


def metadata_props(meta: dict[str, Any]) -> dict[str, str]:
    """``meta`` as the ONNX model properties ``load_model`` reads."""
    return {METADATA_KEY: json.dumps(meta, sort_keys=True)}

@dataclass
class LoadedModel:
    session: ort.InferenceSession
    metadata: dict[str, Any]

    @property
    def task(self) -> str:
        return str(self.metadata["task"])

    @property
    def classes(self) -> list[str] | None:
        return self.metadata.get("classes")

    def spec(self) -> Any:
        """The dataset spec the model was trained with (it travels inside the artifact)."""
        from driftloop.errors import DriftloopError
        from driftloop.spec import parse_spec

        if "spec" not in self.metadata:
            raise DriftloopError("the model artifact carries no dataset spec (made by an early build); train it again")
        return parse_spec(self.metadata["spec"], source="model artifact")

    @property
    def inputs(self) -> list[tuple[str, str]]:
        return [(name, kind) for name, kind in self.metadata["inputs"]]


def load_model(onnx_bytes: bytes, *, threads: int | None = None, providers: list[str] | None = None) -> LoadedModel:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the tree converters declare label shapes ORT warns about
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if threads != 1:
        # Spinning idle threads halved 2-thread throughput on shared 2-core machines.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(onnx_bytes, sess_options=options, providers=providers or ["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in meta:
        raise ValueError("not a driftloop ONNX artifact (no 'driftloop' metadata)")
    return LoadedModel(session, json.loads(meta[METADATA_KEY]))


def input_feed(model: LoadedModel, frame: pl.DataFrame) -> dict[str, np.ndarray]:
    feed = {}
    for name, kind in model.inputs:
        col = frame[name]
        if kind == "string":
            values = col.cast(pl.String).fill_null("").to_numpy().astype(object)
        else:
            values = col.cast(pl.Float32).fill_null(float("nan")).to_numpy().astype(np.float32, copy=False)
        feed[name] = values.reshape(-1, 1)
    return feed


def predict_scores(model: LoadedModel, frame: pl.DataFrame) -> np.ndarray:
    """P(class 1) for binary, the (n, k) probabilities for multiclass, the prediction for
    regression."""
    return run_feed(model, input_feed(model, frame))


def run_feed(model: LoadedModel, feed: dict[str, np.ndarray]) -> np.ndarray:
    """:func:`predict_scores` on a feed built beforehand (:func:`input_feed`)."""
    (out,) = model.session.run([model.metadata["score_output"]], feed)
    if model.task == "binary_classification":
        return np.asarray(out)[:, 1]
    if model.task == "regression":
        return np.asarray(out).reshape(-1)
    return np.asarray(out)
