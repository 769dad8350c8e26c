"""Evidently's DataDriftPreset on the bench's data, run by ``bench/monitoring.py`` with the
interpreter of its side environment (Evidently 0.7, outside the project's lock): one report
on the whole analysis window against the reference (``--chunk 0``, as this bench measured it
before), or one per analysis chunk. Prints one JSON line: seconds (the reports alone), the
process's peak RSS, Evidently's version."""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import evidently
import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.presets import DataDriftPreset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--chunk", type=int, required=True, help="rows per report; 0: the whole window")
    args = parser.parse_args()
    reference = pd.read_parquet(args.data / "reference.parquet")
    analysis = pd.read_parquet(args.data / "analysis.parquet").sort_values("ts", kind="stable")
    numerical = [c for c in reference.columns if c.startswith("x")]
    categorical = [c for c in reference.columns if c.startswith("c")]
    definition = DataDefinition(numerical_columns=numerical, categorical_columns=categorical)
    columns = numerical + categorical
    started = time.perf_counter()
    reference_data = Dataset.from_pandas(reference[columns], data_definition=definition)
    reports = 0
    step = args.chunk or len(analysis)
    for start in range(0, len(analysis), step):
        current = Dataset.from_pandas(analysis.iloc[start:start + step][columns].reset_index(drop=True),
                                      data_definition=definition)
        Report([DataDriftPreset()]).run(current_data=current, reference_data=reference_data)
        reports += 1
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(json.dumps({"seconds": seconds, "peak_rss_gb": peak, "version": evidently.__version__, "reports": reports}))


if __name__ == "__main__":
    main()
