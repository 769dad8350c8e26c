"""Run by the wheel's own virtual environment, from outside the clone: ingest -> train ->
score in one process (flows in-process against PREFECT_API_URL). Prints one JSON object.

Usage: python lifecycle.py SPEC TRAIN_PARQUET SCORE_PARQUET
"""

import importlib.util
import json
import sys

import driftloop
from driftloop.flows.ingest import ingest
from driftloop.flows.score import score
from driftloop.flows.train import train
from driftloop.registry import open_registry
from driftloop.settings import get_settings
from driftloop.tables import open_tables

spec, train_data, score_data = sys.argv[1:4]
ingested = ingest(spec_path=spec, source=train_data)
trained = train(spec_path=spec, dataset_id=ingested.dataset_id, trials=1, algorithms=["lightgbm"])
scored = score(input_uri=score_data, model="loans@champion")

settings = get_settings()
registry = open_registry(settings.registry_database_url())
champion = registry.resolve("loans@champion")
table = open_tables(registry.engine, settings.artifact_root_uri()).predictions("loans")
print(json.dumps({
    "driftloop_file": driftloop.__file__,
    "tasks_file": importlib.util.find_spec("driftloop.tasks.score").origin,
    "top_level_tasks": importlib.util.find_spec("tasks") is not None,
    "rows_valid": ingested.rows_valid,
    "trained_version": trained.version,
    "champion_version": champion.version,
    "onnx_uri": champion.onnx_uri,
    "scored": scored.model_dump(mode="json"),
    "table_rows": table.scan(scored.snapshot_id).collect().height,
}))
