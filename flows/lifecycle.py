"""Flow ``lifecycle``: the whole chain for one dataset, ingest -> train -> score ->
monitor (the monitor's event, if the policy fires, starts the retrain automation)."""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel

from driftloop.flows.config import refuse_credentials_in_run
from driftloop.flows.ingest import IngestResult, ingest
from driftloop.flows.monitor import MonitorResult, monitor
from driftloop.flows.score import ScoreSummary, score
from driftloop.flows.train import TrainResult, train
from driftloop.registry.store import parse_model_ref
from driftloop.spec import load_spec


class LifecycleResult(BaseModel):
    ingest: IngestResult
    train: TrainResult
    score: ScoreSummary
    monitor: MonitorResult


@flow(name="lifecycle")
def lifecycle(
    spec_path: str,
    training_source: str,
    score_input: str,
    score_output: str | None = None,
    labels_uri: str | None = None,
    trials: int = 10,
    registry_block: str | None = None,
) -> LifecycleResult:
    refuse_credentials_in_run()  # its sub-flows check their own; this run's parameters are refused first
    name = load_spec(spec_path).name
    ingested = ingest(spec_path=spec_path, source=training_source, registry_block=registry_block)
    trained = train(spec_path=spec_path, dataset_id=ingested.dataset_id, trials=trials, registry_block=registry_block)
    scored = score(input_uri=score_input, output_uri=score_output, model=f"{name}@champion", registry_block=registry_block)
    watched = monitor(scoring_run=scored.run_id, model=parse_model_ref(f"{name}@champion")[0], labels_uri=labels_uri,
                      registry_block=registry_block)
    return LifecycleResult(ingest=ingested, train=trained, score=scored, monitor=watched)
