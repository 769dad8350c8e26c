"""Flow ``retrain``: what the drift automation runs. Train on the latest data -> gate ->
promote if it passes -> score the latest data with the new champion.

A cooldown stops retrain storms: a retrain that starts within ``cooldown_s`` of the
model's previous retrain-made version is skipped (the deployment's concurrency limit
already keeps a burst of events to one running retrain)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from driftloop.registry import open_registry
from flows.config import run_settings
from flows.score import ScoreSummary, score
from flows.train import TrainResult, train


class RetrainResult(BaseModel):
    model: str
    skipped: bool
    reason: str
    train: TrainResult | None = None
    score: ScoreSummary | None = None


@flow(name="retrain")
def retrain(
    model: str,
    spec_path: str,
    source: str,
    trials: int = 10,
    score_input: str | None = None,
    score_output: str | None = None,
    cooldown_s: float = 600,
    registry_block: str | None = None,
) -> RetrainResult:
    logger = get_run_logger()
    registry = open_registry(run_settings(registry_block).registry_database_url())
    recent = [
        v for v in registry.list_versions(model)
        if v.trigger == "retrain" and v.created_at > datetime.now(UTC) - timedelta(seconds=cooldown_s)
    ]
    if recent:
        reason = f"cooldown: {model} v{recent[0].version} was retrained at {recent[0].created_at:%H:%M:%S}, within {cooldown_s:g}s"
        logger.info("skipping retrain: %s", reason)
        _verdict_artifact(model, f"skipped: {reason}")
        return RetrainResult(model=model, skipped=True, reason=reason)

    trained = train(spec_path=spec_path, source=source, trials=trials, promote=True, trigger="retrain", registry_block=registry_block)
    scored = None
    if trained.promoted and score_input:
        scored = score(input_uri=score_input, output_uri=score_output, model=f"{model}@champion", registry_block=registry_block)
    verdict = "promoted" if trained.promoted else "rejected by the gate"
    reason = f"v{trained.version} {verdict}: " + "; ".join(trained.gate.reasons)
    logger.info("retrain of %s: %s", model, reason)
    _verdict_artifact(model, reason)
    return RetrainResult(model=model, skipped=False, reason=reason, train=trained, score=scored)


def _verdict_artifact(model: str, verdict: str) -> None:
    """What this retrain did and why, on the flow run's Artifacts tab (make demo reads it)."""
    create_markdown_artifact(key=f"retrain-{model}".replace("_", "-"), markdown=f"# Retrain of {model}\n\n{verdict}",
                             description=verdict)
