"""Flow ``retrain``: what the drift and performance automations run, for any model.

Decide, then train: (a) take the model's retrain lease (one retrain per model at a
time; one that trained or failed holds the cooldown), (b) count labelled rows newer
than the champion's data and wait for ``min_new_labels`` of them, (c) assemble the
training window from the registry (labelled datasets + scored rows joined to their
labels; with ``window: {choose: [...]}`` the window is first chosen by a backtest of each
candidate on the model's labelled history, recorded on the version), train, judge the challenger against the champion on the window's newest rows,
promote if it is better, and score the latest scored input with the new champion.

The only input from outside is the model's name. The spec and the data come from the
registry: an event's payload cannot choose what a model is trained on.
"""

from __future__ import annotations

import uuid
from typing import Literal

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from driftloop.feedback import WindowRecord
from driftloop.flows.config import run_settings
from driftloop.flows.score import ScoreSummary, score
from driftloop.flows.train import TrainOptions, train_and_register
from driftloop.metrics import format_metric
from driftloop.naming import artifact_key
from driftloop.registry import ModelNotFound, open_registry
from driftloop.spec import check_model_name
from driftloop.storage import ArtifactStore
from driftloop.tables import open_tables
from driftloop.tasks.backtest import choose_window_task
from driftloop.tasks.retrain import (
    LeaseHeartbeat,
    acquire_lease_task,
    champion_spec_task,
    collect_labelled_task,
    select_window_task,
    snapshot_window_task,
)
from driftloop.tasks.search_space import ALGORITHMS

Algorithm = Literal["xgboost", "lightgbm"]


class ModelOnHoldout(BaseModel):
    version: int
    metrics: dict[str, float] | None = None


class RetrainResult(BaseModel):
    model: str
    skipped: bool
    reason: str
    window: WindowRecord | None = None
    champion: ModelOnHoldout | None = None  # the champion judged against (its metrics on the new holdout)
    challenger: ModelOnHoldout | None = None
    promoted: bool = False
    candidate: int | None = None  # the version in shadow (made by this retrain, or the one that skipped it)
    labels: int = 0  # distinct labelled ids registered for scored rows
    labels_unscored: int = 0  # ... whose id no scored row holds
    score: ScoreSummary | None = None


@flow(name="retrain")
def retrain(
    model: str,
    trials: int = 10,
    algorithms: list[Algorithm] = list(ALGORITHMS),  # noqa: B006 (pydantic copies it)
    score_input: str | None = None,
    score_output: str | None = None,
    cooldown_s: float = 600,
    lease_ttl_s: float = 900,
    registry_block: str | None = None,
) -> RetrainResult:
    """Retrain ``model`` on its training window (the spec's ``retrain`` section, as
    registered with the champion). ``score_input`` defaults to the input of the model's
    latest scoring run. ``lease_ttl_s``: the lease is renewed while the retrain works
    (every quarter of it, at most every minute); after this long without a renewal, a
    retrain that died without releasing it no longer blocks the next one."""
    logger = get_run_logger()
    model = check_model_name(model)
    settings = run_settings(registry_block)
    registry = open_registry(settings.registry_database_url())
    champion = registry.find_alias(model, "champion")
    if champion is None:
        raise ModelNotFound(f"model {model!r} has no champion to retrain; train one first (driftloop train --spec SPEC SOURCE)")

    candidate = registry.find_alias(model, "candidate")
    if candidate is not None:
        # Its own production rows decide first; a retrain now would replace it unjudged.
        return _finish(RetrainResult(model=model, skipped=True, reason=(
            f"candidate v{candidate.version} is in shadow beside champion v{champion.version}: its labelled rows decide "
            f"before another retrain (driftloop rollout status --model {model}); a rejection or timeout frees the model"),
            champion=ModelOnHoldout(version=champion.version), candidate=candidate.version))
    holder = f"flow-run/{runtime.flow_run.id or uuid.uuid4()}"
    lease = acquire_lease_task(registry, model, holder, cooldown_s, lease_ttl_s)
    if not lease.acquired:
        return _finish(RetrainResult(model=model, skipped=True, reason=lease.reason,
                                     champion=ModelOnHoldout(version=champion.version)))
    outcome = "failed"
    try:
        with LeaseHeartbeat(registry, model, holder, ttl_s=lease_ttl_s):
            spec = champion_spec_task(champion)
            data = collect_labelled_task(registry, open_tables(registry.engine, settings.artifact_root_uri()), spec)
            for problem in data.skipped:
                logger.warning("labelled data left out: %s", problem)
            choice, windowed = None, spec
            if spec.retrain.window.choose is not None:
                # The window is chosen on the model's own history; the version keeps the spec with choose.
                choice, windowed = choose_window_task(spec, data, trials, list(algorithms), champion.version)
            window = select_window_task(data, windowed, champion)
            window.record.choice = choice
            result = RetrainResult(model=model, skipped=True, reason="", window=window.record,
                                   champion=ModelOnHoldout(version=champion.version), labels=data.labels,
                                   labels_unscored=data.labels_unscored)
            if data.labels_unscored:
                logger.warning("%d registered label(s) of %s match no scored row (by id); they are not used",
                               data.labels_unscored, model)
            needed = spec.retrain.min_new_labels
            if window.record.new_labels < needed:
                outcome = "waiting"
                result.reason = (f"waiting for labels: {window.record.new_labels} of {needed} labelled rows newer than "
                                 f"champion v{champion.version}'s training data")
                return _finish(result)
            dataset = snapshot_window_task(registry, ArtifactStore(settings.artifact_root_uri()), spec, window)
            if dataset.id == champion.dataset_id:
                outcome = "nothing new"
                result.reason = f"nothing new: the window is exactly champion v{champion.version}'s training data ({dataset.id})"
                return _finish(result)

            options = TrainOptions(trials=trials, algorithms=algorithms, trigger="retrain")
            trained = train_and_register(spec, dataset, window.frame, settings, options, window=window.record,
                                         min_improvement=spec.retrain.min_improvement)
            outcome = "trained"
            verdict = ("promoted" if trained.promoted else
                       "candidate: scoring in shadow until its labelled rows decide" if trained.candidate else
                       "rejected by the gate")
            result.skipped = False
            result.promoted = trained.promoted
            result.candidate = trained.version if trained.candidate else None
            result.reason = f"v{trained.version} {verdict}: " + "; ".join(trained.gate.reasons)
            result.challenger = ModelOnHoldout(version=trained.version, metrics=trained.metrics)
            result.champion = ModelOnHoldout(version=champion.version, metrics=trained.gate.champion_metrics)
            if trained.promoted:
                result.score = _score_latest_input(registry, model, score_input, score_output, registry_block)
            return _finish(result)
    finally:
        registry.release_retrain_lease(model, holder, outcome)


def _score_latest_input(registry, model: str, score_input: str | None, score_output: str | None,
                        registry_block: str | None) -> ScoreSummary | None:
    if score_input is None:
        runs = registry.list_scoring_runs(model)
        if not runs:
            return None
        score_input = runs[0].input_uri
    return score(input_uri=score_input, output_uri=score_output, model=f"{model}@champion", registry_block=registry_block)


def _finish(result: RetrainResult) -> RetrainResult:
    """Log the verdict and leave it on the flow run's Artifacts tab (make demo reads it)."""
    verdict = f"skipped: {result.reason}" if result.skipped else result.reason
    get_run_logger().info("retrain of %s: %s", result.model, verdict)
    lines = [f"# Retrain of {result.model}", "", verdict, ""]
    if result.window:
        w = result.window
        lines += [(f"- window ({w.policy}): {w.rows:,} rows, {w.start or '-'} .. {w.end or '-'}; "
                  f"{w.new_labels:,} labelled rows newer than the champion's data"),
                  *([f"- window chosen from {', '.join(f.window for f in w.choice.windows)}: {w.choice.chosen} "
                     f"({w.choice.reason}); cost at alpha {w.choice.alpha:g}: "
                     + ", ".join(f"{f.window} {f.cost:.3f}" if f.cost is not None else f"{f.window} -"
                                 for f in w.choice.windows)] if w.choice else []),
                  f"- labels registered for scored rows: {result.labels:,}; matching no scored id: {result.labels_unscored:,}"]
    for role, side in (("champion", result.champion), ("challenger", result.challenger)):
        if side is not None and side.metrics:
            shown = ", ".join(format_metric(k, v) for k, v in side.metrics.items())
            lines.append(f"- {role} v{side.version} on the window's holdout: {shown}")
    create_markdown_artifact(key=artifact_key("retrain", result.model), markdown="\n".join(lines), description=verdict)
    return result
