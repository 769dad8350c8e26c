"""A year in the life of a model: what driftloop's automated loop buys over never
retraining and over retraining every period, on a world whose changes are known.

The world (``make_world``): 14 monthly periods of ``--rows`` loans-like rows each, with an
id, a timestamp and a segment (north, south, east). Features x1, x2, x3 (numbers), seg
(category) and flag (bool); the target y is a logistic function of them.

- months 0-4: stationary (month 0 is the first model's training data);
- months 5-7: a gradual covariate shift: x2's mean moves up by 0.6 sd a month and stays;
- month 9: an abrupt concept drift: the sign of x1's effect on y reverses, and stays;
- all year: a seasonal pattern: the base rate and x3's mean follow the calendar;
- labels arrive one period late: at the start of month m, month m-1's labels arrive.

Each month m >= 1, for each strategy, through the real flows (in-process, on a temporary
Prefect server): the labels of month m-1 are registered (`labels` flow), the strategy
decides, a retrain runs the `retrain` flow (the code the automation runs: lease, window,
train, gate against the champion on the newest labelled rows, promote), and the champion
scores month m (`score` flow). The bench knows month m's labels and records the champion's
realized ROC AUC on it.

- never: the first model forever;
- every: a retrain every month (the spec's window);
- driftloop: the `monitor` flow on month m-1's scored rows (now labelled), and a retrain
  only when its policy fires (here: on performance, estimated or realized; drift alone is
  reported, not acted on).

The backtest also chooses the retraining window: driftloop runs once per window in
``--windows`` and the one with the best mean AUC is reported (every-month retraining uses
the first). It prints a table per month, writes a chart (AUC per month, retrain marks)
and ends with one JSON line: periods, mean AUC and retrains per strategy, driftloop
retrains in stationary months, and drift events after which driftloop came back to
within 0.02 of retraining every month within two months.

A retrain at month m decides on labels up to month m-1 and learns from a window of past
months, so it is a response to a change in month m-1 or m-2 (the window still holding
the old world). A month is *stationary* for this count when nothing changed in the two
months before it.

    .venv/bin/python bench/loop.py [--rows 3000] [--trials 5] [--windows 31d,62d] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import polars as pl
import yaml

MONTHS = 14
START = datetime(2025, 1, 1)
SHIFT_MONTHS = {5: "covariate shift begins", 6: "covariate shift", 7: "covariate shift"}
CONCEPT_MONTH = 9
CHANGES = {**SHIFT_MONTHS, CONCEPT_MONTH: "concept drift"}
DRIFT_EVENTS = (5, CONCEPT_MONTH)  # where something starts to change
STRATEGIES = ("never", "every", "driftloop")


def month_start(m: int) -> datetime:
    return datetime(START.year + (START.month - 1 + m) // 12, (START.month - 1 + m) % 12 + 1, 1)


def make_world(m: int, rows: int, seed: int = 0) -> pl.DataFrame:
    """Month ``m`` of the world (see the module docstring)."""
    rng = np.random.default_rng(seed * 1000 + m)
    season = math.sin(2 * math.pi * m / 12)
    x1 = rng.normal(0, 1, rows)
    x2 = rng.normal(0.6 * min(max(m - 4, 0), 3), 1, rows)
    x3 = rng.normal(0.3 * season, 1, rows)
    seg = np.array(["north", "south", "east"])[rng.integers(0, 3, rows)]
    flag = rng.random(rows) < 0.4
    sign = -1.0 if m >= CONCEPT_MONTH else 1.0
    logit = sign * 1.6 * x1 + 1.2 * np.tanh(x2) + 0.8 * x3 * (seg == "north") + 0.7 * flag + 0.5 * season - 0.3
    y = (logit + rng.logistic(size=rows) > 0).astype(np.int64)
    span = (month_start(m + 1) - month_start(m)).total_seconds()
    ts = [month_start(m) + timedelta(seconds=float(s)) for s in np.sort(rng.uniform(0, span, rows))]
    return pl.DataFrame({
        "id": np.arange(m * 1_000_000, m * 1_000_000 + rows, dtype=np.int64), "ts": ts, "x1": x1, "x2": x2, "x3": x3,
        "seg": seg, "flag": flag, "y": y,
    }).with_columns(pl.col("ts").cast(pl.Datetime("us")))


def world_spec(window: str) -> dict[str, Any]:
    return {
        "name": "world", "task": "binary_classification", "target": "y", "id": "id", "timestamp": "ts", "segment": "seg",
        "columns": {
            "id": {"dtype": "int"}, "ts": {"dtype": "datetime"}, "x1": {"dtype": "float"}, "x2": {"dtype": "float"},
            "x3": {"dtype": "float"}, "seg": {"dtype": "category", "allowed": ["north", "south", "east"]},
            "flag": {"dtype": "bool"}, "y": {"dtype": "int", "allowed": [0, 1]},
        },
        "gate": {"metric": "roc_auc", "thresholds": {"roc_auc": {"min": 0.65}}, "max_regression": 0.01},
        "monitoring": {"multivariate_drift": False, "performance": {"alerts": 2, "of_last": 3}},
        "retrain": {"window": {"last": window}, "skip_recent": "0d", "min_new_labels": 1000, "min_improvement": 0.0},
    }


def auc(scored_dir: str, truth: pl.DataFrame) -> float:
    from sklearn.metrics import roc_auc_score

    from driftloop.outputs import read_predictions

    rows = read_predictions(scored_dir).join(truth.select("id", "y"), on="id")
    return float(roc_auc_score(rows["y"].to_numpy(), rows["probability"].to_numpy()))


def run_strategy(strategy: str, window: str, root: Path, data: dict[int, pl.DataFrame],
                 args: argparse.Namespace) -> list[dict[str, Any]]:
    from driftloop.flows.labels import ingest_labels
    from driftloop.flows.monitor import monitor
    from driftloop.flows.retrain import retrain
    from driftloop.flows.score import score
    from driftloop.flows.train import train

    home = root / f"{strategy}-{window}"
    os.environ["DRIFTLOOP_HOME"] = str(home)  # this strategy's own registry and artifacts
    files = home / "files"
    files.mkdir(parents=True, exist_ok=True)
    spec = files / "world.yaml"
    spec.write_text(yaml.safe_dump(world_spec(window), sort_keys=False))
    data[0].write_parquet(files / "month-00.parquet")
    train(spec_path=str(spec), source=str(files / "month-00.parquet"), trials=args.trials, algorithms=["lightgbm"])

    from driftloop.registry import open_registry
    from driftloop.settings import get_settings

    registry = open_registry(get_settings().registry_database_url())
    rows = []
    for m in range(1, MONTHS):
        why = ""
        retrained = False
        if m >= 2:
            labels = files / f"labels-{m - 1:02d}.parquet"
            data[m - 1].select("id", "y").write_parquet(labels)
            ingest_labels(spec_path=str(spec), source=str(labels))
            fired = strategy == "every"
            if strategy == "driftloop":
                watched = monitor(input_uri=str(files / f"scored-{m - 1:02d}"), model="world@champion")
                fired = watched.policy.fired
                why = "; ".join(watched.policy.reasons)
            if fired:
                result = retrain(model="world", trials=args.trials, algorithms=["lightgbm"], cooldown_s=0)
                retrained = not result.skipped
                why = (why + " -> " if why else "") + result.reason
        month = files / f"month-{m:02d}.parquet"
        data[m].drop("y").write_parquet(month)
        scored = score(input_uri=str(month), output_uri=str(files / f"scored-{m:02d}"), model="world@champion")
        rows.append({"month": m, "auc": auc(scored.output_uri, data[m]), "version": scored.version,
                     "retrained": retrained, "why": why, "change": CHANGES.get(m, "")})
        print(f"  {strategy:<9} {window:>4} month {m:>2}: AUC {rows[-1]['auc']:.4f} with v{scored.version}"
              + (f"  retrained: {why[:140]}" if retrained else ""), file=sys.stderr)
    registry.engine.dispose()
    return rows


def chart(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    colours = {"never": "#999999", "every": "#1f77b4", "driftloop": "#d62728"}
    for strategy, rows in results.items():
        months = [r["month"] for r in rows]
        ax.plot(months, [r["auc"] for r in rows], marker="o", ms=3, label=strategy, color=colours[strategy])
        marks = [r for r in rows if r["retrained"]]
        ax.scatter([r["month"] for r in marks], [r["auc"] for r in marks], marker="^", s=60, color=colours[strategy],
                   zorder=3, edgecolors="black", linewidths=0.5)
    ax.axvspan(4.5, 7.5, color="#f0e0a0", alpha=0.5, label="covariate shift")
    ax.axvline(CONCEPT_MONTH - 0.5, color="black", ls="--", lw=1, label="concept drift")
    ax.set_xlabel("month (triangles: a retrain before scoring it)")
    ax.set_ylabel("realized ROC AUC")
    ax.set_xticks(range(1, MONTHS))
    ax.legend(fontsize=7, ncol=5, loc="lower left")
    ax.set_title("A year in the life of a model: champion's ROC AUC per month", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def stationary(month: int) -> bool:
    """Nothing changed in the two months whose labels a retrain at ``month`` can see."""
    return not ({month - 1, month - 2} & set(CHANGES))


def summarise(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    every = {r["month"]: r["auc"] for r in results["every"]}
    ours = {r["month"]: r["auc"] for r in results["driftloop"]}
    recovered = 0
    for start in DRIFT_EVENTS:
        # Back within 0.02 of every-month retraining within two months of the change.
        if any(abs(ours[m] - every[m]) <= 0.02 for m in range(start, start + 3) if m in ours):
            recovered += 1
    return {
        "periods": len(results["never"]),
        "mean_auc": {s: round(float(np.mean([r["auc"] for r in rows])), 4) for s, rows in results.items()},
        "retrains": {s: sum(r["retrained"] for r in results[s]) for s in ("every", "driftloop")},
        "stationary_retrains": sum(r["retrained"] for r in results["driftloop"] if stationary(r["month"])),
        "drift_periods_recovered": recovered,
        "drift_events": len(DRIFT_EVENTS),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000, help="rows per month")
    parser.add_argument("--trials", type=int, default=5, help="Optuna trials per (re)train")
    parser.add_argument("--windows", default="31d,62d", help="retrain windows (retrain.window.last) to backtest")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="where the chart goes")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("driftloop").setLevel(logging.ERROR)

    from prefect.testing.utilities import prefect_test_harness

    started = time.monotonic()
    data = {m: make_world(m, args.rows) for m in range(MONTHS)}
    root = Path(tempfile.mkdtemp(prefix="driftloop-loop-"))
    results: dict[str, list[dict[str, Any]]] = {}
    windows = [w.strip() for w in args.windows.split(",") if w.strip()]
    by_window: dict[str, list[dict[str, Any]]] = {}
    with prefect_test_harness(server_startup_timeout=120):
        results["never"] = run_strategy("never", windows[0], root, data, args)
        results["every"] = run_strategy("every", windows[0], root, data, args)
        for window in windows:
            by_window[window] = run_strategy("driftloop", window, root, data, args)
    chosen = max(windows, key=lambda w: np.mean([r["auc"] for r in by_window[w]]))
    results["driftloop"] = by_window[chosen]

    print(f"{'month':>5}  {'change':<22}" + "".join(f"  {s + ' AUC':>14} {'ver':>4}" for s in STRATEGIES) + "  driftloop's reason")
    for i in range(MONTHS - 1):
        cells = "".join(
            f"  {results[s][i]['auc']:>13.4f}{'*' if results[s][i]['retrained'] else ' '} {'v' + str(results[s][i]['version']):>4}"
            for s in STRATEGIES
        )
        r = results["driftloop"][i]
        print(f"{r['month']:>5}  {r['change']:<22}{cells}  {r['why'][:110] if r['retrained'] else ''}")
    print("(* a retrain ran before the month was scored)")
    png = Path(args.out) / "loop.png"
    chart(results, png)
    summary = summarise(results)
    summary["window"] = {"chosen": chosen, "mean_auc": {w: round(float(np.mean([r["auc"] for r in rows])), 4)
                                                         for w, rows in by_window.items()}}
    print(f"chart: {png}; driftloop's window {chosen} (backtested: {summary['window']['mean_auc']}); every-month "
          f"retraining's window {windows[0]}; {args.rows} rows a month, {args.trials} trials; "
          f"{time.monotonic() - started:.0f} s")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
