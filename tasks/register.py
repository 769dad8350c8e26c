"""Registering a trained model: the ONNX artifact (content-addressed), the version
record, the aliases, and the model card."""

from __future__ import annotations

import hashlib
import platform
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

import fsspec
from prefect import task
from prefect.cache_policies import NONE

from driftloop.gc import pending_mark
from driftloop.metrics import format_metric
from driftloop.registry import ChampionChanged, ModelVersionRecord, RegistryStore, VersionDraft
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
    """Write the artifact under its sha256 (immutable; identical bytes share one file),
    marked pending first: the version is registered only after its forms are built and
    it is evaluated, and until then gc must not take it for an orphan
    (:func:`driftloop.gc.pending_mark`; :func:`register_unaliased` removes the mark)."""
    digest = hashlib.sha256(onnx_bytes).hexdigest()
    relpath = f"models/{model_name}/onnx/{digest}.onnx"
    store.write_text(pending_mark(relpath), datetime.now(UTC).isoformat())
    uri = store.uri(relpath) if store.exists(relpath) else store.write_bytes(relpath, onnx_bytes)
    return uri, digest


def register_unaliased(registry: RegistryStore, draft: VersionDraft) -> ModelVersionRecord:
    """Store the version; no alias points at it until its reference and card exist. Its
    artifact is lineage now: the pending mark goes (gc removes a mark left by a crash
    here once it is stale)."""
    record = registry.register_version(draft)
    mark = pending_mark(draft.onnx_uri)
    fs, path = fsspec.core.url_to_fs(mark)
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass
    return record


def write_model_card(registry: RegistryStore, store: ArtifactStore, record: ModelVersionRecord, *, promoted: bool,
                     candidate: bool = False) -> ModelVersionRecord:
    card_uri = store.write_text(f"models/{record.model_name}/v{record.version}/model_card.md",
                                render_model_card(record, promoted=promoted, candidate=candidate))
    registry.set_card_uri(record.model_name, record.version, card_uri)
    return registry.get_version(record.model_name, record.version)


def settle_aliases(registry: RegistryStore, record: ModelVersionRecord, *, promote: bool, judged_against: int | None,
                   actor: str, shadow: bool = False) -> tuple[bool, str | None]:
    """Once the version has its reference and card: move ``champion`` to it if asked and
    the gate passed and the champion is still the version the gate judged against
    (compare-and-swap under the model's row lock); otherwise make it ``challenger``.
    With ``shadow`` (the spec's ``rollout.shadow``) and a champion to compete with, a
    passing version becomes ``candidate`` instead: its production rows decide
    (:mod:`driftloop.rollout`). Returns whether it was promoted, and why not when a
    promotion was refused."""
    refused = None
    if promote and record.gate["passed"] and shadow and judged_against is not None:
        registry.set_alias(record.model_name, "candidate", record.version, actor=actor,
                           reason="gate passed; in shadow until its own labelled rows decide: "
                                  + "; ".join(record.gate["reasons"]))
        return False, None
    if promote and record.gate["passed"]:
        try:
            registry.promote(record.model_name, record.version, actor=actor, reason="; ".join(record.gate["reasons"]),
                             expected_champion=judged_against)
            return True, None
        except ChampionChanged as exc:
            refused = str(exc)
    reason = "trained; gate passed" if record.gate["passed"] else "trained; gate failed"
    registry.set_alias(record.model_name, "challenger", record.version, actor=actor, reason=refused or reason)
    return False, refused


def card_headline(record: ModelVersionRecord, *, promoted: bool, candidate: bool = False) -> str:
    metric = record.gate.get("metric")
    value = record.metrics.get(metric) if metric else None
    shown = format_metric(metric, value) if metric and metric in record.metrics else ""
    status = "champion" if promoted else ("candidate (gate passed; scoring in shadow)" if candidate else
                                          "challenger (gate passed)" if record.gate["passed"] else "challenger (gate failed)")
    return f"{record.model_name} v{record.version} ({record.algorithm}) - {shown} - {status}"


def _table(rows: dict[str, Any]) -> list[str]:
    lines = ["| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {format_metric(k, v).removeprefix(k + ' ')} |" for k, v in rows.items()]
    return lines


def _comparison(gate: dict[str, Any]) -> list[str]:
    """Challenger and champion side by side on the same holdout."""
    theirs = gate.get("champion_metrics")
    if not theirs:
        return []
    ours = gate.get("challenger_metrics") or {}
    lines = [f"| metric (same holdout) | this version | champion v{gate.get('champion_version')} |", "|---|---:|---:|"]
    lines += [f"| {k} | {ours.get(k, float('nan')):.4f} | {v:.4f} |" for k, v in theirs.items() if isinstance(v, float)]
    return [*lines, ""]


def render_model_card(record: ModelVersionRecord, *, promoted: bool, candidate: bool = False) -> str:
    gate, parity, split = record.gate, record.parity, record.split
    lines = [
        f"# Model card: {record.model_name} v{record.version}",
        "",
        f"**{card_headline(record, promoted=promoted, candidate=candidate)}**",
        "",
        "## Data lineage",
        f"- dataset `{record.dataset_id}` (content sha256 `{record.dataset_hash[:16]}...`), spec sha256 `{record.spec_hash[:16]}...`",
        f"- split: {split.get('method')} " + ", ".join(f"{k} {v}" for k, v in split.get("rows", {}).items()),
    ]
    if split.get("method") == "time":
        lines.append(f"- periods: train {split['train']}, valid {split['valid']}, holdout {split['holdout']}")
    if record.window:
        w = record.window
        lines.append(
            f"- training window ({w['policy']}): {w['rows']:,} labelled rows from {w['start'] or '-'} to {w['end'] or '-'}; "
            f"{w['new_labels']:,} newer than the previous champion's data; {w['skipped_recent']:,} too recent (skip_recent)"
        )
        lines.append(f"- drawn from datasets {', '.join(w['dataset_ids']) or '-'} and {len(w['scoring_runs'])} scoring run(s)")
    lines += ["", "## Holdout metrics", "", *_table(record.metrics), ""]
    if record.segment_metrics:
        seg_metric = gate.get("metric")
        lines += ["## Segment metrics", "", f"| segment | rows | {seg_metric} |", "|---|---:|---:|"]
        for seg, values in record.segment_metrics.items():
            val = values.get(seg_metric)
            shown = format_metric(seg_metric, val).removeprefix(f"{seg_metric} ") if seg_metric in values else "n/a"
            lines.append(f"| {seg} | {values['rows']} | {shown} |")
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
        *_comparison(gate),
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


@task(name="store-onnx", cache_policy=NONE)
def store_onnx_task(store: ArtifactStore, model_name: str, onnx_bytes: bytes) -> tuple[str, str]:
    return store_onnx(store, model_name, onnx_bytes)


@task(name="register", cache_policy=NONE)
def register_task(registry: RegistryStore, draft: VersionDraft) -> ModelVersionRecord:
    return register_unaliased(registry, draft)


@task(name="model-card", cache_policy=NONE)
def model_card_task(registry: RegistryStore, store: ArtifactStore, record: ModelVersionRecord, promoted: bool,
                    candidate: bool = False) -> ModelVersionRecord:
    return write_model_card(registry, store, record, promoted=promoted, candidate=candidate)


@task(name="promote", cache_policy=NONE)
def settle_aliases_task(registry: RegistryStore, record: ModelVersionRecord, promote: bool, judged_against: int | None,
                        actor: str, shadow: bool = False) -> tuple[bool, str | None]:
    return settle_aliases(registry, record, promote=promote, judged_against=judged_against, actor=actor,
                          shadow=shadow)


def store_reference(registry: RegistryStore, store: ArtifactStore, record: ModelVersionRecord, spec: Any,
                    holdout: Any, onnx_bytes: bytes) -> tuple[str, str]:
    """The version's monitoring reference: the holdout's features, the artifact's own
    predictions on them, and the targets, as Parquet (hashed, linked to the version)."""
    import io
    from datetime import UTC, datetime

    from driftloop.onnx_model import load_model, predict_scores
    from driftloop.tasks.score import prediction_frame

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
