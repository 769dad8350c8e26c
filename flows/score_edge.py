"""Flow ``score-edge``, for the ``edge`` work pool: score with a locally cached champion
that is refreshed from the registry when it can be reached, and report telemetry."""

from __future__ import annotations

import platform

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from pydantic import BaseModel

from driftloop.flows.config import run_settings
from driftloop.naming import artifact_key
from driftloop.onnx_model import load_model
from driftloop.registry import open_registry
from driftloop.registry.store import parse_model_ref
from driftloop.tasks.edge import ModelCache, refresh_task
from driftloop.tasks.score import DEFAULT_BATCH_SIZE, percentile, score_task


class EdgeResult(BaseModel):
    rows_in: int
    rows_scored: int
    rows_quarantined: int
    output_uri: str
    model: str
    version: int
    cache_hit: bool
    offline: bool
    note: str
    latency_p50_ms: float
    latency_p95_ms: float


@flow(name="score-edge")
def score_edge(
    input_uri: str,
    output_uri: str,
    model: str = "car_loan@champion",
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int | None = None,
    device_name: str | None = None,
    registry_block: str | None = None,
) -> EdgeResult:
    logger = get_run_logger()
    settings = run_settings(registry_block)
    name, _, _ = parse_model_ref(model)
    cache = ModelCache(settings.edge_cache_path(), name)

    def resolve():
        return open_registry(settings.registry_database_url()).resolve(model)

    cached = refresh_task(cache, resolve)
    if cached.offline:
        logger.warning("OFFLINE: %s (v%d)", cached.note, cached.version)
    else:
        logger.info("model %s v%d: %s", name, cached.version, cached.note)
    loaded = load_model(cached.read(), threads=threads)
    result = score_task(loaded, input_uri, output_uri, name, cached.version, batch_size)

    device = device_name or platform.node()
    telemetry = {
        "rows_in": result.rows_in, "rows_scored": result.rows_scored, "rows_quarantined": result.rows_quarantined,
        "batches": result.batches,
        "latency_p50_ms": round(1000 * percentile(result.batch_latencies_s, 50), 3),
        "latency_p95_ms": round(1000 * percentile(result.batch_latencies_s, 95), 3),
        "model_version": cached.version, "cache_hit": cached.cache_hit, "offline": cached.offline,
    }
    emit_event(
        event="driftloop.edge.scored",
        resource={"prefect.resource.id": f"driftloop.edge.{device}", "driftloop.edge.device": device,
                  "driftloop.model.name": name},
        payload=telemetry,
    )
    create_markdown_artifact(
        key=artifact_key("edge", name),
        markdown="# Edge scoring\n\n| " + " | ".join(telemetry) + " |\n|" + "---|" * len(telemetry) + "\n| "
        + " | ".join(str(v) for v in telemetry.values()) + " |\n\n" + cached.note,
        description=f"Edge scoring on {device}",
    )
    return EdgeResult(
        rows_in=result.rows_in, rows_scored=result.rows_scored, rows_quarantined=result.rows_quarantined,
        output_uri=result.output_uri, model=name, version=cached.version, cache_hit=cached.cache_hit,
        offline=cached.offline, note=cached.note, latency_p50_ms=telemetry["latency_p50_ms"],
        latency_p95_ms=telemetry["latency_p95_ms"],
    )
