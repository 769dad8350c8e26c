"""Flow ``train``: split -> tune (XGBoost, LightGBM) -> fit best -> evaluate -> gate ->
export ONNX -> parity -> register (and promote when the gate passes)."""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from pydantic import BaseModel

from driftloop.errors import DriftloopError
from driftloop.registry import open_registry
from driftloop.storage import ArtifactStore, read_bytes
from flows.config import run_settings
from flows.ingest import ingest, load_spec_task
from tasks.evaluate import evaluate_champion_task, evaluate_task
from tasks.export import PARITY_MIN_ROWS, export_task, native_scores, parity_task
from tasks.gate import gate_task
from tasks.ingest import load_dataset_task
from tasks.register import (
    card_headline,
    library_versions,
    register_task,
    render_model_card,
    store_reference_task,
)
from tasks.split import split_task
from tasks.tune import ALGORITHMS, check_device, fit_task, prepare_task, tune_task

Algorithm = Literal["xgboost", "lightgbm"]


class ParityFailed(DriftloopError):
    """The ONNX artifact does not reproduce the native model; registration is blocked."""


class GateSummary(BaseModel):
    passed: bool
    reasons: list[str]


class ParitySummary(BaseModel):
    max_abs_diff: float
    label_flips: int
    rows: int


class TrainResult(BaseModel):
    model: str
    version: int
    algorithm: str
    metrics: dict[str, float]
    gate: GateSummary
    parity: ParitySummary
    onnx_uri: str
    onnx_sha256: str
    promoted: bool
    card_uri: str | None
    headline: str


@task(name="predict-native", cache_policy=NONE)
def predict_native_task(fitted: Any, encoding: Any, frame: Any, task_kind: str) -> Any:
    scores = native_scores(fitted, encoding.matrix(frame), task_kind)
    return scores[:, 1] if task_kind == "binary_classification" and scores.ndim == 2 else scores


@flow(name="train")
def train(
    spec_path: str,
    dataset_id: str | None = None,
    source: str | None = None,
    trials: int = 20,
    algorithms: list[Algorithm] = list(ALGORITHMS),  # noqa: B006 (pydantic copies it)
    seed: int = 0,
    timeout_s: float | None = None,
    study_name: str | None = None,
    promote: bool = True,
    parity_min_rows: int = PARITY_MIN_ROWS,
    trigger: str = "manual",
    registry_block: str | None = None,
) -> TrainResult:
    """Train a model for the spec at ``spec_path`` on a registered dataset
    (``dataset_id``) or on ``source``, ingested first. Studies are named
    ``<model>-<algorithm>-<study_name or this run's id>``: pass the same ``study_name`` to
    several runs to tune one study together."""
    if (dataset_id is None) == (source is None):
        raise DriftloopError("give exactly one of dataset_id or source")
    if not algorithms:
        raise DriftloopError("give at least one algorithm (xgboost, lightgbm)")
    logger = get_run_logger()
    settings = run_settings(registry_block)
    check_device(settings.device)  # before any training starts
    store = ArtifactStore(settings.artifact_root_uri())
    registry = open_registry(settings.registry_database_url())

    spec = load_spec_task(spec_path)
    if source is not None:
        dataset_id = ingest(spec_path=spec_path, source=source, registry_block=registry_block).dataset_id
    dataset, frame = load_dataset_task(registry, dataset_id)
    split = split_task(frame, spec, seed)
    data, encoding, classes = prepare_task(spec, split.train, split.valid)

    run_key = study_name or str(runtime.flow_run.id or "local")
    fitted_models = []
    for algorithm in dict.fromkeys(algorithms):
        tuned = tune_task(
            algorithm, data, f"{spec.name}-{algorithm}-{run_key}", settings.registry_database_url(),
            trials, timeout_s, seed, settings.device,
        )
        logger.info("%s: best validation loss %.5f after %d trials", algorithm, tuned.best_value, tuned.trials_run)
        fitted_models.append(fit_task(algorithm, tuned.best_params, data, seed, settings.device))
    best = min(fitted_models, key=lambda f: f.valid_loss)

    holdout_scores = predict_native_task(best, encoding, split.holdout, spec.task)
    metrics, segments = evaluate_task(spec, split.holdout, holdout_scores, classes)

    champion = registry.find_alias(spec.name, "champion")
    champion_metrics = None
    if champion is not None:
        champion_metrics = evaluate_champion_task(spec, read_bytes(champion.onnx_uri), split.holdout, classes)
    decision = gate_task(metrics, spec.gate, spec.gate_metric, champion_metrics, champion.version if champion else None)

    onnx_bytes = export_task(best, encoding, spec, {"model": spec.name, "spec": spec.model_dump(mode="json"), "spec_hash": spec.fingerprint(), "dataset_id": dataset.id, "classes": list(classes) if classes else None})
    parity = parity_task(best, encoding, onnx_bytes, split.train, split.holdout, spec.task, parity_min_rows, seed)
    if not parity["passed"]:
        create_markdown_artifact(key=f"parity-{spec.name}".replace("_", "-"), markdown=f"# ONNX parity failed\n\n{parity}")
        raise ParityFailed(
            f"ONNX export of {spec.name} ({best.algorithm}) does not match the native model: max |diff| "
            f"{parity['max_abs_diff']:.3g} (limit {parity['tolerance']:g}), {parity['label_flips']} label flips on "
            f"{parity['rows']} rows; registration blocked"
        )

    draft = {
        "model_name": spec.name, "algorithm": best.algorithm, "task": spec.task, "params": best.params | {"n_rounds": best.best_iteration},
        "metrics": metrics, "segment_metrics": segments, "seed": seed, "dataset_id": dataset.id,
        "dataset_hash": dataset.content_hash, "spec_hash": spec.fingerprint(), "split": split.boundaries,
        "library_versions": library_versions(), "gate": decision.model_dump(), "parity": parity,
        "trigger": trigger,
    }
    actor = f"flow train/{runtime.flow_run.name or 'local'}"
    record, promoted = register_task(registry, store, draft, onnx_bytes, promote, actor)
    store_reference_task(registry, store, record, spec, split.holdout, onnx_bytes)

    headline = card_headline(record, promoted=promoted)
    logger.info("%s; gate: %s", headline, "; ".join(decision.reasons))
    create_markdown_artifact(
        key=f"model-card-{spec.name}".replace("_", "-"),
        markdown=render_model_card(record, promoted=promoted),
        description=headline,
    )
    create_table_artifact(
        key=f"metrics-{spec.name}".replace("_", "-"),
        table=[{"metric": k, "value": round(v, 6)} for k, v in metrics.items()],
        description=f"Holdout metrics of {record.ref}",
    )
    return TrainResult(
        model=record.model_name, version=record.version, algorithm=record.algorithm, metrics=metrics,
        gate=GateSummary(passed=decision.passed, reasons=decision.reasons),
        parity=ParitySummary(max_abs_diff=parity["max_abs_diff"], label_flips=parity["label_flips"], rows=parity["rows"]),
        onnx_uri=record.onnx_uri, onnx_sha256=record.onnx_sha256, promoted=promoted, card_uri=record.card_uri,
        headline=headline,
    )
