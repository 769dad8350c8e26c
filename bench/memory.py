"""The loop's memory at size: a 92-day training window and monitoring's read, out of a
predictions table of 20 million scored rows (200 scoring runs) and a labels table of 20
million labels, against a plain polars scan of the same tables.

Setup (in a temp dir: the registry in SQLite, the artifact root local, so the Iceberg
catalog is the registry's own database): the spec ``bench_memory`` (int id, timestamp,
10 float features, a category segment, a 0/1 target; ``retrain.window: {last: 92d}``).
Each scoring run appends ``rows / runs`` rows in one commit through
:mod:`driftloop.tables` (the columns ``tasks.score.TableSink`` writes: id, timestamp,
features, segment, prediction, probability, model name and version, scored_at, scoring
run id, input key, scoring form, role), the runs' timestamps covering ~2 years one after
another and the model version changing every quarter of the runs. Each labels
registration appends as many labels: 95% of one run's ids, the rest corrections (the
opposite label) of ids of the run five before, so ids labelled twice make "the latest
registration wins" matter. The newest scored row is labelled. Building is chunked: its
memory is one run.

Then, each in a fresh child process (peak RSS = the child's ``VmHWM``, imports
included; seconds = wall clock of the read alone):

- ``window``: ``driftloop.feedback.collect_labelled_data`` with the spec's policy (last
  92d, pushed down) + ``select_window``: what a retrain does.
- ``plain_scan``: the baseline, plain polars without our logic on the same tables
  (``pl.scan_iceberg``, the same native reader): the newest scored timestamp, the served
  rows of the 92 days before it, inner-joined to the labels table's latest row per id
  (sort by registered_at, unique keep last), collected (streaming engine).
- ``monitor_read``: what ``flows/monitor.py`` does before NannyML for a time range:
  ``served_rows(model_version, since, until)`` collected, ``latest_labels`` of those ids collected,
  ``join_labels`` (left). NannyML itself is not run here (bench/monitoring.py times it
  on 1M rows; its cost does not depend on the tables).

The window's and the plain scan's rows are checked equal (count and order-free sums of
ids and targets). The last line is one JSON object:
{"rows", "labels", "runs", "window": {"seconds", "peak_rss_gb", ...}, "plain_scan": {...},
"monitor_read": {...}, "ratio_seconds": window / plain, "targets": {...}}; GB = 10^9 bytes.

    nice .venv/bin/python bench/memory.py                       # 20M rows, 200 runs
    .venv/bin/python bench/memory.py --rows 1000000             # a smaller run
    .venv/bin/python bench/memory.py --rows 1000000 --keep /tmp/mem1m   # keep (and reuse) the tables
"""

from __future__ import annotations

import os

os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import argparse
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

NAME = "bench_memory"
N_FEATURES = 10
FEATURES = [f"f{i}" for i in range(N_FEATURES)]
SEGMENTS = ["north", "south", "east", "west"]
TARGET = "label"
WINDOW = "92d"
SPAN_DAYS = 730  # the runs' timestamps cover ~2 years
VERSIONS = 4  # the model version changes every quarter of the runs
LABELLED = 0.95  # share of a run's ids a registration labels; the rest are corrections
CORRECTION_LAG = 5  # corrections are for ids of the run this many runs before
START = datetime(2024, 1, 1)
SEED = 20_250_118
TARGETS = {"peak_rss_gb": 1.5, "ratio_seconds": 1.5}

SPEC = {
    "name": NAME,
    "task": "binary_classification",
    "target": TARGET,
    "id": "id",
    "timestamp": "ts",
    "segment": "segment",
    "columns": {
        "id": {"dtype": "int"},
        "ts": {"dtype": "datetime"},
        **{f: {"dtype": "float"} for f in FEATURES},
        "segment": {"dtype": "category", "allowed": SEGMENTS},
        TARGET: {"dtype": "int", "allowed": [0, 1]},
    },
    "features": [*FEATURES, "segment"],
    "retrain": {"window": {"last": WINDOW}, "skip_recent": "0d", "min_new_labels": 0},
}


# --- setup ---------------------------------------------------------------------------


def environment(home: Path) -> tuple[Any, Any, Any]:
    """The registry (SQLite under ``home``), the tables and the spec."""
    os.environ["DRIFTLOOP_HOME"] = str(home)
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    from driftloop.registry import open_registry
    from driftloop.spec import parse_spec
    from driftloop.tables import open_tables

    registry = open_registry(f"sqlite:///{home / 'registry.db'}")
    tables = open_tables(registry.engine, str(home / "artifacts"))
    return registry, tables, parse_spec(SPEC, source="bench/memory.py")


def base_label(ids: np.ndarray) -> np.ndarray:
    """A label that depends on the id only (a correction is its opposite)."""
    return ((ids * 2_654_435_761) % 1_000 < 420).astype(np.int64)


def run_bounds(run: int, runs: int) -> tuple[datetime, datetime]:
    step = timedelta(days=SPAN_DAYS) / runs
    return START + run * step, START + (run + 1) * step


def scored_run(run: int, runs: int, n: int, rng: np.random.Generator) -> pl.DataFrame:
    """One scoring run's rows, as ``TableSink`` writes them."""
    first, last = run_bounds(run, runs)
    offsets = np.sort(rng.integers(0, int((last - first).total_seconds() * 1e6), n))
    x = rng.standard_normal((N_FEATURES, n))
    probability = 1.0 / (1.0 + np.exp(-(x[0] - 0.5 * x[1] + 0.3 * x[2])))
    version = 1 + run * VERSIONS // runs
    frame = pl.DataFrame({
        "id": np.arange(run * n, (run + 1) * n, dtype=np.int64),
        "ts": (np.datetime64(first, "us") + offsets.astype("timedelta64[us]")),
        **{name: x[i] for i, name in enumerate(FEATURES)},
        "segment": np.asarray(SEGMENTS)[rng.integers(0, len(SEGMENTS), n)],
        "prediction": (probability >= 0.5).astype(np.int64),
        "probability": probability,
    })
    return frame.with_columns(
        pl.lit(NAME).alias("model_name"),
        pl.lit(version, dtype=pl.Int64).alias("model_version"),
        pl.lit(last + timedelta(hours=2)).dt.replace_time_zone("UTC").dt.cast_time_unit("us").alias("scored_at"),
        pl.lit(str(uuid.UUID(int=rng.integers(0, 2**63).item()))).alias("scoring_run_id"),
        pl.lit(f"file:///data/nightly/{first:%Y-%m-%d}/data.parquet#{run:08x}").alias("input_key"),
        pl.lit("onnx").alias("scoring_form"),
        pl.lit("served").alias("role"),
    )


def label_registration(run: int, runs: int, n: int, rng: np.random.Generator) -> pl.DataFrame:
    """One registration of ``n`` labels: 95% of run ``run``'s ids (its newest row
    always), the rest corrections of ids of the run ``CORRECTION_LAG`` before."""
    ids = np.arange(run * n, (run + 1) * n, dtype=np.int64)
    if run >= CORRECTION_LAG:
        keep = rng.random(n) < LABELLED
        keep[-1] = True
        labelled = ids[keep]
        earlier = (run - CORRECTION_LAG) * n
        corrected = np.sort(rng.choice(n, n - labelled.size, replace=False)).astype(np.int64) + earlier
        label_ids = np.concatenate([labelled, corrected])
        targets = np.concatenate([base_label(labelled), 1 - base_label(corrected)])
    else:
        label_ids, targets = ids, base_label(ids)
    first, _ = run_bounds(run, runs)
    registered = START + timedelta(days=SPAN_DAYS + 1) + run * timedelta(hours=1)
    registration = str(uuid.UUID(int=rng.integers(0, 2**63).item()))
    return pl.DataFrame({"id": label_ids, TARGET: targets}).with_columns(
        pl.lit(first, dtype=pl.Datetime("us")).alias("label_timestamp"),
        pl.lit(registered).dt.replace_time_zone("UTC").dt.cast_time_unit("us").alias("registered_at"),
        pl.lit(f"file:///data/labels/{first:%Y-%m-%d}.csv").alias("source"),
        pl.lit(registration).alias("registration_id"),
    )


def build(home: Path, rows: int, runs: int) -> dict[str, Any]:
    """Append ``runs`` scoring runs and ``runs`` label registrations (one commit each)."""
    _, tables, spec = environment(home)
    n = rows // runs
    rng = np.random.default_rng(SEED)
    started = time.perf_counter()
    predictions = labels = None
    for run in range(runs):
        frame = scored_run(run, runs, n, rng)
        if predictions is None:
            predictions = tables.predictions(NAME, sample=frame, timestamp=spec.timestamp)
        writer = predictions.writer()
        writer.write(frame)
        writer.commit(properties={"driftloop.run-id": frame["scoring_run_id"][0], "driftloop.rows": str(n)})
        if (run + 1) % max(1, runs // 10) == 0:
            print(f"  predictions: {run + 1}/{runs} runs, {time.perf_counter() - started:.0f} s", flush=True)
    scored_s = time.perf_counter() - started
    started = time.perf_counter()
    for run in range(runs):
        frame = label_registration(run, runs, n, rng)
        if labels is None:
            labels = tables.labels(NAME, sample=frame)
        labels.append(frame, properties={"driftloop.registration-id": frame["registration_id"][0]})
        if (run + 1) % max(1, runs // 10) == 0:
            print(f"  labels: {run + 1}/{runs} registrations, {time.perf_counter() - started:.0f} s", flush=True)
    assert predictions is not None and labels is not None
    files = len(predictions.refresh().table.inspect.files())
    return {"rows": n * runs, "labels": n * runs, "runs": runs, "build_predictions_s": round(scored_s, 1),
            "build_labels_s": round(time.perf_counter() - started, 1), "predictions_files": files}


# --- the measured reads (child processes) --------------------------------------------


def checksum(frame: pl.DataFrame) -> dict[str, int]:
    """Order-free: the same rows give the same figures."""
    return frame.select(
        pl.len().alias("rows"), pl.col("id").sum().alias("id_sum"), pl.col(TARGET).sum().alias("target_sum"),
        (pl.col("id") * pl.col(TARGET)).sum().alias("id_target_sum"),
    ).row(0, named=True)


def read_window(home: Path) -> dict[str, Any]:
    from driftloop.feedback import collect_labelled_data, select_window

    registry, tables, spec = environment(home)
    started = time.perf_counter()
    data = collect_labelled_data(registry, tables, spec, policy=spec.retrain)
    window = select_window(data, spec, spec.retrain)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "start": window.record.start, "end": window.record.end,
            "labels_unscored": window.record.labels_unscored, **checksum(window.frame)}


def read_plain(home: Path) -> dict[str, Any]:
    """Plain polars on the same tables: no driftloop logic."""
    _, tables, spec = environment(home)
    predictions, labels = tables.predictions(NAME).table, tables.labels(NAME).table
    columns = ["id", "ts", *FEATURES, "segment"]
    started = time.perf_counter()
    scored = pl.scan_iceberg(predictions, reader_override="native").filter(pl.col("role") == "served")
    end = scored.select(pl.col("ts").max()).collect().item()
    latest = (
        pl.scan_iceberg(labels, reader_override="native").select("id", TARGET, "registered_at")
        .sort("registered_at").unique("id", keep="last").drop("registered_at")
    )
    window = (
        scored.filter(pl.col("ts") > end - spec.retrain.window.span, pl.col("ts") <= end).select(columns)
        .join(latest, on="id", how="inner")
        .collect(engine="streaming")
    )
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "end": str(end), **checksum(window)}


def read_monitor(home: Path) -> dict[str, Any]:
    """What the monitor flow reads for a time range: the version's served rows in
    [since, until), collected; the latest labels, collected; joined (left)."""
    from driftloop.feedback import join_labels, latest_labels, served_rows

    _, tables, spec = environment(home)
    newest = tables.predictions(NAME).scan().select(pl.col("ts").max(), pl.col("model_version").max()).collect()
    until = newest["ts"][0] + timedelta(microseconds=1)
    since = until - spec.retrain.window.span
    version = int(newest["model_version"][0])
    started = time.perf_counter()
    rows, _ = served_rows(tables, spec, model_version=version, since=since, until=until, bookkeeping=False)
    analysis = rows.collect()  # load_analysis_task
    lazy, _ = latest_labels(tables, spec, ids=analysis.select(spec.id).lazy())  # load_labels_task: the rows' ids only
    labels = lazy.collect()
    joined = join_labels(analysis, labels, spec)  # the flow, before NannyML
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "since": str(since), "until": str(until), "model_version": version,
            "rows": joined.height, "labels_collected": labels.height,
            "matched": int(joined[TARGET].is_not_null().sum())}


READS = {"window": read_window, "plain_scan": read_plain, "monitor_read": read_monitor}


def vm_hwm_kib() -> int | None:
    try:
        found = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), flags=re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) if found else None


def child(mode: str, home: Path) -> None:
    import resource

    logging.basicConfig(level=logging.WARNING)
    environment(home)  # imports and the catalog, before the read: not timed, but in the peak
    before = vm_hwm_kib()
    result = READS[mode](home)
    peak = vm_hwm_kib() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result |= {"peak_rss_gb": round(peak * 1024 / 1e9, 3), "before_rss_gb": round((before or 0) * 1024 / 1e9, 3)}
    print(json.dumps(result, default=str))


# Linux carries ru_maxrss across execve: a child exec'd straight from this process would
# start with its peak. A small trampoline in between starts the measured child fresh.
TRAMPOLINE = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def measure(mode: str, home: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-c", TRAMPOLINE, sys.executable, str(Path(__file__).resolve()), "--child", mode,
           "--home", str(home)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["seconds"] = round(result["seconds"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000_000, help="scored rows (and labels); default 20M")
    parser.add_argument("--runs", type=int, default=200, help="scoring runs (and label registrations); default 200")
    parser.add_argument("--keep", type=Path, help="build the tables here and keep them; reused when they match")
    parser.add_argument("--repeats", type=int, default=1, help="child runs per read; the fastest is kept")
    parser.add_argument("--child", choices=sorted(READS), help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.home)
        return

    print(f"bench/memory.py: {args.rows:,} rows over {args.runs} runs, {os.cpu_count()} CPUs, polars {pl.__version__}; "
          f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}", flush=True)
    scratch = None
    if args.keep:
        home = args.keep.resolve()
    else:
        scratch = tempfile.mkdtemp(prefix="bench-memory-")
        home = Path(scratch)
    try:
        marker = home / "bench-memory.json"
        wanted = {"rows": args.rows // args.runs * args.runs, "runs": args.runs, "seed": SEED}
        built = json.loads(marker.read_text()) if marker.exists() else None
        if built is None or {k: built.get(k) for k in wanted} != wanted:
            if home.exists() and args.keep:
                shutil.rmtree(home)
            home.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            built = build(home, args.rows, args.runs) | {"seed": SEED}
            marker.write_text(json.dumps(built))
            print(f"built in {time.perf_counter() - started:.0f} s: {json.dumps(built)}", flush=True)
        else:
            print(f"reusing the tables in {home}: {json.dumps(built)}", flush=True)

        results: dict[str, dict[str, Any]] = {}
        for mode in ("plain_scan", "window", "monitor_read"):
            runs = [measure(mode, home) for _ in range(args.repeats)]
            results[mode] = min(runs, key=lambda r: r["seconds"])
            print(f"  {mode}: {json.dumps(results[mode])}", flush=True)
        same = all(results["window"][k] == results["plain_scan"][k] for k in ("rows", "id_sum", "target_sum", "id_target_sum"))
        if not same:
            print("WARNING: the window and the plain scan hold different rows", flush=True)
        ratio = results["window"]["seconds"] / results["plain_scan"]["seconds"]
        for name, figure in (("peak_rss_gb", max(r["peak_rss_gb"] for r in results.values() if r is not results["plain_scan"])),
                             ("ratio_seconds", ratio)):
            print(f"{name}: {figure:.2f} (target <= {TARGETS[name]}: {'met' if figure <= TARGETS[name] else 'NOT met'})")
        print(f"load average at the end {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
        keys = ("seconds", "peak_rss_gb", "before_rss_gb", "rows")
        print(json.dumps({
            "rows": built["rows"], "labels": built["labels"], "runs": built["runs"],
            "window": {k: results["window"][k] for k in keys},
            "plain_scan": {k: results["plain_scan"][k] for k in keys},
            "monitor_read": {k: results["monitor_read"][k] for k in (*keys, "labels_collected")},
            "same_rows": same, "ratio_seconds": round(ratio, 2), "targets": TARGETS,
        }))
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
