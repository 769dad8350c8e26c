"""False-alarm rate and power of driftloop's calibrated drift alerts, against NannyML's
default thresholds, on synthetic loans (tests/support/data.py) where the truth is known.

For each of several references (a model's holdout, 1,200 rows by default), monitoring
runs on a stationary stream drawn from the reference's distribution and on the same
stream with one numeric feature shifted by 0.5 and 1 standard deviation. It prints, per
threshold kind, averaged over the references:

- univariate false alarms: the fraction of chunk x feature checks that alert, and the
  fraction of chunks with any univariate alert (the calibrated target is ``alert_rate``);
- multivariate false alarms: the fraction of chunks whose multivariate statistic alerts;
- power: the fraction of chunks in which the shifted feature alerts.

    .venv/bin/python bench/monitoring_calibration.py [--references 6] [--reference-rows 1200]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from datetime import UTC, datetime
from pathlib import Path
from tempfile import mkdtemp

os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl

from driftloop.onnx_model import load_model, predict_scores
from driftloop.spec import MonitoringPolicy, load_spec
from driftloop.tasks.export import build_onnx
from driftloop.tasks.fit import fit_model, prepare_training_data
from driftloop.tasks.monitor import run_monitoring
from driftloop.tasks.score import prediction_frame
from driftloop.tasks.split import split_dataset
from tests.support.data import make_loans, write_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--references", type=int, default=6)
    parser.add_argument("--reference-rows", type=int, default=1200)
    parser.add_argument("--chunks", type=int, default=40, help="analysis chunks per stream")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    spec = load_spec(write_spec(Path(mkdtemp())))
    policies = {"calibrated (alert_rate 0.01)": MonitoringPolicy(), "NannyML default": MonitoringPolicy(alert_rate=None)}
    totals: dict[str, dict[str, list[float]]] = {k: {} for k in policies}
    for r in range(args.references):
        # A model trained on its own data; its holdout (the newest 15%) is the reference.
        frame = make_loans(round(args.reference_rows / 0.15), seed=100 + r)
        split = split_dataset(frame, spec, seed=0)
        data, encoding, _ = prepare_training_data(spec, split.train, split.valid)
        model = load_model(build_onnx(fit_model("xgboost", {"max_depth": 3}, data, seed=0), encoding, spec, {}))

        def scored(rows: pl.DataFrame, model=model) -> pl.DataFrame:
            return prediction_frame(model, spec, rows, predict_scores(model, rows), model_name="m", model_version=1,
                                    scored_at=datetime.now(UTC)).with_columns(rows[spec.target])

        reference = scored(split.holdout)
        chunk = len(reference) // 5
        stream = make_loans(args.chunks * chunk, seed=1000 + r)
        sd = float(stream["amount"].std())
        streams = {"stationary": stream, "shift 0.5 sd": stream.with_columns(pl.col("amount") + 0.5 * sd),
                   "shift 1 sd": stream.with_columns(pl.col("amount") + sd)}
        for kind, policy in policies.items():
            for name, rows in streams.items():
                report = run_monitoring(reference, scored(rows), spec, policy, with_plots=False)
                uni = report.rows("univariate")
                chunks = sorted({u["chunk_index"] for u in uni})
                stats = totals[kind]
                if name == "stationary":
                    stats.setdefault("univariate checks alerting", []).append(sum(u["alert"] for u in uni) / len(uni))
                    stats.setdefault("chunks with a univariate alert", []).append(
                        sum(any(u["alert"] for u in uni if u["chunk_index"] == c) for c in chunks) / len(chunks))
                    multi = report.rows("multivariate")
                    stats.setdefault("multivariate chunks alerting", []).append(sum(m["alert"] for m in multi) / len(multi))
                else:
                    hits = [u["alert"] for u in uni if u["name"] == "amount"]
                    stats.setdefault(f"power, amount {name}", []).append(sum(hits) / len(hits))
        print(f"reference {r + 1}/{args.references} done", file=sys.stderr)

    summary = {kind: {k: round(sum(v) / len(v), 4) for k, v in stats.items()} for kind, stats in totals.items()}
    width = max(len(k) for k in next(iter(summary.values())))
    print(f"{'':<{width}}  " + "  ".join(f"{k:>28}" for k in summary))
    for key in next(iter(summary.values())):
        print(f"{key:<{width}}  " + "  ".join(f"{summary[k][key]:>28.4f}" for k in summary))
    print(json.dumps({"references": args.references, "reference_rows": args.reference_rows, "chunks": args.chunks,
                      "results": summary}))


if __name__ == "__main__":
    main()
