"""Flow ``edge-rollout``, for the ``cpu`` pool (a schedule and ``driftloop.edge.scored``
events run it): commit the edge runs waiting in the store's inbox to the predictions
table, then take one step of the model's edge rollout (advance a healthy wave, stop on a
breach) and re-sign the channel."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from pydantic import BaseModel

from driftloop.channel import ChannelError, channel_relpath, signing_key
from driftloop.flows.config import run_settings
from driftloop.naming import artifact_key
from driftloop.registry import open_registry
from driftloop.spec import check_model_name
from driftloop.storage import ArtifactStore
from driftloop.tasks.edge_inbox import ingest_inbox_task
from driftloop.tasks.edge_rollout import ControlResult, control_task


class EdgeRolloutResult(BaseModel):
    model: str
    runs_committed: int
    rows_committed: int
    runs_rejected: int
    action: str
    version: int | None
    wave: int | None
    state: str | None
    reasons: list[str]
    figures: dict[str, float | int | None]


@flow(name="edge-rollout")
def edge_rollout(model: str = "car_loan", registry_block: str | None = None) -> EdgeRolloutResult:
    logger = get_run_logger()
    settings = run_settings(registry_block)
    name = check_model_name(model.split("@")[0])  # an event's model name is input
    registry = open_registry(settings.registry_database_url())
    store = ArtifactStore(settings.artifact_root_uri())
    ingested = ingest_inbox_task(store, registry, name)
    if ingested.rejected:
        logger.error("%d edge run(s) rejected: %s", len(ingested.rejected), ingested.rejected)
    key = signing_key(settings)
    if key is None:
        if store.exists(channel_relpath(name)):  # a fleet follows it: unsigned, it would expire
            raise ChannelError("edge-rollout: a channel is published but no signing key is configured (set "
                               "DRIFTLOOP_CHANNEL_KEY_FILE or DRIFTLOOP_CHANNEL_KEY_BLOCK; driftloop keys init)")
        logger.info("%s: no edge channel and no signing key: no fleet to roll out to", name)
        step = ControlResult(name, None, "idle", None, None, ["no channel signing key configured"], {})
    else:
        step = control_task(registry, store, name, key, settings.channel_ttl_s)
    logger.info("%s: %s (v%s, wave %s, %s): %s", name, step.action, step.version, step.wave, step.state,
                "; ".join(step.reasons))
    if step.action == "abort":
        emit_event(event="driftloop.rollout.aborted",
                   resource={"prefect.resource.id": f"driftloop.model.{name}", "driftloop.model.name": name},
                   payload={"version": step.version, "wave": step.wave, "reasons": step.reasons,
                            "figures": step.figures})
    create_markdown_artifact(
        key=artifact_key("edge-rollout", name),
        markdown=f"# Edge rollout of {name}\n\n{step.action}: v{step.version}, wave {step.wave}, {step.state}\n\n"
        + "\n".join(f"- {r}" for r in step.reasons) + "\n\n| figure | value |\n|---|---|\n"
        + "\n".join(f"| {k} | {v} |" for k, v in step.figures.items())
        + f"\n\nCommitted {len(ingested.committed)} edge run(s), {ingested.rows} row(s); rejected "
        f"{len(ingested.rejected)}.",
        description=f"Edge rollout of {name}",
    )
    return EdgeRolloutResult(model=name, runs_committed=len(ingested.committed), rows_committed=ingested.rows,
                             runs_rejected=len(ingested.rejected), action=step.action, version=step.version,
                             wave=step.wave, state=step.state, reasons=step.reasons, figures=step.figures)
