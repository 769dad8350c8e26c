"""Rollout steps: where a model stands (shadow, guard, settled), the second model a
scoring run also scores in shadow, and a decision on the rows both scored and that are
labelled, applied as one compare-and-swap in the registry. The logic is in
:mod:`driftloop.rollout`."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import polars as pl
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel

from driftloop.errors import DriftloopError
from driftloop.feedback import latest_labels
from driftloop.forms import Device, Engine
from driftloop.onnx_model import load_model
from driftloop.registry import ModelVersionRecord, RegistryStore
from driftloop.registry.store import RolloutDecisionRecord, utcnow
from driftloop.rollout import (
    DEFAULT_RESAMPLES,
    Comparison,
    Decision,
    RolloutState,
    compare,
    guard_decision,
    paired_chunks,
    paired_frame,
    paired_rows,
    rollout_state,
    shadow_decision,
)
from driftloop.spec import DatasetSpec
from driftloop.tables import Tables
from driftloop.tasks.score import ShadowScoring, fetch_verified, load_scoring_form

logger = logging.getLogger(__name__)


def version_spec(record: ModelVersionRecord) -> DatasetSpec:
    """The spec a version was trained with, from its hash-verified artifact."""
    return load_model(fetch_verified(record.onnx_uri, record.onnx_sha256)).spec()


def specs_with(known: dict[int, DatasetSpec]) -> Callable[[object], DatasetSpec]:
    """``version_spec``, answering from ``known`` (version -> spec already loaded) first."""
    def spec_of(record: object) -> DatasetSpec:
        assert isinstance(record, ModelVersionRecord)
        return known.get(record.version) or version_spec(record)

    return spec_of


def model_state(registry: RegistryStore, model: str, *, known: dict[int, DatasetSpec] | None = None,
                now: datetime | None = None) -> RolloutState:
    return rollout_state(registry, model, specs_with(known or {}), now or utcnow())


def shadow_scoring(registry: RegistryStore, state: RolloutState, served: ModelVersionRecord, spec: DatasetSpec, *,
                   engine: Engine, device: Device, threads: int | None) -> tuple[ShadowScoring | None, str]:
    """The second model a scoring run of ``served`` also scores, and why (or why none)."""
    if not state.active or state.champion != served.version or state.shadow is None:
        return None, "no rollout in progress"
    if spec.id is None:
        return None, f"{spec.name} has no id column: shadow rows could not be paired with served rows"
    shadow_record = registry.get_version(state.model, state.shadow)
    try:
        scorer, why = load_scoring_form(shadow_record, engine=engine, device=device, threads=threads)
    except DriftloopError as exc:  # the served rows never depend on the shadow model
        logger.warning("v%s cannot score in shadow: %s", shadow_record.version, exc)
        return None, f"v{shadow_record.version} cannot score in shadow: {exc}"
    if scorer.descriptor.spec().fingerprint() != spec.fingerprint():
        scorer.close()
        return None, (f"v{shadow_record.version} was trained with another data spec than v{served.version}; "
                      "it cannot score the same rows in shadow")
    policy = state.policy
    fraction = policy.shadow.fraction if policy is not None and policy.shadow is not None else 1.0
    role = "candidate" if state.phase == "shadow" else "replaced champion (guard)"
    return (ShadowScoring(scorer=scorer, version=shadow_record.version, fraction=fraction, id_column=spec.id),
            f"{role} v{shadow_record.version} scores {fraction:.0%} of the rows in shadow ({why})")


class ChunkFigures(BaseModel):
    """One chunk of the paired rows: each model's realized metric on the same rows."""

    label: str
    rows: int
    served: float | None
    shadow: float | None


class RolloutOutcome(BaseModel):
    """What one look at a model's rollout found and did."""

    model: str
    phase: str  # shadow, guard, settled
    champion: int | None
    shadow: int | None  # the candidate (shadow), or the replaced champion (guard)
    since: datetime | None = None
    decision: RolloutDecisionRecord | None = None  # None: nothing to decide
    event: str | None = None  # the event the decision calls for (promoted, candidate-rejected, rolled-back)
    reason: str
    chunks: list[ChunkFigures] = []  # the paired rows per chunk, for the charts


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


@dataclass
class PairedRead:
    """The labelled rows both models scored (None: no predictions table yet), how many rows
    both scored, and the table snapshots read."""

    frame: pl.DataFrame | None = None
    both: int = 0
    predictions_snapshot: int | None = None
    labels_snapshot: int | None = None


def paired_labelled(tables: Tables, state: RolloutState) -> PairedRead:
    """The labelled rows both models of ``state`` scored in the same runs, as of the
    tables' current snapshots (recorded with the decision)."""
    assert state.spec is not None and state.shadow is not None
    table = tables.predictions(state.model)
    snapshot = table.refresh().snapshot_id() if table is not None else None
    if table is None or snapshot is None:
        return PairedRead()
    labels, labels_snapshot = latest_labels(tables, state.spec)
    frame, both = paired_frame(table.scan(snapshot), labels, state.spec, served_version=state.champion or 0,
                               shadow_version=state.shadow, since=state.since)
    return PairedRead(frame, both, snapshot, labels_snapshot)


def chunk_figures(frame: pl.DataFrame | None, spec: DatasetSpec) -> list[ChunkFigures]:
    if frame is None:
        return []
    return [ChunkFigures(label=c.label, rows=c.rows, served=_finite(c.served), shadow=_finite(c.shadow))
            for c in paired_chunks(frame, spec)]


def evaluate(tables: Tables, state: RolloutState, *, resamples: int = DEFAULT_RESAMPLES,
             now: datetime | None = None, frame: pl.DataFrame | None = None,
             both: int = 0) -> tuple[Decision, Comparison | None, int, int]:
    """Compare the two models of ``state`` on their paired labelled rows (``frame``, else
    read now) and say what that decides (nothing is stored). Returns (decision, comparison
    or None, rows scored by both, rows labelled)."""
    assert state.active and state.spec is not None and state.policy is not None and state.shadow is not None
    spec, policy = state.spec, state.policy
    if frame is None:
        read = paired_labelled(tables, state)
        frame, both = read.frame, read.both
    comparison, labelled = None, 0
    if frame is not None:
        labelled = frame.height
        if labelled:
            confidence = policy.shadow.confidence if state.phase == "shadow" and policy.shadow else policy.guard_confidence
            comparison = compare(spec.gate_metric, paired_rows(frame, both, spec), state.phase,
                                 confidence=confidence, resamples=resamples)
    age = (now or utcnow()) - (state.since or utcnow())
    if state.phase == "shadow":
        decision = shadow_decision(comparison, policy, min_improvement=spec.retrain.min_improvement, age=age)
    else:
        decision = guard_decision(comparison, policy, age=age)
    return decision, comparison, both, labelled


def decide(registry: RegistryStore, tables: Tables, model: str, *, actor: str, resamples: int = DEFAULT_RESAMPLES,
           now: datetime | None = None) -> RolloutOutcome:
    """Look at ``model``'s rollout and apply what its rows decide: store the decision and
    move the aliases in one compare-and-swap (:meth:`RegistryStore.apply_rollout_decision`).
    A concurrent promote or rollback that lands first makes this raise ChampionChanged,
    with nothing moved."""
    from driftloop.rollout import EVENTS

    state = model_state(registry, model, now=now)
    if not state.active or state.policy is None:
        return RolloutOutcome(model=model, phase=state.phase, champion=state.champion, shadow=state.shadow,
                              since=state.since, reason="nothing to decide: no candidate in shadow and no guard")
    read = paired_labelled(tables, state)
    frame = read.frame
    decision, comparison, both, labelled = evaluate(tables, state, resamples=resamples, now=now, frame=frame,
                                                    both=read.both)
    served_value = shadow_value = None
    if comparison is not None:
        incumbent, contender = _finite(comparison.incumbent), _finite(comparison.contender)
        served_value, shadow_value = (incumbent, contender) if state.phase == "shadow" else (contender, incumbent)
    assert state.spec is not None and state.shadow is not None
    confidence = (state.policy.shadow.confidence if state.phase == "shadow" and state.policy.shadow
                  else state.policy.guard_confidence)
    record = RolloutDecisionRecord(
        model_name=model, phase=state.phase, verdict=decision.verdict, served_version=state.champion or 0,
        shadow_version=state.shadow, metric=state.spec.gate_metric, rows_scored_by_both=both, rows_labelled=labelled,
        served_metric=served_value, shadow_metric=shadow_value,
        difference=_finite(comparison.difference) if comparison else None,
        lower=_finite(comparison.lower) if comparison else None,
        upper=_finite(comparison.upper) if comparison else None,
        confidence=confidence, reason=decision.reason, actor=actor,
        predictions_snapshot=read.predictions_snapshot, labels_snapshot=read.labels_snapshot,
    )
    stored = registry.apply_rollout_decision(
        record, expected_champion=state.champion,
        expected_candidate=state.shadow if state.phase == "shadow" else None)
    return RolloutOutcome(model=model, phase=state.phase, champion=state.champion, shadow=state.shadow,
                          since=state.since, decision=stored, event=EVENTS.get(decision.verdict),
                          reason=decision.reason, chunks=chunk_figures(frame, state.spec))


def paired_markdown(model: str, phase: str, served: int | None, shadow: int | None, metric: str,
                    chunks: list[ChunkFigures]) -> str:
    """The paired chart and its table: each model's realized metric per chunk, same rows."""
    from driftloop.tasks.monitor_charts import data_uri, paired_chart

    if not chunks:
        return ""
    shadow_name = f"candidate v{shadow}" if phase == "shadow" else f"replaced champion v{shadow}"
    png = paired_chart(chunks, metric=metric, served=f"champion v{served}", shadow=shadow_name)
    lines = [f"## Rollout ({phase}): champion v{served} vs {shadow_name} on the same rows", ""]
    if png:
        lines += [f"![Realized {metric} per chunk, both models on the same rows]({data_uri(png)})", ""]
    lines += [f"| chunk | rows | champion v{served} | {shadow_name} |", "|---|---:|---:|---:|"]
    lines += [f"| {c.label} | {c.rows:,} | {_num(c.served)} | {_num(c.shadow)} |" for c in chunks]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def rollout_markdown(registry: RegistryStore, tables: Tables, model: str,
                     known: dict[int, DatasetSpec] | None = None) -> str:
    """The paired chart of a rollout in progress, for the monitoring artifact ("" when
    none is). Read only: no bootstrap, nothing stored."""
    state = model_state(registry, model, known=known)
    if not state.active or state.spec is None:
        return ""
    return paired_markdown(model, state.phase, state.champion, state.shadow, state.spec.gate_metric,
                           chunk_figures(paired_labelled(tables, state).frame, state.spec))


@task(name="rollout-state", cache_policy=NONE)
def model_state_task(registry: RegistryStore, model: str, known: dict[int, DatasetSpec]) -> RolloutState:
    return model_state(registry, model, known=known)


@task(name="shadow-form", cache_policy=NONE)
def shadow_scoring_task(registry: RegistryStore, state: RolloutState, served: ModelVersionRecord, spec: DatasetSpec,
                        engine: Engine, device: Device, threads: int | None) -> tuple[ShadowScoring | None, str]:
    return shadow_scoring(registry, state, served, spec, engine=engine, device=device, threads=threads)


@task(name="rollout-chart", cache_policy=NONE)
def rollout_markdown_task(registry: RegistryStore, tables: Tables, model: str, known: dict[int, DatasetSpec]) -> str:
    return rollout_markdown(registry, tables, model, known)


@task(name="rollout-decide", cache_policy=NONE)
def decide_task(registry: RegistryStore, tables: Tables, model: str, actor: str, resamples: int) -> RolloutOutcome:
    return decide(registry, tables, model, actor=actor, resamples=resamples)
