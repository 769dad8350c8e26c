"""How long NannyML monitoring takes on a large analysis window.

Times univariate drift, multivariate drift (data reconstruction) and CBPE, fitted on a
250k-row reference and run on 1M analysis rows x 20 features (16 continuous, 4
categorical), chunks of 50k rows; prints seconds per step and the process's peak RSS.
Figures are printed, not asserted.

    .venv/bin/python bench/monitoring.py            # 1M analysis rows
    .venv/bin/python bench/monitoring.py --quick    # 100k, a smoke run
"""

from __future__ import annotations

import argparse
import os
import resource
import time

os.environ["NML_DISABLE_USAGE_LOGGING"] = "1"

import numpy as np
import polars as pl

from driftloop.spec import parse_spec
from tasks.monitor import run_monitoring

N_CONTINUOUS, N_CATEGORICAL = 16, 4


def make_frame(rows: int, seed: int, shift: float) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    data: dict[str, object] = {f"x{i:02d}": rng.normal(shift if i < 4 else 0.0, 1.0, rows) for i in range(N_CONTINUOUS)}
    for j in range(N_CATEGORICAL):
        data[f"c{j}"] = rng.choice(["a", "b", "c", "d"], rows)
    logit = sum(np.asarray(data[f"x{i:02d}"]) * 0.5 for i in range(4))
    proba = 1 / (1 + np.exp(-logit))
    data["probability"] = proba
    data["prediction"] = (proba >= 0.5).astype(np.int64)
    data["y"] = (rng.random(rows) < proba).astype(np.int64)
    data["ts"] = (np.datetime64("2025-01-01T00:00:00") + np.arange(rows).astype("timedelta64[s]")).astype("datetime64[us]")
    return pl.DataFrame(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    analysis_rows = 100_000 if args.quick else 1_000_000
    reference_rows = 250_000 if not args.quick else 25_000  # 5 reference chunks
    chunk = analysis_rows // 20
    columns = {f"x{i:02d}": {"dtype": "float"} for i in range(N_CONTINUOUS)}
    columns |= {f"c{j}": {"dtype": "category"} for j in range(N_CATEGORICAL)}
    spec = parse_spec({"name": "bench", "task": "binary_classification", "target": "y", "timestamp": "ts",
                       "columns": {**columns, "y": {"dtype": "int"}, "ts": {"dtype": "datetime"}},
                       "monitoring": {"chunk_size": chunk}})
    reference = make_frame(reference_rows, 1, 0.0)
    analysis = make_frame(analysis_rows, 2, 0.3)

    import nannyml as nml  # timed separately: the import alone is several seconds

    started = time.perf_counter()
    report = run_monitoring(reference, analysis, spec, spec.monitoring, with_plots=False)
    total = time.perf_counter() - started

    # Step timings: each calculator alone, same data and chunking.
    ref, ana = reference.to_pandas(), analysis.to_pandas()
    feats = spec.feature_columns
    cats = [c for c in feats if c.startswith("c")]
    timings = {}
    t = time.perf_counter()
    nml.UnivariateDriftCalculator(column_names=feats, treat_as_categorical=cats, timestamp_column_name="ts", chunk_size=chunk).fit(ref).calculate(ana)
    timings["univariate drift"] = time.perf_counter() - t
    t = time.perf_counter()
    nml.DataReconstructionDriftCalculator(column_names=feats, timestamp_column_name="ts", chunk_size=chunk).fit(ref).calculate(ana)
    timings["multivariate drift"] = time.perf_counter() - t
    t = time.perf_counter()
    nml.CBPE(y_pred_proba="probability", y_pred="prediction", y_true="y", problem_type="classification_binary",
             metrics=["roc_auc"], timestamp_column_name="ts", chunk_size=chunk).fit(ref).estimate(ana.drop(columns=["y"]))
    timings["CBPE (roc_auc)"] = time.perf_counter() - t

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"analysis rows {analysis_rows:,} x {len(feats)} features, reference {reference_rows:,}, chunks of {chunk:,}")
    for step, seconds in timings.items():
        print(f"  {step:<20} {seconds:8.1f} s")
    print(f"  {'driftloop end to end':<20} {total:8.1f} s   (all three + policy inputs, {len(report.results):,} results)")
    print(f"  peak RSS {peak_mib:,.0f} MiB")


if __name__ == "__main__":
    main()
