"""Flow ``score-edge``, for the ``edge`` work pool: one run of the edge agent (the same
code as ``driftloop edge score``): refresh the model from the signed channel, score,
send the rows and telemetry home, and report."""

from __future__ import annotations

import platform
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from driftloop.flows.config import run_settings
from driftloop.naming import artifact_key
from driftloop.registry.store import parse_model_ref
from driftloop.tasks.edge import ChannelSource
from driftloop.tasks.edge_agent import AgentConfig, EdgeResult, run_agent, telemetry_payload
from driftloop.tasks.score import DEFAULT_BATCH_SIZE

__all__ = ["EdgeResult", "score_edge"]


@flow(name="score-edge")
def score_edge(
    input_uri: str,
    output_uri: str,
    model: str = "car_loan@champion",
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int | None = None,
    device_name: str | None = None,
    registry_block: str | None = None,
    channel_uri: str | None = None,
    public_key_path: str | None = None,
    inbox_uri: str | None = None,
) -> EdgeResult:
    """With ``channel_uri`` and ``public_key_path`` the device needs no registry: it
    follows the signed channel (a fleet). Without them it resolves the model in the
    registry (a single trusted device that holds the registry's credentials)."""
    logger = get_run_logger()
    settings = run_settings(registry_block)
    name, _, _ = parse_model_ref(model)
    device = device_name or platform.node()
    channel = None
    if channel_uri is not None:
        if public_key_path is None:
            raise ValueError("score-edge: channel_uri needs public_key_path (the channel's public key on this device)")
        channel = ChannelSource(channel_uri, Path(public_key_path).read_bytes(), device)
    result = run_agent(AgentConfig(
        model=model, input_uri=input_uri, output_uri=output_uri, cache_root=settings.edge_cache_path(),
        device_id=device, channel=channel,
        registry_url=None if channel is not None else settings.registry_database_url(), inbox_uri=inbox_uri,
        batch_size=batch_size, threads=threads, outbox_budget_bytes=int(settings.edge_outbox_budget_mb * 1_000_000)))
    if result.refused:
        logger.warning("REFUSED manifest: %s", result.refused)
    if result.offline:
        logger.warning("OFFLINE: %s (v%d)", result.note, result.version)
    else:
        logger.info("model %s v%d: %s", name, result.version, result.note)
    telemetry = telemetry_payload(result)
    emit_event(
        event="driftloop.edge.scored",
        resource={"prefect.resource.id": f"driftloop.edge.{device}", "driftloop.edge.device": device,
                  "driftloop.model.name": name},
        payload=telemetry,
    )
    create_markdown_artifact(
        key=artifact_key("edge", name),
        markdown="# Edge scoring\n\n| " + " | ".join(telemetry) + " |\n|" + "---|" * len(telemetry) + "\n| "
        + " | ".join(str(v) for v in telemetry.values()) + " |\n\n" + result.note,
        description=f"Edge scoring on {device}",
    )
    return result
