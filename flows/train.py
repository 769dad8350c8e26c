"""Flow ``train``: split -> tune (XGBoost, LightGBM) -> fit best -> evaluate -> gate ->
export ONNX -> parity -> register -> reference, model card -> promote when the gate
passes. The retrain flow runs the same steps (``train_and_register``) on its window."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

import polars as pl
from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from pydantic import BaseModel, Field

from driftloop.errors import DriftloopError
from driftloop.feedback import WindowRecord
from driftloop.flows.config import run_settings
from driftloop.flows.ingest import ingest, load_spec_task
from driftloop.metrics import undefined_metrics
from driftloop.naming import artifact_key
from driftloop.registry import DatasetRecord, VersionDraft, open_registry
from driftloop.settings import Settings
from driftloop.spec import DatasetSpec
from driftloop.storage import ArtifactStore
from driftloop.tasks.evaluate import evaluate_champion_task, evaluate_task, same_predictions_task
from driftloop.tasks.export import ParityReport, export_task, native_scores, parity_task
from driftloop.tasks.fit import check_device
from driftloop.tasks.form_builder import forms_task
from driftloop.tasks.gate import GateDecision, gate_task
from driftloop.tasks.ingest import load_dataset_task
from driftloop.tasks.register import (
    card_headline,
    library_versions,
    model_card_task,
    register_task,
    render_model_card,
    settle_aliases_task,
    store_onnx_task,
    store_reference_task,
)
from driftloop.tasks.score import fetch_verified
from driftloop.tasks.search_space import ALGORITHMS
from driftloop.tasks.split import split_task
from driftloop.tasks.study import tuning_storage
from driftloop.tasks.tune import fit_task, prepare_task, tune_task

Algorithm = Literal["xgboost", "lightgbm"]


class ParityFailed(DriftloopError):
    """The ONNX artifact does not reproduce the native model; registration is blocked."""


class TrainOptions(BaseModel):
    """How to tune and what to do with the result (shared by train and retrain). Built by
    the flows, never a flow parameter itself: ``trigger`` is set by the flow that trains
    (train: manual, retrain: retrain), so a run cannot mislabel its lineage; the parity
    gate's row count is the worker's setting (``DRIFTLOOP_PARITY_MIN_ROWS``)."""

    trials: int = 20
    algorithms: list[Algorithm] = list(ALGORITHMS)
    seed: int = 0
    timeout_s: float | None = None
    study_name: str | None = None
    promote: bool = True
    trigger: Literal["manual", "retrain"] = "manual"
    tuning_workers: int = Field(
        default=1, description="Tuning processes sharing one Optuna study; more than 1 needs PostgreSQL.")
    dask_address: str | None = Field(
        default=None, description="Run the tuning workers on this Dask scheduler (tcp://host:8786), "
        "not as local processes.")


class TrainResult(BaseModel):
    model: str
    version: int
    algorithm: str
    metrics: dict[str, float]
    gate: GateDecision
    parity: ParityReport
    onnx_uri: str
    onnx_sha256: str
    promoted: bool
    candidate: bool = False  # the gate passed under a shadow policy: candidate, scoring in shadow
    card_uri: str | None
    headline: str
    window: WindowRecord | None = None
    # Metrics without a value on the holdout (NaN in ``metrics``, null in JSON), with the reason.
    undefined_metrics: dict[str, str] = Field(default_factory=dict)


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
    registry_block: str | None = None,
    tuning_workers: int = 1,
    dask_address: str | None = None,
) -> TrainResult:
    """Train a model for the spec at ``spec_path`` on a registered dataset
    (``dataset_id``) or on ``source``, ingested first. Studies are named
    ``<model>-<algorithm>-<study_name or this run's id>``: pass the same ``study_name`` to
    several runs to tune one study together. ``tuning_workers`` > 1 tunes in that many
    processes (on the Dask cluster at ``dask_address``, or ``DRIFTLOOP_DASK_ADDRESS``, if
    set) sharing one study in PostgreSQL, with an exact total of ``trials`` per algorithm."""
    if (dataset_id is None) == (source is None):
        raise DriftloopError("give exactly one of dataset_id or source")
    options = TrainOptions(trials=trials, algorithms=algorithms, seed=seed, timeout_s=timeout_s, study_name=study_name,
                           promote=promote, tuning_workers=tuning_workers, dask_address=dask_address)
    settings = run_settings(registry_block)
    check_device(settings.device)  # before any training starts
    _study_storage(settings, options)  # as early: SQLite with several workers is refused
    registry = open_registry(settings.registry_database_url())
    spec = load_spec_task(spec_path)
    if source is not None:
        dataset_id = ingest(spec_path=spec_path, source=source, registry_block=registry_block).dataset_id
    dataset, frame = load_dataset_task(registry, dataset_id)
    return train_and_register(spec, dataset, frame, settings, options)


def train_and_register(
    spec: DatasetSpec, dataset: DatasetRecord, frame: pl.DataFrame, settings: Settings, options: TrainOptions, *,
    window: WindowRecord | None = None, min_improvement: float | None = None,
) -> TrainResult:
    """The training steps, wired inside the calling flow run (train or retrain):
    split -> tune -> fit -> evaluate -> gate against the champion on the same holdout ->
    export -> parity -> register as challenger -> reference and model card -> promote
    (only if the champion is still the one judged against)."""
    if not options.algorithms:
        raise DriftloopError("give at least one algorithm (xgboost, lightgbm)")
    logger = get_run_logger()
    check_device(settings.device)
    store = ArtifactStore(settings.artifact_root_uri())
    registry = open_registry(settings.registry_database_url())

    split = split_task(frame, spec, options.seed)
    data, encoding, classes = prepare_task(spec, split.train, split.valid)
    run_key = options.study_name or str(runtime.flow_run.id or "local")
    storage = _study_storage(settings, options)
    # Several workers go to the Dask cluster given, or configured (DRIFTLOOP_DASK_ADDRESS).
    dask_address = (options.dask_address or settings.dask_address) if options.tuning_workers > 1 else None
    fitted_models = []
    for algorithm in dict.fromkeys(options.algorithms):
        study = f"{spec.name}-{algorithm}-{run_key}"
        # Dask workers may be on other machines: the data goes through the artifact store.
        data_uri = store.uri(f"tuning/{study}") if dask_address else None
        tuned = tune_task(
            algorithm, data, study, storage, options.trials, options.timeout_s, options.seed, settings.device,
            options.tuning_workers, dask_address, data_uri,
        )
        logger.info("%s: best validation loss %.5f after %d trials", algorithm, tuned.best_value, tuned.trials_run)
        fitted_models.append(fit_task(algorithm, tuned.best_params, data, options.seed, settings.device))
    best = min(fitted_models, key=lambda f: f.valid_loss)

    holdout_scores = predict_native_task(best, encoding, split.holdout, spec.task)
    metrics, segments = evaluate_task(spec, split.holdout, holdout_scores, classes)
    onnx_bytes = export_task(best, encoding, spec, {
        "model": spec.name, "spec": spec.model_dump(mode="json"), "spec_hash": spec.fingerprint(),
        "dataset_id": dataset.id, "classes": list(classes) if classes else None,
    })
    parity_rows = settings.parity_min_rows
    parity = parity_task(best, encoding, onnx_bytes, split.train, split.holdout, spec.task, parity_rows, options.seed)
    if not parity.passed:
        create_markdown_artifact(key=artifact_key("parity", spec.name), markdown=f"# ONNX parity failed\n\n{parity.summary()}")
        raise ParityFailed(
            f"ONNX export of {spec.name} ({best.algorithm}) does not match the native model: {parity.summary()}; "
            "registration blocked"
        )
    onnx_uri, onnx_sha256 = store_onnx_task(store, spec.name, onnx_bytes)
    # The native booster and the tensor-op form beside it, each verified and timed.
    forms = forms_task(best, encoding, spec, onnx_bytes, split.train, split.holdout, parity_rows,
                       options.seed, store)

    # The champion is judged on the challenger's holdout: the newest rows of its data.
    champion = registry.find_alias(spec.name, "champion")
    champion_metrics, clone = None, False
    if champion is not None:
        champion_onnx = fetch_verified(champion.onnx_uri, champion.onnx_sha256)
        champion_metrics = evaluate_champion_task(spec, champion_onnx, split.holdout, classes)
        clone = same_predictions_task(champion_onnx, onnx_bytes, split.holdout)
    decision = gate_task(
        metrics, spec.gate, spec.gate_metric, champion_metrics, champion.version if champion else None,
        min_improvement if champion is not None else None, clone,
    )

    draft = VersionDraft(
        model_name=spec.name, algorithm=best.algorithm, task=spec.task,
        params=best.params | {"n_rounds": best.best_iteration}, metrics=metrics, segment_metrics=segments,
        seed=options.seed, dataset_id=dataset.id, dataset_hash=dataset.content_hash, spec_hash=spec.fingerprint(),
        split=split.boundaries, library_versions=library_versions(), gate=decision.model_dump(),
        parity=asdict(parity), trigger=options.trigger, window=window.model_dump() if window else None,
        onnx_uri=onnx_uri, onnx_sha256=onnx_sha256, forms=[f.model_dump() for f in forms],
    )
    actor = f"flow {runtime.flow_run.flow_name or 'train'}/{runtime.flow_run.name or 'local'}"
    # No alias points at the version until its reference and card are written: a crash
    # in between leaves an unaliased version, never a champion without its reference.
    record = register_task(registry, draft)
    store_reference_task(registry, store, record, spec, split.holdout, onnx_bytes)
    # With a shadow policy a passing version competes with a champion as ``candidate``.
    shadow = champion is not None and spec.rollout is not None and spec.rollout.shadow is not None
    will_promote = options.promote and decision.passed
    record = model_card_task(registry, store, record, will_promote and not shadow, will_promote and shadow)
    promoted, refused = settle_aliases_task(registry, record, will_promote, champion.version if champion else None, actor,
                                            shadow)
    if refused:
        logger.warning("not promoted: %s", refused)
        record = model_card_task(registry, store, record, False)
    return _report(record, spec, decision, parity, metrics, promoted, window, candidate=will_promote and shadow)


def _study_storage(settings: Settings, options: TrainOptions) -> str:
    if options.dask_address and options.tuning_workers < 2:
        raise DriftloopError(
            f"dask_address {options.dask_address} is where tuning workers run, but tuning_workers is "
            f"{options.tuning_workers}: set tuning_workers (--tuning-workers) to 2 or more, or drop dask_address"
        )
    optuna = settings.optuna_storage.get_secret_value() if settings.optuna_storage else None
    return tuning_storage(settings.registry_database_url(), optuna, options.tuning_workers)


def _report(record: Any, spec: DatasetSpec, decision: GateDecision, parity: ParityReport, metrics: dict[str, float],
            promoted: bool, window: WindowRecord | None, *, candidate: bool = False) -> TrainResult:
    """Log, leave the model card and metrics on the flow run, and return the result."""
    headline = card_headline(record, promoted=promoted, candidate=candidate)
    get_run_logger().info("%s; gate: %s", headline, "; ".join(decision.reasons))
    create_markdown_artifact(key=artifact_key("model-card", spec.name), markdown=render_model_card(record, promoted=promoted, candidate=candidate), description=headline)
    undefined = undefined_metrics(metrics)
    create_table_artifact(
        key=artifact_key("metrics", spec.name),
        table=[{"metric": k, "value": None if k in undefined else round(v, 6), "note": undefined.get(k, "")}
               for k, v in metrics.items()],
        description=f"Holdout metrics of {record.ref}",
    )
    return TrainResult(
        model=record.model_name, version=record.version, algorithm=record.algorithm, metrics=metrics, gate=decision,
        parity=parity, onnx_uri=record.onnx_uri, onnx_sha256=record.onnx_sha256, promoted=promoted,
        card_uri=record.card_uri, headline=headline, window=window, undefined_metrics=undefined, candidate=candidate,
    )
