"""Run by the core-only (edge) virtual environment, from outside the clone: the edge
agent's flow scores with the champion registered by the full install. Prints one JSON
object.

Usage: python edge.py SCORE_PARQUET OUTPUT_DIR
"""

import importlib.util
import json
import sys

import driftloop
from driftloop.flows.score_edge import score_edge
from driftloop.outputs import read_predictions

input_uri, output_uri = sys.argv[1:3]
result = score_edge(input_uri=input_uri, output_uri=output_uri, model="loans@champion", device_name="edge-test")
print(json.dumps({
    "driftloop_file": driftloop.__file__,
    "absent": {name: importlib.util.find_spec(name) is None
               for name in ("xgboost", "lightgbm", "optuna", "nannyml", "sklearn", "pandas")},
    "result": result.model_dump(mode="json"),
    "rows_read_back": read_predictions(output_uri).height,
}))
