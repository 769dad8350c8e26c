"""The scoring forms of a new version, built and verified at registration.

Beside the ONNX tree-kernel form (already parity-checked by ``tasks.export``), a version
gets its native booster, its tensor-op form and (XGBoost) its compiled form. Each is scored
on the parity rows and compared with the native model (the same limit as the ONNX gate: max
|diff| <= 1e-5 and no label flips; the compiled form, which promises XGBoost's scores bit
for bit, must be equal on every row); a form that fails is left out, with the reason, and
never blocks registration. Each form is then timed on the same rows (1 thread) so that
``--engine auto`` can pick the fastest (:mod:`driftloop.forms`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import version as package_version
from typing import Any

import polars as pl
from prefect import task
from prefect.cache_policies import NONE

from driftloop.features import FeatureEncoding
from driftloop.forms import (
    FormKind,
    FormRecord,
    FormScorer,
    compiled_scorer,
    native_scorer,
    onnx_scorer,
    rows_per_second,
    tensor_scorer,
)
from driftloop.onnx_model import load_model
from driftloop.spec import DatasetSpec
from driftloop.storage import ArtifactStore
from driftloop.tasks.export import compare_scores, native_scores, parity_rows
from driftloop.tasks.fit import FittedModel

logger = logging.getLogger(__name__)

TIMING_ROWS = 20_000  # enough rows for a stable speed, few enough to keep registration quick
_EXTENSIONS = {"onnx": "onnx", "tensor": "onnx", "native": "model", "compiled": "trees"}


@dataclass
class BuiltForm:
    kind: FormKind
    data: bytes
    parity_rows: int
    parity_max_abs_diff: float
    parity_flips: int
    rows_per_s: float
    library: str | None

    def record(self, uri: str, sha256: str) -> FormRecord:
        return FormRecord(kind=self.kind, uri=uri, sha256=sha256, parity_rows=self.parity_rows,
                          parity_max_abs_diff=self.parity_max_abs_diff, parity_flips=self.parity_flips,
                          rows_per_s=self.rows_per_s, library=self.library)


@dataclass
class FormsBuilt:
    forms: list[BuiltForm]
    skipped: dict[str, str]  # form kind -> why it is not registered


def native_form_bytes(fitted: FittedModel) -> bytes:
    """The booster in its library's own format: XGBoost UBJSON, LightGBM's model text."""
    if fitted.algorithm == "xgboost":
        return bytes(fitted.booster.save_raw(raw_format="ubj"))
    return fitted.booster.model_to_string().encode("utf-8")


def compiled_form_bytes(fitted: FittedModel) -> tuple[bytes | None, str | None]:
    """The compiled form's bytes (XGBoost, where numba is installed), or why there is none."""
    from driftloop.compiled_trees import CompiledFormUnsupported, CompiledTrees

    if fitted.algorithm != "xgboost":
        return None, "the compiled form runs XGBoost models only"
    try:
        from driftloop import compiled_kernels  # noqa: F401 - built only where it can run (numba)

        return CompiledTrees.from_xgboost(fitted.booster).to_bytes(), None
    except CompiledFormUnsupported as exc:
        return None, f"the compiled form does not run this model: {exc}"
    except ImportError:
        return None, "numba is not installed here (pip install 'driftloop[train]')"


def _verified(kind: FormKind, data: bytes, scorer: FormScorer, native: Any, frame: pl.DataFrame, task_kind: str,
              library: str | None) -> tuple[BuiltForm | None, str | None]:
    report = compare_scores(native, scorer.predict(frame), task_kind)
    if not report.passed:
        return None, f"parity failed: max |native - {kind}| = {report.max_abs_diff:.3g}, {report.label_flips} label flips"
    if kind == "compiled" and report.max_abs_diff != 0:
        return None, f"not bit for bit: max |native - compiled| = {report.max_abs_diff:.3g} (the compiled form must be equal)"
    speed = rows_per_second(scorer.predict, frame.head(TIMING_ROWS))
    return BuiltForm(kind, data, report.rows, report.max_abs_diff, report.label_flips, speed, library), None


def build_forms(fitted: FittedModel, encoding: FeatureEncoding, spec: DatasetSpec, onnx_bytes: bytes,
                frame: pl.DataFrame) -> FormsBuilt:
    """Every form of the model, verified against the native model on ``frame`` (the
    parity rows) and timed on its first rows."""
    from driftloop.tasks.export_tensor import TensorFormUnsupported, build_tensor_onnx

    native = native_scores(fitted, encoding.matrix(frame), spec.task)
    descriptor = load_model(onnx_bytes, threads=1)
    library = f"{fitted.algorithm} {package_version(fitted.algorithm)}"
    built: list[BuiltForm] = []
    skipped: dict[str, str] = {}

    candidates: list[tuple[FormKind, bytes | None, str | None]] = [("onnx", onnx_bytes, None), ("native", native_form_bytes(fitted), library)]
    try:
        metadata = {k: v for k, v in descriptor.metadata.items() if k not in ("task", "algorithm", "inputs", "encoding", "score_output")}
        candidates.append(("tensor", build_tensor_onnx(fitted, encoding, spec, metadata), None))
    except TensorFormUnsupported as exc:
        skipped["tensor"] = str(exc)
    compiled, why_not = compiled_form_bytes(fitted)
    if compiled is None:
        skipped["compiled"] = str(why_not)
    else:
        candidates.append(("compiled", compiled, f"numba {package_version('numba')}"))
    for kind, data, lib in candidates:
        assert data is not None
        if kind == "onnx":
            scorer = onnx_scorer(descriptor)
        elif kind == "native":
            scorer = native_scorer(descriptor, data, threads=1)
        elif kind == "compiled":
            scorer = compiled_scorer(descriptor, data, threads=1)
        else:
            scorer = tensor_scorer(descriptor, data, threads=1, device="cpu")
        form, why = _verified(kind, data, scorer, native, frame, spec.task, lib)
        if form is None:
            skipped[kind] = str(why)
            logger.warning("%s form of %s not registered: %s", kind, spec.name, why)
        else:
            built.append(form)
    if not any(f.kind == "onnx" for f in built):
        raise RuntimeError(f"the ONNX form of {spec.name} passed the parity gate but not the forms check: {skipped.get('onnx')}")
    return FormsBuilt(built, skipped)


def store_forms(store: ArtifactStore, model_name: str, built: FormsBuilt) -> list[FormRecord]:
    """Each form under its sha256 (immutable; identical bytes share one file)."""
    import hashlib

    records = []
    for form in built.forms:
        digest = hashlib.sha256(form.data).hexdigest()
        relpath = f"models/{model_name}/{form.kind}/{digest}.{_EXTENSIONS[form.kind]}"
        uri = store.uri(relpath) if store.exists(relpath) else store.write_bytes(relpath, form.data)
        records.append(form.record(uri, digest))
    return records


@task(name="scoring-forms", cache_policy=NONE)
def forms_task(fitted: FittedModel, encoding: FeatureEncoding, spec: DatasetSpec, onnx_bytes: bytes, train: pl.DataFrame,
               holdout: pl.DataFrame, min_rows: int, seed: int, store: ArtifactStore) -> list[FormRecord]:
    rows = parity_rows(train, holdout, list(encoding.features), rows=min_rows, seed=seed)
    built = build_forms(fitted, encoding, spec, onnx_bytes, rows)
    for kind, why in built.skipped.items():
        logger.warning("%s: no %s form: %s", spec.name, kind, why)
    return store_forms(store, spec.name, built)
