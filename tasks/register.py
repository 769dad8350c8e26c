"""Registering a trained model: the ONNX artifact (content-addressed), the version
record, the aliases, and the model card."""

from __future__ import annotations

import hashlib
import platform
from importlib import metadata
from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from driftloop.registry import ModelVersionRecord, RegistryStore
from driftloop.storage import ArtifactStore

_LIBRARIES = ("driftloop", "xgboost", "lightgbm", "optuna", "onnxmltools", "onnx", "onnxruntime", "polars", "scikit-learn")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def store_onnx(store: ArtifactStore, model_name: str, onnx_bytes: bytes) -> tuple[str, str]:
    """Write the artifact under its sha256 (immutable; identical bytes share one file)."""
    digest = hashlib.sha256(onnx_bytes).hexdigest()
    relpath = f"models/{model_name}/onnx/{digest}.onnx"
    uri = store.uri(relpath) if store.exists(relpath) else store.write_bytes(relpath, onnx_bytes)
    return uri, digest


def register_model(
    registry: RegistryStore, store: ArtifactStore, draft: dict[str, Any], onnx_bytes: bytes, *,
    promote: bool, actor: str,
) -> tuple[ModelVersionRecord, bool]:
    """Store the artifact and the version (as challenger); promote it to champion when
    the gate passed and ``promote`` is set. Returns the record and whether it was promoted."""
    uri, digest = store_onnx(store, draft["model_name"], onnx_bytes)
    record = registry.register_version(
        {**draft, "onnx_uri": uri, "onnx_sha256": digest}, alias="challenger", actor=actor,
        reason="trained; awaiting promotion" if not draft["gate"]["passed"] else "trained; gate passed",
    )
    promoted = False
    if promote and record.gate["passed"]:
        registry.promote(record.model_name, record.version, actor=actor, reason="; ".join(record.gate["reasons"]))
        promoted = True
    card = render_model_card(record, promoted=promoted)
    card_uri = store.write_text(f"models/{record.model_name}/v{record.version}/model_card.md", card)
    registry.set_card_uri(record.model_name, record.version, card_uri)
    return registry.get_version(record.model_name, record.version), promoted


def card_headline(record: ModelVersionRecord, *, promoted: bool) -> str:
    metric = record.gate.get("metric")
    value = record.metrics.get(metric) if metric else None
    shown = f"{metric} {value:.4f}" if isinstance(value, float) else ""
    status = "champion" if promoted else ("challenger (gate passed)" if record.gate["passed"] else "challenger (gate failed)")
    return f"{record.model_name} v{record.version} ({record.algorithm}) - {shown} - {status}"


def _table(rows: dict[str, Any]) -> list[str]:
    lines = ["| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows.items()]
    return lines


def render_model_card(record: ModelVersionRecord, *, promoted: bool) -> str:
    gate, parity, split = record.gate, record.parity, record.split
    lines = [
        f"# Model card: {record.model_name} v{record.version}",
        "",
        f"**{card_headline(record, promoted=promoted)}**",
        "",
        "## Data lineage",
        f"- dataset `{record.dataset_id}` (content sha256 `{record.dataset_hash[:16]}...`), spec sha256 `{record.spec_hash[:16]}...`",
        f"- split: {split.get('method')} " + ", ".join(f"{k} {v}" for k, v in split.get("rows", {}).items()),
    ]
    if split.get("method") == "time":
        lines.append(f"- periods: train {split['train']}, valid {split['valid']}, holdout {split['holdout']}")
    lines += ["", "## Holdout metrics", "", *_table(record.metrics), ""]
    if record.segment_metrics:
        seg_metric = gate.get("metric")
        lines += ["## Segment metrics", "", f"| segment | rows | {seg_metric} |", "|---|---:|---:|"]
        for seg, values in record.segment_metrics.items():
            val = values.get(seg_metric)
            lines.append(f"| {seg} | {values['rows']} | {val:.4f} |" if isinstance(val, float) else f"| {seg} | {values['rows']} | n/a |")
        lines.append("")
    lines += [
        "## Training",
        f"- algorithm: {record.algorithm}, seed {record.seed}",
        f"- params: `{ {k: v for k, v in record.params.items()} }`",
        "- libraries: " + ", ".join(f"{k} {v}" for k, v in record.library_versions.items()),
        "",
        "## Promotion gate",
        f"- decision: **{'passed' if gate['passed'] else 'failed'}**" + (" - promoted to champion" if promoted else ""),
        *[f"- {reason}" for reason in gate["reasons"]],
        "",
        "## ONNX parity",
        (f"- max |native - onnx| = {parity['max_abs_diff']:.3g} (limit {parity['tolerance']:g}), "
        f"{parity['label_flips']} label flips on {parity['rows']:,} rows: {'passed' if parity['passed'] else 'FAILED'}"),
        f"- artifact `{record.onnx_uri}`, sha256 `{record.onnx_sha256}`",
        "",
        "## Known limitations",
        "- Trained on the rows that passed validation; quarantined rows are not represented.",
        "- Categories unseen in training are scored as missing values.",
        "- Metrics are from one holdout period; they say nothing about data that has drifted since.",
    ]
    return "\n".join(lines) + "\n"


@task(name="register", cache_policy=NONE)
def register_task(registry: RegistryStore, store: ArtifactStore, draft: dict[str, Any], onnx_bytes: bytes,
                  promote: bool, actor: str) -> tuple[ModelVersionRecord, bool]:
    return register_model(registry, store, draft, onnx_bytes, promote=promote, actor=actor)


def store_reference(registry: RegistryStore, store: ArtifactStore, record: ModelVersionRecord, spec: Any,
                    holdout: Any, onnx_bytes: bytes) -> tuple[str, str]:
    """The version's monitoring reference: the holdout's features, the artifact's own
    predictions on them, and the targets, as Parquet (hashed, linked to the version)."""
    import io
    from datetime import UTC, datetime

    from driftloop.onnx_model import load_model, predict_scores
    from tasks.score import prediction_frame

    model = load_model(onnx_bytes)
    frame = prediction_frame(model, spec, holdout, predict_scores(model, holdout), model_name=record.model_name,
                             model_version=record.version, scored_at=datetime.now(UTC))
    frame = frame.with_columns(holdout[spec.target])
    buffer = io.BytesIO()
    frame.write_parquet(buffer, compression="zstd")
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    uri = store.write_bytes(f"models/{record.model_name}/v{record.version}/reference.parquet", data)
    registry.set_reference(record.model_name, record.version, uri, digest)
    return uri, digest


@task(name="store-reference", cache_policy=NONE)
def store_reference_task(registry: RegistryStore, store: ArtifactStore, record: ModelVersionRecord, spec: Any,
                         holdout: Any, onnx_bytes: bytes) -> tuple[str, str]:
    return store_reference(registry, store, record, spec, holdout, onnx_bytes)
