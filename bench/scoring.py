"""Streamed batch scoring (``tasks.score.score_stream``) against native in-memory predict
and against the script a user would write instead.

What it measures, on seeded synthetic data (20 float features, an int id, binary target):

1. Throughput. For XGBoost (300 trees, depth 6) and LightGBM (300 trees, 63 leaves),
   trained on 200k rows with fixed parameters and exported with ``tasks.export.build_onnx``,
   at 1 and 2 threads:
     forms  -- every scoring form of each model built, verified and timed as registration
               does it (``tasks.form_builder.build_forms`` on 100k parity rows, 1 thread).
     ours   -- rows/s of ``score_stream`` end to end on a 1M-row Parquet file (Parquet in,
               validation, the form ``--engine auto`` picks, Parquet out) with that form's
               ``predict``. Auto picks with ``driftloop.forms.choose_form`` on the forms'
               speeds at the row's thread count, measured on registration's timing rows
               with ``rows_per_second`` (at 1 thread: registration's own figures; the
               1-thread choice is also reported as ``engine_registration``). Wall clock
               around the call; loading the model and the form is not timed.
     onnx   -- the same with the ONNX tree-kernel form (``--engine onnx``), the edge
               agent's only form, as ``load_form`` runs it: at 2 threads the halves of
               each batch on one 1-thread session (parallel batches, 1a).
     native -- rows/s of the library's own predict on the same 1M rows already in memory
               as a float32 matrix (XGBoost: ``DMatrix`` construction is *included*;
               LightGBM: ``Booster.predict(x, num_threads=t)``).
     script -- rows/s of the script a user writes without driftloop (``user_script``,
               printed in the header): read the Parquet file with polars, to a numpy
               matrix, the library's ``inplace_predict`` (XGBoost) / ``predict``
               (LightGBM) at the same thread count, write id + probability to Parquet.
               Same input file, same run.
   ratio_inmemory = ours / native, ratio_script = ours / script, and the same for the
   ONNX form (ratio_onnx_inmemory, ratio_onnx_script). Batch size for ``score_stream``:
   the fastest of a small sweep. Each figure is the best of ``--repeats`` runs (the
   machine is shared and noisy).
1a. The parallel-batches lever at 2 threads: each batch split in two halves scored at
   once in two threads by single-threaded scorers (ORT sessions with 1 intra-op thread,
   one shared -- what ``driftloop.forms.load_form`` does -- or two; XGBoost/LightGBM at
   nthread=1), against one call with 2 threads (one ORT session with 2 intra-op threads);
   in the streamed scorer, and for ORT also the kernel alone on rows in memory.
1b. The tensor-op form (``tasks.export_tensor``: standard ONNX ops, any execution provider)
   against the ONNX tree-kernel form, inference alone on CPU (``session.run`` on feeds
   built beforehand, ``--tensor-rows`` rows), each form on row slices of a small sweep
   (the tensor form runs fastest on slices that keep its [rows, trees] intermediates in
   cache), the best slice size reported.
2. Peak RSS. ``score_stream`` on 1M and on 5M rows, each in a fresh child process (this
   script with ``--child-rss``), peak read from ``getrusage(RUSAGE_SELF).ru_maxrss``.
   Target: peak(5M) < 1.2 x peak(1M).
3. Where the time goes, per 100k-row batch, run serially: Parquet read, validation
   (``validate_rows``), ONNX Runtime inference (``predict_scores``), building the output
   frame (``prediction_frame``) and writing it (Parquet, zstd); plus a few cheap
   experiments on a 25k-row batch (validation split, ONNX Runtime options, output
   compression).

4. The predictions table. ``score_to_table`` (the data centre's path: a ``TableSink`` into
   the model's Iceberg predictions table, catalog in a temp SQLite registry, one commit
   per run, each run a new input key so the table grows as it does nightly) beside
   ``score_stream`` (the directory/manifest path, now the edge's), the ONNX form, same
   file, batch size and threads, runs alternated: ``ratio_table_stream`` = table seconds
   / stream seconds (target <= 1.05). ``--table-only`` runs the setup and this section
   alone (batch size 100k).

Input Parquet files are written in 100k-row row groups (snappy), features as float64.

Run from the repository root:

    .venv/bin/python bench/scoring.py            # full run: 1M / 5M rows, 12+ minutes on 2 cores
    .venv/bin/python bench/scoring.py --quick    # smoke run: 100k / 500k rows
    .venv/bin/python bench/scoring.py --rows 200000   # 200k / 1M rows, full-size models
    .venv/bin/python bench/scoring.py --table-only    # table vs stream only, 1M rows
    .venv/bin/python bench/scoring.py --profile --rows 300000   # stage table + ours/table vs native vs script

The last line printed is one JSON object: {"results": [{"algorithm", "threads", "engine" (the
form auto chose), "ours_rows_s", "onnx_rows_s", "native_inmemory_rows_s",
"native_script_rows_s", "ratio_inmemory", "ratio_script", "ratio_onnx_inmemory",
"ratio_onnx_script", "engine_registration", "forms_rows_s", "kernel_rows_s",
"tensor_rows_s", "tensor_slice_rows"; at 2 threads also "onnx_halves_rows_s",
"onnx_halves_2sessions_rows_s", "onnx_intra2_rows_s", "kernel_intra2_rows_s",
"kernel_halves_rows_s",
"native_form_rows_s", "native_halves_rows_s"; "stream_rows_s", "table_rows_s",
"ratio_table_stream"}, ...], "rss_ratio_5m_1m": ..., "ratio_table_stream_worst": ...} (the RSS ratio
is big / small input, 5x the rows in every mode). A line "results so far: {...}" after the
throughput sections keeps the main figures if a long run is cut short.
"""

from __future__ import annotations

import os

os.environ["NML_DISABLE_USAGE_LOGGING"] = "1"

import argparse
import copy
import inspect
import json
import logging
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

N_FEATURES = 20
FEATURES = [f"f{i:02d}" for i in range(N_FEATURES)]
TARGET = "label"
ROW_GROUP_ROWS = 100_000
GEN_CHUNK_ROWS = 500_000
N_TREES = 300
SEED = 20_240_601

SPEC = {
    "name": "bench_scoring",
    "task": "binary_classification",
    "target": TARGET,
    "id": "id",
    "max_reject_fraction": 1.0,
    "columns": {
        "id": {"dtype": "int"},
        **{f: {"dtype": "float"} for f in FEATURES},
        TARGET: {"dtype": "int"},
    },
    "features": FEATURES,
}


@dataclass(frozen=True)
class Sizes:
    train_rows: int
    score_rows: int
    big_rows: int
    batch_sizes: tuple[int, ...]
    breakdown_batch: int
    breakdown_batches: int
    experiment_batch: int


FULL = Sizes(200_000, 1_000_000, 5_000_000, (50_000, 100_000, 250_000), 100_000, 5, 25_000)
QUICK = Sizes(50_000, 100_000, 500_000, (10_000, 25_000, 50_000), 25_000, 3, 10_000)
TENSOR_SLICES = (1_000, 4_000, 16_000)
TENSOR_ROWS = 200_000
PARITY_ROWS = 100_000  # rows build_forms verifies every form on (registration's PARITY_MIN_ROWS)


# --- data ------------------------------------------------------------------------------


def make_chunk(rng: np.random.Generator, first_id: int, n: int, *, labelled: bool) -> pa.Table:
    """``n`` rows: id, f00..f19 (float64, some heavy-tailed) and, if labelled, a 0/1 target
    with interactions and non-linear terms, so the trees have something to split on."""
    x = rng.standard_normal((N_FEATURES, n))
    x[10:15] = np.exp(0.5 * x[10:15])  # log-normal columns
    columns: dict[str, Any] = {"id": np.arange(first_id, first_id + n, dtype=np.int64)}
    columns |= {name: x[i] for i, name in enumerate(FEATURES)}
    if labelled:
        weights = np.linspace(1.0, -0.6, 8)
        logit = (
            weights @ x[:8]
            + 0.8 * x[0] * x[1]
            - 0.7 * np.abs(x[2])
            + np.sin(2.0 * x[3])
            + 0.6 * (x[4] > 0.5) * x[5]
            + 0.4 * np.log(x[10]) * x[11]
        )
        columns[TARGET] = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    return pa.table(columns)


def write_input(path: Path, rows: int, seed: int) -> None:
    """A scoring input (id + features, no target), generated and written chunk by chunk."""
    rng = np.random.default_rng(seed)
    writer: pq.ParquetWriter | None = None
    try:
        for start in range(0, rows, GEN_CHUNK_ROWS):
            chunk = make_chunk(rng, start, min(GEN_CHUNK_ROWS, rows - start), labelled=False)
            if writer is None:
                writer = pq.ParquetWriter(path, chunk.schema, compression="snappy")
            writer.write_table(chunk, row_group_size=ROW_GROUP_ROWS)
    finally:
        if writer is not None:
            writer.close()


# --- models ----------------------------------------------------------------------------


@dataclass
class Model:
    algorithm: str
    fitted: Any  # tasks.fit.FittedModel
    onnx: bytes
    trees: int
    train_s: float
    tensor: bytes = b""  # the tensor-op form (tasks.export_tensor)


def train_models(spec: Any, train: pl.DataFrame, threads: int, *, tensor: bool = True) -> tuple[Any, list[Model]]:
    """XGBoost and LightGBM with fixed parameters and exactly ``N_TREES`` trees, exported
    (``tensor``: also the tensor-op form)."""
    import lightgbm as lgb
    import xgboost as xgb

    from driftloop.features import fit_encoding, target_vector
    from driftloop.tasks.export import build_onnx
    from driftloop.tasks.export_tensor import build_tensor_onnx
    from driftloop.tasks.fit import FittedModel, round_lightgbm_thresholds

    encoding = fit_encoding(spec, train)
    x, y = encoding.matrix(train), target_vector(spec, train)
    metadata = {"spec": spec.model_dump(mode="json"), "classes": None}
    models = []

    started = time.perf_counter()
    xgb_params = {
        "objective": "binary:logistic",
        "eval_metric": "logloss",
        "tree_method": "hist",
        "max_depth": 6,
        "learning_rate": 0.1,
        "nthread": threads,
        "seed": 0,
        "verbosity": 0,
    }
    booster = xgb.train(xgb_params, xgb.DMatrix(x, label=y), num_boost_round=N_TREES)
    fitted = FittedModel("xgboost", booster, xgb_params, N_TREES, float("nan"))
    elapsed = time.perf_counter() - started
    models.append(
        Model(
            "xgboost",
            fitted,
            build_onnx(fitted, encoding, spec, metadata),
            booster.num_boosted_rounds(),
            elapsed,
            build_tensor_onnx(fitted, encoding, spec, metadata) if tensor else b"",
        )
    )

    started = time.perf_counter()
    lgb_params = {
        "objective": "binary",
        "num_leaves": 63,
        "learning_rate": 0.1,
        "num_threads": threads,
        "seed": 0,
        "deterministic": True,
        "force_row_wise": True,
        "verbose": -1,
    }
    raw = lgb.train(lgb_params, lgb.Dataset(x, label=y), num_boost_round=N_TREES)
    booster = round_lightgbm_thresholds(raw.model_to_string())
    fitted = FittedModel("lightgbm", booster, lgb_params, N_TREES, float("nan"))
    elapsed = time.perf_counter() - started
    models.append(
        Model(
            "lightgbm",
            fitted,
            build_onnx(fitted, encoding, spec, metadata),
            booster.num_trees(),
            elapsed,
            build_tensor_onnx(fitted, encoding, spec, metadata) if tensor else b"",
        )
    )
    return encoding, models


def native_predict(model: Model, x: np.ndarray, threads: int) -> tuple[np.ndarray, float]:
    """P(class 1) from the native booster and the seconds it took (XGBoost: DMatrix included)."""
    booster = model.fitted.booster
    if model.algorithm == "xgboost":
        import xgboost as xgb

        booster.set_param({"nthread": threads})
        started = time.perf_counter()
        scores = booster.predict(xgb.DMatrix(x, nthread=threads))
    else:
        started = time.perf_counter()
        scores = booster.predict(x, num_threads=threads)
    return np.asarray(scores), time.perf_counter() - started


def user_script(booster: Any, algorithm: str, input_path: Path, output_path: Path, threads: int) -> None:
    """The peer a user writes without driftloop: no validation, no quarantine, no atomic
    commit, the whole file in memory at once."""
    frame = pl.read_parquet(input_path)
    x = frame.select(FEATURES).to_numpy()
    if algorithm == "xgboost":
        booster.set_param({"nthread": threads})
        probability = booster.inplace_predict(x)
    else:
        probability = booster.predict(x, num_threads=threads)
    pl.DataFrame({"id": frame["id"], "probability": probability}).write_parquet(output_path)


def script_once(model: Model, input_path: Path, out_root: Path, threads: int) -> float:
    """Seconds for one run of ``user_script`` on the input file."""
    out = out_root / "script-scored.parquet"
    started = time.perf_counter()
    user_script(model.fitted.booster, model.algorithm, input_path, out, threads)
    elapsed = time.perf_counter() - started
    out.unlink()
    return elapsed


def inference_seconds(session: Any, output: str, feed: dict[str, np.ndarray], slice_rows: int) -> float:
    """Seconds for ``session.run`` over the feed in slices of ``slice_rows`` rows."""
    rows = len(next(iter(feed.values())))
    started = time.perf_counter()
    for start in range(0, rows, slice_rows):
        session.run([output], {name: values[start:start + slice_rows] for name, values in feed.items()})
    return time.perf_counter() - started


# --- measurements ----------------------------------------------------------------------


def tensor_vs_kernel(
    models: list[Model], frame: pl.DataFrame, repeats: int, batch_size: int, results: list[dict[str, Any]]
) -> list[list[str]]:
    """Rows/s of both ONNX forms on the same in-memory rows; adds ``kernel_rows_s``,
    ``tensor_rows_s`` and ``tensor_slice_rows`` to the matching ``results`` entries."""
    from driftloop.onnx_model import input_feed, load_model

    lines = []
    rows = frame.height
    for model in models:
        for threads in (1, 2):
            kernel = load_model(model.onnx, threads=threads)
            feed = input_feed(kernel, frame)
            output = kernel.metadata["score_output"]
            # Both forms at their best slice size (the kernel's barely depends on it).
            kernel_slices = sorted({batch_size, *TENSOR_SLICES})
            kernel_s = min(
                best_of(
                    repeats,
                    lambda k=kernel, f=feed, o=output, s=s: inference_seconds(k.session, o, f, s),
                )
                for s in kernel_slices
            )
            tensor = load_model(model.tensor, threads=threads)
            tensor_s = {
                slice_rows: best_of(
                    repeats,
                    lambda t=tensor, f=feed, o=output, s=slice_rows: inference_seconds(t.session, o, f, s),
                )
                for slice_rows in TENSOR_SLICES
            }
            best_slice = min(tensor_s, key=tensor_s.__getitem__)
            for entry in results:
                if entry["algorithm"] == model.algorithm and entry["threads"] == threads:
                    entry["kernel_rows_s"] = round(rows / kernel_s)
                    entry["tensor_rows_s"] = round(rows / tensor_s[best_slice])
                    entry["tensor_slice_rows"] = best_slice
            lines.append(
                [
                    f"{model.algorithm} ({tensor.metadata['tensor_layout']}, depth {tensor.metadata['depth']})",
                    str(threads),
                    rate(rows, kernel_s),
                    *(rate(rows, tensor_s[s]) for s in TENSOR_SLICES),
                    f"{kernel_s / tensor_s[best_slice]:.2f}",
                ]
            )
            print(f"  {model.algorithm} t={threads} done", flush=True)
    return lines


def best_of(repeats: int, run: Callable[[], float]) -> float:
    """The shortest of ``repeats`` timings (seconds)."""
    return min(run() for _ in range(repeats))


def score_once(
    onnx: bytes,
    input_path: Path,
    out_root: Path,
    *,
    threads: int,
    batch_size: int,
    rows: int,
    scorer: Callable[[Any], Callable[[pl.DataFrame], np.ndarray]] | None = None,
) -> float:
    """Seconds for one end-to-end ``score_stream`` run (model and form loading excluded).
    ``scorer`` turns the ONNX descriptor (loaded at ``threads``) into the ``predict`` of
    another form; by default the ONNX form scores."""
    from driftloop.onnx_model import load_model
    from driftloop.tasks.score import score_stream

    model = load_model(onnx, threads=threads)
    predict = scorer(model) if scorer is not None else None
    out = out_root / "scored"
    started = time.perf_counter()
    result = score_stream(
        model,
        str(input_path),
        str(out),
        model_name="bench",
        model_version=1,
        batch_size=batch_size,
        predict=predict,
    )
    elapsed = time.perf_counter() - started
    if result.rows_scored != rows or result.rows_quarantined:
        raise RuntimeError(
            f"scored {result.rows_scored} of {rows} rows ({result.rows_quarantined} quarantined)"
        )
    shutil.rmtree(out)
    return elapsed


@dataclass
class TableTarget:
    """A temp registry (SQLite) and artifact root: the predictions table a central
    scoring run appends to (``tasks.score.TableSink``)."""

    tables: Any  # driftloop.tables.Tables
    store: Any  # driftloop.storage.ArtifactStore
    runs: int = 0


def table_target(root: Path) -> TableTarget:
    from driftloop.registry import open_registry
    from driftloop.storage import ArtifactStore
    from driftloop.tables import open_tables

    root.mkdir(parents=True, exist_ok=True)
    registry = open_registry(f"sqlite:///{root / 'registry.db'}")
    artifacts = str(root / "artifacts")
    return TableTarget(open_tables(registry.engine, artifacts), ArtifactStore(artifacts))


def table_once(
    onnx: bytes,
    input_path: Path,
    target: TableTarget,
    *,
    threads: int,
    batch_size: int,
    rows: int,
    scorer: Callable[[Any], Callable[[pl.DataFrame], np.ndarray]] | None = None,
) -> float:
    """Seconds for one end-to-end ``score_to_table`` run (model and form loading
    excluded): the same stream of batches as ``score_once``, into the model's predictions
    table through a ``TableSink``, committed once (the replace of an earlier run of the
    same input included). Each run is a new input (a new input key: a nightly batch), so
    the table grows by ``rows`` per run, as it does in production."""
    import uuid

    from driftloop.onnx_model import load_model
    from driftloop.tasks.score import TableSink, score_to_table

    model = load_model(onnx, threads=threads)
    predict = scorer(model) if scorer is not None else None
    target.runs += 1
    sink = TableSink(target.tables, target.store, model.spec(), model_name="bench", run_id=str(uuid.uuid4()),
                     input_key=f"{input_path.as_uri()}#run-{target.runs}", form="onnx")
    started = time.perf_counter()
    result = score_to_table(model, str(input_path), sink, model_version=1, batch_size=batch_size, predict=predict)
    elapsed = time.perf_counter() - started
    if result.rows_scored != rows or result.rows_quarantined or result.snapshot_id is None:
        raise RuntimeError(
            f"scored {result.rows_scored} of {rows} rows ({result.rows_quarantined} quarantined) "
            f"into snapshot {result.snapshot_id}"
        )
    return elapsed


def table_vs_stream(
    models: list[Model], score_path: Path, tmp: Path, *, rows: int, batch_size: int, repeats: int,
    results: list[dict[str, Any]],
) -> list[list[str]]:
    """Rows/s of ``score_to_table`` (the data centre's path) beside ``score_stream`` (the
    directory/manifest path), the ONNX form as ``load_form`` runs it, same input file,
    batch size and threads, runs alternated; adds ``stream_rows_s``, ``table_rows_s`` and
    ``ratio_table_stream`` (table seconds / stream seconds) to the matching ``results``
    entries (made when missing)."""
    lines = []
    for model in models:
        target = table_target(tmp / f"table-{model.algorithm}")
        for threads in (1, 2):
            scorer = lambda d, m=model, t=threads: form_predict("onnx", m.onnx, d, t)
            stream_times, table_times = [], []
            for _ in range(repeats):
                stream_times.append(score_once(model.onnx, score_path, tmp, threads=threads, batch_size=batch_size,
                                               rows=rows, scorer=scorer))
                table_times.append(table_once(model.onnx, score_path, target, threads=threads,
                                              batch_size=batch_size, rows=rows, scorer=scorer))
            stream_s, table_s = min(stream_times), min(table_times)
            entry = next((r for r in results if r["algorithm"] == model.algorithm and r["threads"] == threads), None)
            if entry is None:
                entry = {"algorithm": model.algorithm, "threads": threads}
                results.append(entry)
            entry |= {
                "stream_rows_s": round(rows / stream_s),
                "table_rows_s": round(rows / table_s),
                "ratio_table_stream": round(table_s / stream_s, 3),
            }
            lines.append([model.algorithm, str(threads), rate(rows, stream_s), rate(rows, table_s),
                          f"{table_s / stream_s:.3f}",
                          " ".join(f"{s:.2f}" for s in stream_times), " ".join(f"{s:.2f}" for s in table_times)])
            print(f"  {model.algorithm} t={threads}: stream {stream_s:.2f} s, table {table_s:.2f} s", flush=True)
    return lines


# --- scoring forms and --engine auto ------------------------------------------------------


@dataclass
class Forms:
    """The verified forms of one bench model (``tasks.form_builder.build_forms``), as registered."""

    built: Any  # tasks.form_builder.FormsBuilt
    records: list[Any]  # driftloop.forms.FormRecord, rows_per_s measured at 1 thread


def register_forms(model: Model, encoding: Any, spec: Any, parity: pl.DataFrame) -> Forms:
    """What registration does: build, verify and time (1 thread) every form of the model."""
    import hashlib

    from driftloop.tasks.form_builder import build_forms

    built = build_forms(model.fitted, encoding, spec, model.onnx, parity)
    records = [
        form.record(f"bench://{model.algorithm}/{form.kind}", hashlib.sha256(form.data).hexdigest())
        for form in built.forms
    ]
    return Forms(built, records)


def form_predict(
    kind: str, data: bytes, descriptor: Any, threads: int
) -> Callable[[pl.DataFrame], np.ndarray]:
    """The ``predict`` of a verified form at ``threads`` (``driftloop.forms.load_form``)."""
    from driftloop.forms import FormRecord, load_form

    record = FormRecord(
        kind=kind, uri="bench://", sha256="", parity_rows=0, parity_max_abs_diff=0.0,
        parity_flips=0, rows_per_s=0.0,
    )
    return load_form(record, descriptor, data, threads=threads).predict


def forms_at(forms: Forms, onnx: bytes, frame: pl.DataFrame, threads: int) -> list[Any]:
    """The registered records with ``rows_per_s`` re-measured at ``threads`` on the same
    timing rows as registration (``tasks.form_builder.TIMING_ROWS``, ``rows_per_second``)."""
    from driftloop.forms import rows_per_second
    from driftloop.onnx_model import load_model
    from driftloop.tasks.form_builder import TIMING_ROWS

    if threads == 1:
        return forms.records
    rows = frame.head(TIMING_ROWS)
    records = []
    for built, record in zip(forms.built.forms, forms.records, strict=True):
        descriptor = load_model(onnx, threads=threads)
        speed = rows_per_second(form_predict(built.kind, built.data, descriptor, threads), rows)
        records.append(record.model_copy(update={"rows_per_s": speed}))
    return records


# --- the parallel-batches lever: halves of each batch on two threads, 1 thread each -------


def halves_predict(
    first: Callable[[pl.DataFrame], np.ndarray],
    second: Callable[[pl.DataFrame], np.ndarray] | None = None,
    min_rows: int = 2_048,
) -> Callable[[pl.DataFrame], np.ndarray]:
    """Single-threaded scorers (an ORT session with 1 intra-op thread, or XGBoost with
    nthread=1) on the two halves of each batch at once: ``first`` in a helper thread,
    ``second`` (default: ``first`` again) in the caller's. ORT and XGBoost release the GIL."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-half")
    other = second or first

    def predict(frame: pl.DataFrame) -> np.ndarray:
        if frame.height < min_rows:
            return other(frame)
        half = (frame.height + 1) // 2
        head = pool.submit(first, frame.slice(0, half))
        tail = other(frame.slice(half))
        return np.concatenate([head.result(), tail])

    return predict


def onnx_halves(onnx: bytes, *, sessions: int) -> Callable[[Any], Callable[[pl.DataFrame], np.ndarray]]:
    """A ``score_once`` scorer: the ONNX form on halves, on one shared 1-thread session
    (``session.run`` is thread-safe) or on two 1-thread sessions."""
    from driftloop.onnx_model import load_model, predict_scores

    def scorer(_descriptor: Any) -> Callable[[pl.DataFrame], np.ndarray]:
        first = load_model(onnx, threads=1)
        second = load_model(onnx, threads=1) if sessions == 2 else first
        return halves_predict(
            lambda frame: predict_scores(first, frame), lambda frame: predict_scores(second, frame)
        )

    return scorer


def native_halves(data: bytes) -> Callable[[Any], Callable[[pl.DataFrame], np.ndarray]]:
    """A ``score_once`` scorer: the native form at nthread=1 on the two halves of each batch."""

    def scorer(descriptor: Any) -> Callable[[pl.DataFrame], np.ndarray]:
        return halves_predict(form_predict("native", data, descriptor, 1))

    return scorer


def kernel_halves_seconds(onnx: bytes, frame: pl.DataFrame, batch_size: int, repeats: int) -> tuple[float, float]:
    """ORT inference alone (feeds built beforehand) on ``frame`` in ``batch_size`` slices:
    one session with 2 intra-op threads vs halves of each slice on two 1-thread sessions."""
    from concurrent.futures import ThreadPoolExecutor

    from driftloop.onnx_model import input_feed, load_model

    two = load_model(onnx, threads=2)
    output = two.metadata["score_output"]
    feed = input_feed(two, frame)
    intra = best_of(repeats, lambda: inference_seconds(two.session, output, feed, batch_size))
    ones = [load_model(onnx, threads=1).session for _ in range(2)]
    pool = ThreadPoolExecutor(max_workers=1)

    def run() -> float:
        started = time.perf_counter()
        for start in range(0, frame.height, batch_size):
            stop = min(frame.height, start + batch_size)
            mid = (start + stop + 1) // 2
            first = pool.submit(ones[0].run, [output], {k: v[start:mid] for k, v in feed.items()})
            ones[1].run([output], {k: v[mid:stop] for k, v in feed.items()})
            first.result()
        return time.perf_counter() - started

    halves = best_of(repeats, run)
    pool.shutdown()
    return intra, halves


def proc_status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` figure in KiB (Linux), for a cross-check of ru_maxrss."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field}:\s+(\d+) kB", text, flags=re.MULTILINE)
    return int(found.group(1)) if found else None


def child_rss(onnx_path: str, input_path: str, batch_size: int, threads: int) -> None:
    """Child mode: score one file, print peak RSS (and the RSS before scoring) as JSON."""
    from driftloop.onnx_model import load_model
    from driftloop.tasks.score import score_stream

    model = load_model(Path(onnx_path).read_bytes(), threads=threads)
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
        started = time.perf_counter()
        result = score_stream(
            model,
            input_path,
            f"{tmp}/scored",
            model_name="bench",
            model_version=1,
            batch_size=batch_size,
        )
        elapsed = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "rows": result.rows_scored,
                "seconds": elapsed,
                "before_kib": before_kib,
                "peak_kib": peak_kib,
                "vm_hwm_kib": proc_status_kib("VmHWM"),
            }
        )
    )


# Linux carries ru_maxrss across execve: a child exec'd straight from this (large) process
# would start with this process's peak. A small trampoline process in between starts the
# measured child from its own few-MiB image instead.
TRAMPOLINE = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def measure_rss(onnx_path: Path, input_path: Path, batch_size: int, threads: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-c",
        TRAMPOLINE,
        sys.executable,
        str(Path(__file__).resolve()),
        "--child-rss",
        str(onnx_path),
        str(input_path),
        "--batch-size",
        str(batch_size),
        "--threads",
        str(threads),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@dataclass
class Stages:
    read: list[float]
    validate: list[float]
    infer: list[float]
    build: list[float]
    write: list[float]


def stage_times(
    onnx: bytes,
    spec: Any,
    input_path: Path,
    out_dir: Path,
    *,
    threads: int,
    batch_size: int,
    batches: int,
) -> Stages:
    """Each stage of the scoring loop, timed separately and serially, per batch."""
    from datetime import UTC, datetime

    from driftloop.onnx_model import load_model, predict_scores
    from driftloop.tasks.score import prediction_frame
    from driftloop.tasks.validate import validate_rows

    model = load_model(onnx, threads=threads)
    stages = Stages([], [], [], [], [])
    reader = pq.ParquetFile(input_path).iter_batches(batch_size=batch_size, use_threads=False)  # as driftloop.inputs reads
    scored_at = datetime.now(UTC)
    for index in range(batches):
        t0 = time.perf_counter()
        frame = pl.from_arrow(next(reader))
        t1 = time.perf_counter()
        valid = validate_rows(frame, spec, labelled=False, warn_ignored=False).valid
        t2 = time.perf_counter()
        scores = predict_scores(model, valid)
        t3 = time.perf_counter()
        out = prediction_frame(
            model, spec, valid, scores, model_name="bench", model_version=1, scored_at=scored_at
        )
        t4 = time.perf_counter()
        out.write_parquet(out_dir / f"part-{index:05d}.parquet", compression="zstd")
        t5 = time.perf_counter()
        for bucket, seconds in zip(
            (stages.read, stages.validate, stages.infer, stages.build, stages.write),
            (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4),
            strict=True,
        ):
            bucket.append(seconds)
    return stages


def paired(runs: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of ``a`` / ``b`` within each round: robust to the machine's speed
    drifting between rounds (other tenants of the host), which a best-of is not."""
    return round(statistics.median(x / y for x, y in zip(runs[a], runs[b], strict=True)), 3)


def median_ms(values: list[float]) -> float:
    return 1000.0 * statistics.median(values)


def timed(run: Callable[[], Any], repeats: int = 5) -> float:
    """Median milliseconds of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return median_ms(times)


def experiments(
    models: list[Model], spec: Any, input_path: Path, out_dir: Path, batch_size: int
) -> list[str]:
    """Cheap what-ifs on one batch: validation split, ONNX Runtime options, compression."""
    from datetime import UTC, datetime

    import onnxruntime as ort

    from driftloop.onnx_model import input_feed, load_model, predict_scores
    from driftloop.schema import build_schema_for
    from driftloop.tasks.export import _convert_ensemble, binary_classifier_as_margin
    from driftloop.tasks.score import prediction_frame
    from driftloop.tasks.validate import coerce_to_spec, validate_rows

    lines = []
    frame = pl.from_arrow(next(pq.ParquetFile(input_path).iter_batches(batch_size=batch_size)))
    columns = spec.schema_columns(labelled=False)

    typed, _ = coerce_to_spec(frame, columns)
    schema = build_schema_for(columns, spec.name)
    lines.append(
        f"validation of {frame.height:,} rows: validate_rows {timed(lambda: validate_rows(frame, spec, labelled=False, warn_ignored=False)):.1f} ms"
        f" = coerce_to_spec {timed(lambda: coerce_to_spec(frame, columns)):.1f} ms"
        f" + pandera schema.validate {timed(lambda: schema.validate(typed, lazy=True)):.1f} ms (+ bookkeeping)"
    )
    lines.append(
        "  the same checks in plain polars (cast, fill_nan, is_finite, is_first_distinct): "
        f"{timed(lambda: plain_checks(frame)):.1f} ms"
    )

    valid = validate_rows(frame, spec, labelled=False, warn_ignored=False).valid
    x = np.ascontiguousarray(valid.select(FEATURES).to_numpy().astype(np.float32))
    for model in models:
        for threads in (1, 2):
            loaded = load_model(model.onnx, threads=threads)
            name = loaded.metadata["score_output"]
            feed = input_feed(loaded, valid)
            feed_ms = timed(lambda loaded=loaded: input_feed(loaded, valid))
            run_ms = timed(
                lambda loaded=loaded, feed=feed, name=name: loaded.session.run([name], feed)
            )

            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            no_spin = ort.InferenceSession(
                model.onnx, sess_options=opts, providers=["CPUExecutionProvider"]
            )
            no_spin_ms = timed(lambda s=no_spin, feed=feed, name=name: s.run([name], feed))

            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            classifier = _convert_ensemble(model.fitted, N_FEATURES)
            margin = copy.deepcopy(classifier)
            binary_classifier_as_margin(margin)
            ensemble_ms = {}
            for form, onnx_model in (("TreeEnsembleClassifier", classifier), ("regressor + Sigmoid", margin)):
                matrix = ort.InferenceSession(
                    onnx_model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
                )
                ensemble_ms[form] = timed(lambda s=matrix: s.run(["probabilities"], {"features": x}))
            lines.append(
                f"{model.algorithm:8s} t={threads} ORT on {frame.height:,} rows: input_feed {feed_ms:.1f} ms, "
                f"session.run {run_ms:.1f} ms; allow_spinning=0: {no_spin_ms:.1f} ms; "
                "tree ensemble alone on one [N,20] matrix (no Concat): "
                + ", ".join(f"as {form} {ms:.1f} ms" for form, ms in ensemble_ms.items())
            )

    loaded = load_model(models[0].onnx, threads=1)
    out = prediction_frame(
        loaded,
        spec,
        valid,
        predict_scores(loaded, valid),
        model_name="bench",
        model_version=1,
        scored_at=datetime.now(UTC),
    )
    sizes = []
    for compression, level in (
        ("zstd", None),
        ("zstd", 1),
        ("lz4", None),
        ("snappy", None),
        ("uncompressed", None),
    ):
        label = compression if level is None else f"{compression}(level {level})"
        path = out_dir / f"compression-{compression}-{level}.parquet"
        ms = timed(
            lambda path=path, c=compression, lv=level: out.write_parquet(
                path, compression=c, compression_level=lv
            )
        )
        sizes.append(f"{label} {ms:.1f} ms ({path.stat().st_size / 1e6:.1f} MB)")
    lines.append(f"writing one {out.height:,}-row output part: " + ", ".join(sizes))
    return lines


def plain_checks(frame: pl.DataFrame) -> pl.DataFrame:
    """What validation does for this spec, written directly in polars (for comparison)."""
    typed = frame.select(
        pl.col("id").cast(pl.Int64), *(pl.col(f).cast(pl.Float64).fill_nan(None) for f in FEATURES)
    )
    bad = pl.any_horizontal(
        ~pl.col("id").is_first_distinct(),
        pl.col("id").is_null(),
        *(pl.col(f).is_null() | ~pl.col(f).is_finite() for f in FEATURES),
    )
    return typed.filter(~typed.select(bad.alias("bad"))["bad"])


# --- output ----------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        padded = (
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return " | ".join(padded)

    return "\n".join([line(headers), "-+-".join("-" * w for w in widths), *(line(r) for r in rows)])


def mib(kib: int) -> str:
    return f"{kib / 1024:,.0f}"


def rate(rows: int, seconds: float) -> str:
    return f"{rows / seconds:,.0f}"


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 76 - len(title)), flush=True)


def table_section(models: list[Model], score_path: Path, tmp: Path, *, rows: int, batch_size: int, repeats: int,
                  results: list[dict[str, Any]]) -> None:
    section(
        f"the predictions table: score_to_table (TableSink) vs score_stream, ONNX form, {rows:,} rows, "
        f"batch size {batch_size:,}"
    )
    lines = table_vs_stream(models, score_path, tmp, rows=rows, batch_size=batch_size, repeats=repeats,
                            results=results)
    print(table(["algorithm", "threads", "stream rows/s", "table rows/s", "table / stream seconds",
                 "stream runs s", "table runs s"], lines))
    worst = worst_table_ratio(results)
    print(
        "stream: score_stream into a directory (parts + manifest; the edge path). table: score_to_table into the "
        "model's Iceberg predictions table (catalog in a temp SQLite registry), one commit per run, each run a new "
        "input key (the table grows by the input's rows per run). Same file, batch size and threads, runs alternated, "
        f"best of {repeats}.\nworst table / stream seconds {worst:.3f} (target <= 1.05: "
        f"{'met' if worst <= 1.05 else 'NOT met'})"
    )


def worst_table_ratio(results: list[dict[str, Any]]) -> float:
    return max((r["ratio_table_stream"] for r in results if "ratio_table_stream" in r), default=float("nan"))


# --- --profile: where the time of the fastest verified form goes, per batch ---------------


def profile_stages(model: Model, data: bytes, kind: str, spec: Any, input_path: Path, out_root: Path, *,
                   threads: int, batch_size: int, batches: int) -> dict[str, list[float]]:
    """Each stage of ``score_batches`` for form ``kind`` (bytes ``data``), timed serially
    per batch with the functions the scorer runs: read (the input reader's Parquet batch
    to polars), validate (``validate_rows`` with the earlier batches' ids), matrix (the
    form's input), predict (the form's kernel at ``threads``), conform (the output rows:
    ``prediction_frame``), write (a Parquet part, as ``score_stream`` writes it) and
    table (the same rows through ``TableSink``: tags, conform, an Iceberg data file)."""
    import uuid
    from datetime import UTC, datetime

    from driftloop import outputs
    from driftloop.onnx_model import load_model
    from driftloop.tasks.score import TableSink, prediction_frame
    from driftloop.tasks.validate import SeenValues, validate_rows

    descriptor = load_model(model.onnx, threads=threads)
    scorer = form_scorer(kind, data, descriptor, threads)
    prepare = getattr(scorer.predict, "prepare", None)
    target = table_target(out_root / f"profile-{model.algorithm}-{threads}")
    sink = TableSink(target.tables, target.store, spec, model_name="bench", run_id=str(uuid.uuid4()),
                     input_key="profile", form=kind)
    stages: dict[str, list[float]] = {k: [] for k in PROFILE_STAGES}
    seen: dict[str, SeenValues] = {}
    scored_at = datetime.now(UTC)
    reader = pq.ParquetFile(input_path).iter_batches(batch_size=batch_size, use_threads=False)  # as driftloop.inputs reads
    scorer.predict(pl.from_arrow(next(pq.ParquetFile(input_path).iter_batches(batch_size=16))))  # warm-up
    for index in range(batches):
        t0 = time.perf_counter()
        frame = pl.from_arrow(next(reader))
        t1 = time.perf_counter()
        valid = validate_rows(frame, spec, labelled=False, warn_ignored=False, seen=seen).valid
        seen.setdefault("id", SeenValues()).add(valid["id"])
        t2 = time.perf_counter()
        if prepare is not None:
            prepared = prepare(valid)
            t3 = time.perf_counter()
            scores = scorer.predict.run(prepared)
        else:  # a form without stages: its input is built inside predict
            t3 = time.perf_counter()
            scores = scorer.predict(valid)
        t4 = time.perf_counter()
        out = prediction_frame(descriptor, spec, valid, scores, model_name="bench", model_version=1,
                               scored_at=scored_at)
        t5 = time.perf_counter()
        outputs.encode_part(out)
        t6 = time.perf_counter()
        sink.write_part(out, partition="p", index=index)
        t7 = time.perf_counter()
        for name, seconds in zip(PROFILE_STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6),
                                 strict=True):
            stages[name].append(seconds)
    sink.abort()
    scorer.close()
    return stages


PROFILE_STAGES = ("read", "validate", "matrix", "predict", "conform", "write", "table")


def _task_cpu() -> dict[str, tuple[str, float]]:
    """Per thread of this process (Linux ``/proc/self/task``): (name, CPU seconds so far)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, tuple[str, float]] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[tid] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def thread_cpu(run: Callable[[], Any], interval: float = 0.05) -> dict[str, float]:
    """CPU seconds each group of threads spent during ``run()``: Python threads by their
    name less the trailing number (``driftloop-lane``, ``driftloop-writer``, ...), the
    libraries' native threads by their OS name (``polars-*``, ``async-executor``: polars;
    ``python``: unnamed native threads, pyarrow's pool among them). Sampled every
    ``interval`` s, so a thread that ends loses at most its last interval. Empty where
    ``/proc/self/task`` does not exist."""
    import threading

    if not Path("/proc/self/task").is_dir():
        return {}
    before = _task_cpu()
    last: dict[str, tuple[str, float]] = {}
    names: dict[str, str] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval):
            names.update({str(t.native_id): t.name for t in threading.enumerate()})
            last.update(_task_cpu())

    sampler = threading.Thread(target=sample, name="bench-sampler", daemon=True)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    last.update(_task_cpu())
    groups: dict[str, float] = {}
    for tid, (name, cpu) in last.items():
        label = re.sub(r"[-_]?\d+$", "", names.get(tid, name))
        if label == "bench-sampler":
            continue
        groups[label] = groups.get(label, 0.0) + cpu - before.get(tid, (name, 0.0))[1]
    return {k: round(v, 2) for k, v in sorted(groups.items(), key=lambda kv: -kv[1]) if v >= 0.01}


def model_descriptor(model: Model, threads: int) -> Any:
    from driftloop.onnx_model import load_model

    return load_model(model.onnx, threads=threads)


def form_scorer(kind: str, data: bytes, descriptor: Any, threads: int) -> Any:
    from driftloop.forms import FormRecord, load_form

    record = FormRecord(kind=kind, uri="bench://", sha256="", parity_rows=0, parity_max_abs_diff=0.0,
                        parity_flips=0, rows_per_s=0.0)
    return load_form(record, descriptor, data, threads=threads)


def profile_section(models: list[Model], forms: dict[str, Forms], spec: Any, x: np.ndarray, score_path: Path,
                    tmp: Path, *, rows: int, batch_size: int, repeats: int) -> list[dict[str, Any]]:
    """The per-stage table and, in the same process, ours (``score_stream`` and
    ``score_to_table`` with the fastest verified form) vs native in-memory vs the user's
    script, at 1 and 2 threads; each run's seconds kept (the spread)."""
    from driftloop.forms import choose_form

    stage_rows, rows_out, results = [], [], []
    for model in models:
        data = {form.kind: form.data for form in forms[model.algorithm].built.forms}
        for threads in (1, 2):
            timed_forms = forms_at(forms[model.algorithm], model.onnx, x_frame_cache(score_path), threads)
            chosen, _ = choose_form(timed_forms, engine="auto", algorithm=model.algorithm)
            kind = chosen.kind
            (tmp / "parts").mkdir(exist_ok=True)
            st = profile_stages(model, data[kind], kind, spec, score_path, tmp, threads=threads,
                                batch_size=batch_size, batches=max(1, min(5, rows // batch_size)))
            medians = [median_ms(st[name]) for name in PROFILE_STAGES]
            ms = dict(zip(PROFILE_STAGES, medians, strict=True))
            # What the scoring thread runs: the kernel alone where score_batches pipelines the
            # form's stages; else validation, the form's input, the kernel and the output rows.
            staged = hasattr(form_scorer(kind, data[kind], model_descriptor(model, threads), threads).predict, "run")
            scoring_thread = ms["predict"] if staged else ms["validate"] + ms["matrix"] + ms["predict"] + ms["conform"]
            stage_rows.append([model.algorithm, str(threads), kind, *(f"{m:.0f}" for m in medians),
                               f"{sum(medians) - medians[-1]:.0f}", f"{scoring_thread:.0f}"])
            scorer = lambda d, k=kind, b=data[kind], t=threads: form_predict(k, b, d, t)
            target = table_target(tmp / f"bench-table-{model.algorithm}-{threads}")
            runs: dict[str, list[float]] = {"ours": [], "table": [], "native": [], "script": []}
            for _ in range(repeats):  # alternated, so load swings hit every figure alike
                runs["ours"].append(score_once(model.onnx, score_path, tmp, threads=threads, batch_size=batch_size,
                                               rows=rows, scorer=scorer))
                runs["table"].append(table_once(model.onnx, score_path, target, threads=threads,
                                                batch_size=batch_size, rows=rows, scorer=scorer))
                runs["native"].append(native_predict(model, x, threads)[1])
                runs["script"].append(script_once(model, score_path, tmp, threads))
            best = {k: min(v) for k, v in runs.items()}

            cpu = {
                "ours": thread_cpu(partial(score_once, model.onnx, score_path, tmp, threads=threads,
                                           batch_size=batch_size, rows=rows, scorer=scorer)),
                "native in-memory": thread_cpu(partial(native_predict, model, x, threads)),
                "script": thread_cpu(partial(script_once, model, score_path, tmp, threads)),
            }
            entry = {
                "algorithm": model.algorithm, "threads": threads, "engine": kind,
                "ratio_inmemory": round(best["native"] / best["ours"], 3),
                "ratio_script": round(best["script"] / best["ours"], 3),
                "ratio_table_inmemory": round(best["native"] / best["table"], 3),
                "ratio_table_script": round(best["script"] / best["table"], 3),
                "paired_median": {"ours_inmemory": paired(runs, "native", "ours"),
                                  "ours_script": paired(runs, "script", "ours"),
                                  "table_inmemory": paired(runs, "native", "table"),
                                  "table_script": paired(runs, "script", "table")},
                "thread_cpu_s": cpu,
                "seconds": {k: [round(s, 3) for s in v] for k, v in runs.items()},
                "stages_ms": dict(zip(PROFILE_STAGES, (round(m, 1) for m in medians), strict=True)),
                "predict_ms": round(scoring_thread, 1),
            }
            results.append(entry)
            rows_out.append([model.algorithm, str(threads), kind, rate(rows, best["ours"]), rate(rows, best["table"]),
                             rate(rows, best["native"]), rate(rows, best["script"]),
                             f"{entry['ratio_inmemory']:.3f}", f"{entry['ratio_script']:.3f}",
                             f"{entry['ratio_table_inmemory']:.3f}", f"{entry['ratio_table_script']:.3f}"])
            print(f"  {model.algorithm} t={threads} ({kind}): " + "; ".join(
                f"{k} " + " ".join(f"{s:.2f}" for s in v) + " s" for k, v in runs.items()), flush=True)
            print(f"    paired medians: {entry['paired_median']}", flush=True)
            for what, groups in cpu.items():
                print(f"    CPU s by thread, {what}: total {sum(groups.values()):.2f}; "
                      + ", ".join(f"{k} {v:.2f}" for k, v in groups.items()), flush=True)
    print(f"\nstages run serially, median ms per {batch_size:,}-row batch:")
    print(table(["algorithm", "threads", "form", *PROFILE_STAGES, "serial total (no table)",
                 "on the scoring thread"], stage_rows))
    print(
        "read: Parquet batch -> polars; validate: validate_rows + ids kept; matrix: the form's input (native: the "
        "float32 matrix; onnx: built inside predict, so counted there); predict: the form's kernel; conform: "
        "prediction_frame; write: a Parquet part as score_stream encodes it (driftloop.outputs.encode_part); table: the same rows into the Iceberg table "
        "(TableSink: tags, conform, data file). On the scoring thread: the stages score_batches runs there (the rest "
        "runs on the reader, prepare and writer threads)."
    )
    print(table(["algorithm", "threads", "form", "ours rows/s", "table rows/s", "native in-memory rows/s",
                 "script rows/s", "ours / in-memory", "ours / script", "table / in-memory", "table / script"],
                rows_out))
    return results


_X_FRAME: dict[str, pl.DataFrame] = {}


def x_frame_cache(path: Path) -> pl.DataFrame:
    """The timing rows auto's choice is measured on (registration's parity rows' head)."""
    key = str(path)
    if key not in _X_FRAME:
        _X_FRAME[key] = pl.read_parquet(path, n_rows=PARITY_ROWS)
    return _X_FRAME[key]


# --- main ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k / 500k rows: a fast smoke run")
    parser.add_argument(
        "--rows", type=int, help="rows of the scoring input (the RSS check also scores 5x as many)"
    )
    parser.add_argument(
        "--tensor-rows", type=int, default=TENSOR_ROWS,
        help=f"rows for the tensor-op vs tree-kernel inference comparison (default {TENSOR_ROWS:,})",
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs per timing; the best is kept (default 2)"
    )
    parser.add_argument(
        "--table-only", action="store_true",
        help="only the predictions-table path against score_stream (setup, then that section; batch size 100,000)",
    )
    parser.add_argument(
        "--profile", action="store_true",
        help="only the per-stage profile and ours vs native vs script with the fastest verified form (batch 100,000)",
    )
    parser.add_argument(
        "--algorithm", choices=("xgboost", "lightgbm"),
        help="only this algorithm's model (both are trained; the other is not measured)",
    )
    parser.add_argument("--child-rss", nargs=2, metavar=("ONNX", "INPUT"), help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=100_000, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("driftloop").setLevel(logging.ERROR)  # "created table ..." per temp registry
    if args.child_rss:
        child_rss(*args.child_rss, batch_size=args.batch_size, threads=args.threads)
        return

    import lightgbm
    import onnxruntime
    import xgboost

    import driftloop.tasks.form_builder  # imported up front: the code measured is the code at the start
    import driftloop.tasks.score  # noqa: F401
    from driftloop.forms import choose_form
    from driftloop.onnx_model import load_model, predict_scores
    from driftloop.spec import parse_spec

    sizes = QUICK if args.quick else FULL
    if args.rows:
        breakdown = max(1, min(sizes.breakdown_batches, args.rows // sizes.breakdown_batch))
        sizes = replace(
            sizes, score_rows=args.rows, big_rows=5 * args.rows, breakdown_batches=breakdown
        )
    mode = (" --quick" if args.quick else "") + (f" --rows {args.rows}" if args.rows else "") + (
        " --table-only" if args.table_only else "") + (" --profile" if args.profile else "")
    spec = parse_spec(SPEC, source="bench/scoring.py")
    total_started = time.perf_counter()
    print(
        f"bench/scoring.py{mode}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, "
        f"xgboost {xgboost.__version__}, lightgbm {lightgbm.__version__}, polars {pl.__version__}, "
        f"pyarrow {pa.__version__}; best of {args.repeats} runs per timing; "
        f"load average at the start {' '.join(f'{v:.1f}' for v in os.getloadavg())}"
    )
    print("the user's script (native_script), timed on the same input file:\n")
    print("    " + inspect.getsource(user_script).replace("\n", "\n    ").rstrip())

    with tempfile.TemporaryDirectory(prefix="bench-scoring-") as tmp_name:
        tmp = Path(tmp_name)
        section("setup")
        started = time.perf_counter()
        train = pl.from_arrow(
            make_chunk(np.random.default_rng(SEED), 0, sizes.train_rows, labelled=True)
        )
        score_path, big_path = tmp / "score.parquet", tmp / "score-big.parquet"
        write_input(score_path, sizes.score_rows, SEED + 1)
        if not (args.table_only or args.profile):
            write_input(big_path, sizes.big_rows, SEED + 2)
        print(
            f"data: {sizes.train_rows:,} training rows (positive rate {train[TARGET].mean():.2f}); scoring inputs "
            f"{sizes.score_rows:,} rows ({score_path.stat().st_size / 1e6:.0f} MB)"
            + ("" if args.table_only or args.profile else
               f" and {sizes.big_rows:,} rows ({big_path.stat().st_size / 1e6:.0f} MB)")
            + f" in {time.perf_counter() - started:.1f} s"
        )

        os.environ["DRIFTLOOP_HOME"] = str(tmp / "home")  # the table path's registry and tables: temp
        encoding, models = train_models(spec, train, threads=os.cpu_count() or 2, tensor=not (args.table_only or args.profile))
        models = [m for m in models if args.algorithm in (None, m.algorithm)]
        del train
        x = encoding.matrix(pl.read_parquet(score_path))
        for model in models:
            onnx_path = tmp / f"{model.algorithm}.onnx"
            onnx_path.write_bytes(model.onnx)
            # Sanity: the ONNX artifact and the native booster agree (same work is compared).
            head = pl.read_parquet(score_path, n_rows=20_000)
            native_head = native_predict(model, x[:20_000], 1)[0]
            diff = np.abs(predict_scores(load_model(model.onnx), head) - native_head).max()
            line = (f"{model.algorithm}: {model.trees} trees, trained in {model.train_s:.1f} s; "
                    f"ONNX {len(model.onnx) / 1e6:.1f} MB; max |onnx - native| on 20k rows {diff:.1e}")
            if model.tensor:
                tensor = load_model(model.tensor)
                tensor_diff = np.abs(predict_scores(tensor, head) - native_head).max()
                line += (f"; tensor-op form ({tensor.metadata['tensor_layout']} layout, depth "
                         f"{tensor.metadata['depth']}, {len(model.tensor) / 1e6:.1f} MB) max |tensor - native| "
                         f"{tensor_diff:.1e}")
            print(line)

        if args.table_only:
            results = []
            table_section(models, score_path, tmp, rows=sizes.score_rows, batch_size=args.batch_size,
                          repeats=args.repeats, results=results)
            print(
                f"\ntotal benchmark time {time.perf_counter() - total_started:.0f} s; "
                f"load average at the end {' '.join(f'{v:.1f}' for v in os.getloadavg())}"
            )
            print(json.dumps({"results": results, "ratio_table_stream_worst": worst_table_ratio(results)}))
            return

        if args.profile:
            parity = pl.read_parquet(score_path, n_rows=min(PARITY_ROWS, sizes.score_rows))
            forms = {model.algorithm: register_forms(model, encoding, spec, parity) for model in models}
            section(f"profile: the fastest verified form, {sizes.score_rows:,} rows, batch size {args.batch_size:,}")
            results = profile_section(models, forms, spec, x, score_path, tmp, rows=sizes.score_rows,
                                      batch_size=args.batch_size, repeats=args.repeats)
            print(
                f"\ntotal benchmark time {time.perf_counter() - total_started:.0f} s; "
                f"load average at the end {' '.join(f'{v:.1f}' for v in os.getloadavg())}"
            )
            print(json.dumps({"results": results}))
            return

        section(
            f"batch size sweep (score_stream, {models[0].algorithm}, t=1, {sizes.score_rows:,} rows, single runs)"
        )
        sweep: dict[int, float] = {}
        for candidate in sizes.batch_sizes:
            sweep[candidate] = score_once(
                models[0].onnx,
                score_path,
                tmp,
                threads=1,
                batch_size=candidate,
                rows=sizes.score_rows,
            )
        print(
            table(
                ["batch size", "seconds", "rows/s"],
                [[f"{b:,}", f"{s:.2f}", rate(sizes.score_rows, s)] for b, s in sweep.items()],
            )
        )
        batch_size = min(sweep, key=sweep.__getitem__)
        print(f"using batch size {batch_size:,} (the fastest)")

        parity = pl.read_parquet(score_path, n_rows=min(PARITY_ROWS, sizes.score_rows))
        section(
            f"scoring forms, as registration builds them (tasks.form_builder.build_forms, {parity.height:,} parity rows)"
        )
        forms: dict[str, Forms] = {}
        form_rows = []
        for model in models:
            started = time.perf_counter()
            forms[model.algorithm] = register_forms(model, encoding, spec, parity)
            built = forms[model.algorithm].built
            registered, _ = choose_form(
                forms[model.algorithm].records, engine="auto", algorithm=model.algorithm
            )
            for form in built.forms:
                form_rows.append(
                    [
                        model.algorithm,
                        form.kind + (" (auto)" if form.kind == registered.kind else ""),
                        f"{form.parity_max_abs_diff:.1e}",
                        str(form.parity_flips),
                        f"{form.rows_per_s:,.0f}",
                        f"{len(form.data) / 1e6:.1f}",
                    ]
                )
            for kind, why in built.skipped.items():
                form_rows.append([model.algorithm, f"{kind}: not registered ({why})", "-", "-", "-", "-"])
            print(f"  {model.algorithm}: forms built in {time.perf_counter() - started:.1f} s", flush=True)
        print(
            table(
                ["algorithm", "form", "max |diff| vs native", "flips", "rows/s (1 thread)", "MB"],
                form_rows,
            )
        )

        section(
            f"throughput: score_stream (--engine auto and onnx) vs native predict, {sizes.score_rows:,} rows, "
            f"batch size {batch_size:,}"
        )
        rows_out = []
        results: list[dict[str, Any]] = []
        for model in models:
            model_forms = forms[model.algorithm]
            data = {form.kind: form.data for form in model_forms.built.forms}
            registered, _ = choose_form(model_forms.records, engine="auto", algorithm=model.algorithm)
            for threads in (1, 2):
                # The rule: auto picks by the forms' speeds at this row's thread count, on
                # registration's timing rows (at 1 thread: exactly registration's speeds).
                timed_forms = forms_at(model_forms, model.onnx, parity, threads)
                chosen, why = choose_form(timed_forms, engine="auto", algorithm=model.algorithm)
                # The ONNX form as load_form gives it (at 2 threads: halves of each batch).
                onnx_s = best_of(
                    args.repeats,
                    lambda m=model, t=threads: score_once(
                        m.onnx, score_path, tmp, threads=t, batch_size=batch_size, rows=sizes.score_rows,
                        scorer=lambda d, m=m, t=t: form_predict("onnx", m.onnx, d, t),
                    ),
                )
                if chosen.kind == "onnx":
                    ours = onnx_s
                else:
                    ours = best_of(
                        args.repeats,
                        lambda m=model, t=threads, k=chosen.kind, b=data[chosen.kind]: score_once(
                            m.onnx,
                            score_path,
                            tmp,
                            threads=t,
                            batch_size=batch_size,
                            rows=sizes.score_rows,
                            scorer=lambda d, k=k, t=t, b=b: form_predict(k, b, d, t),
                        ),
                    )
                native = best_of(
                    args.repeats, lambda m=model, t=threads: native_predict(m, x, t)[1]
                )
                script = best_of(
                    args.repeats,
                    lambda m=model, t=threads: script_once(m, score_path, tmp, t),
                )
                rows_out.append(
                    [
                        model.algorithm,
                        str(threads),
                        chosen.kind,
                        rate(sizes.score_rows, ours),
                        rate(sizes.score_rows, onnx_s),
                        rate(sizes.score_rows, native),
                        rate(sizes.score_rows, script),
                        f"{native / ours:.3f}",
                        f"{script / ours:.3f}",
                        f"{native / onnx_s:.3f}",
                        f"{script / onnx_s:.3f}",
                    ]
                )
                results.append(
                    {
                        "algorithm": model.algorithm,
                        "threads": threads,
                        "engine": chosen.kind,
                        "ours_rows_s": round(sizes.score_rows / ours),
                        "onnx_rows_s": round(sizes.score_rows / onnx_s),
                        "native_inmemory_rows_s": round(sizes.score_rows / native),
                        "native_script_rows_s": round(sizes.score_rows / script),
                        "ratio_inmemory": round(native / ours, 3),
                        "ratio_script": round(script / ours, 3),
                        "ratio_onnx_inmemory": round(native / onnx_s, 3),
                        "ratio_onnx_script": round(script / onnx_s, 3),
                        "engine_registration": registered.kind,
                        "forms_rows_s": {f.kind: round(f.rows_per_s) for f in timed_forms},
                    }
                )
                print(
                    f"  {model.algorithm} t={threads}: auto -> {why}; ours {ours:.2f} s, onnx {onnx_s:.2f} s, "
                    f"native {native:.2f} s, script {script:.2f} s",
                    flush=True,
                )
        print(
            table(
                [
                    "algorithm",
                    "threads",
                    "auto form",
                    "ours rows/s",
                    "onnx rows/s",
                    "native in-memory rows/s",
                    "user's script rows/s",
                    "ours / in-memory",
                    "ours / script",
                    "onnx / in-memory",
                    "onnx / script",
                ],
                rows_out,
            )
        )
        print(
            "ours: Parquet file -> validate -> the form --engine auto picks -> Parquet dataset (zstd), wall clock, "
            "model loading excluded; auto picks by the forms' speeds at the row's thread count on registration's "
            "timing rows (at 1 thread: registration's own figures).\n"
            "onnx: the same with the ONNX tree-kernel form (--engine onnx; the edge agent's only form; at 2 threads "
            "the halves of each batch on one 1-thread session).\n"
            "native in-memory: float32 matrix already in memory -> predict (XGBoost: DMatrix construction included).\n"
            "user's script: Parquet file -> polars -> numpy -> inplace_predict / predict -> id + probability Parquet."
        )

        table_section(models, score_path, tmp, rows=sizes.score_rows, batch_size=batch_size,
                      repeats=args.repeats, results=results)

        section(
            f"the parallel-batches lever at 2 threads: halves of each batch on two threads, 1 thread each "
            f"({sizes.score_rows:,} rows)"
        )
        lever_rows = []
        kernel_rows = min(args.tensor_rows, sizes.score_rows)
        kernel_frame = pl.read_parquet(score_path, n_rows=kernel_rows)
        for model in models:
            entry = next(r for r in results if r["algorithm"] == model.algorithm and r["threads"] == 2)
            # The ONNX form's halves on one shared 1-thread session is what load_form does at
            # 2 threads (timed above as onnx_rows_s); the baseline is one 2-thread session.
            shared = sizes.score_rows / entry["onnx_rows_s"]
            onnx_s = best_of(
                args.repeats,
                lambda m=model: score_once(
                    m.onnx, score_path, tmp, threads=2, batch_size=batch_size, rows=sizes.score_rows
                ),
            )
            two = best_of(
                args.repeats,
                lambda m=model: score_once(
                    m.onnx, score_path, tmp, threads=2, batch_size=batch_size, rows=sizes.score_rows,
                    scorer=onnx_halves(m.onnx, sessions=2),
                ),
            )
            intra_k, halves_k = kernel_halves_seconds(model.onnx, kernel_frame, batch_size, args.repeats)
            entry |= {
                "onnx_intra2_rows_s": round(sizes.score_rows / onnx_s),
                "onnx_halves_rows_s": round(sizes.score_rows / shared),
                "onnx_halves_2sessions_rows_s": round(sizes.score_rows / two),
                "kernel_intra2_rows_s": round(kernel_rows / intra_k),
                "kernel_halves_rows_s": round(kernel_rows / halves_k),
            }
            lever_rows.append(
                [f"{model.algorithm} onnx, one 1-thread session shared (kept)", rate(sizes.score_rows, onnx_s),
                 rate(sizes.score_rows, shared), f"{onnx_s / shared:.3f}"]
            )
            lever_rows.append(
                [f"{model.algorithm} onnx, two 1-thread sessions", rate(sizes.score_rows, onnx_s),
                 rate(sizes.score_rows, two), f"{onnx_s / two:.3f}"]
            )
            lever_rows.append(
                [f"{model.algorithm} ORT kernel alone ({kernel_rows:,} rows in memory)", rate(kernel_rows, intra_k),
                 rate(kernel_rows, halves_k), f"{intra_k / halves_k:.3f}"]
            )
            if "native" in {f.kind for f in forms[model.algorithm].built.forms}:
                native_data = next(f.data for f in forms[model.algorithm].built.forms if f.kind == "native")
                native_two = best_of(
                    args.repeats,
                    lambda m=model, d=native_data: score_once(
                        m.onnx, score_path, tmp, threads=2, batch_size=batch_size, rows=sizes.score_rows,
                        scorer=lambda desc, d=d: form_predict("native", d, desc, 2),
                    ),
                ) if entry["engine"] != "native" else sizes.score_rows / entry["ours_rows_s"]
                native_halves_s = best_of(
                    args.repeats,
                    lambda m=model, d=native_data: score_once(
                        m.onnx, score_path, tmp, threads=2, batch_size=batch_size, rows=sizes.score_rows,
                        scorer=native_halves(d),
                    ),
                )
                entry |= {
                    "native_form_rows_s": round(sizes.score_rows / native_two),
                    "native_halves_rows_s": round(sizes.score_rows / native_halves_s),
                }
                lever_rows.append(
                    [f"{model.algorithm} native form, nthread=1 per half", rate(sizes.score_rows, native_two),
                     rate(sizes.score_rows, native_halves_s), f"{native_two / native_halves_s:.3f}"]
                )
            print(f"  {model.algorithm} done", flush=True)
        print(table(["streamed scorer, t=2", "2 threads in one call rows/s", "halves rows/s", "halves / one call"],
                    lever_rows))
        print(
            "2 threads in one call: one ORT session with 2 intra-op threads (XGBoost: nthread=2), as above; "
            "halves: each batch split in two, one half scored in a helper thread, the other in the scoring thread."
        )
        # The main figures so far, in case a long run is cut short (the last line has them all).
        print("results so far: " + json.dumps({"results": results}), flush=True)

        tensor_rows = min(args.tensor_rows, sizes.score_rows)
        section(
            f"tensor-op form vs ONNX tree kernel: CPU inference alone, {tensor_rows:,} rows in memory"
        )
        tensor_table = tensor_vs_kernel(
            models, pl.read_parquet(score_path, n_rows=tensor_rows), args.repeats, batch_size, results
        )
        print(
            table(
                [
                    "algorithm",
                    "threads",
                    "tree kernel rows/s",
                    *(f"tensor, {s:,}-row slices" for s in TENSOR_SLICES),
                    "tensor best / kernel",
                ],
                tensor_table,
            )
        )
        print(
            "tree kernel: session.run on row slices, the best of "
            f"{', '.join(f'{s:,}' for s in sorted({batch_size, *TENSOR_SLICES}))} rows; tensor: the tensor-op "
            "form on row slices of the size shown; feeds built beforehand, not timed."
        )

        section(
            f"peak RSS: score_stream in a child process ({models[0].algorithm}, t=2, batch size {batch_size:,})"
        )
        onnx_path = tmp / f"{models[0].algorithm}.onnx"
        small = measure_rss(onnx_path, score_path, batch_size, 2)
        big = measure_rss(onnx_path, big_path, batch_size, 2)
        print(
            table(
                [
                    "input rows",
                    "maxrss before scoring MiB",
                    "peak maxrss MiB",
                    "peak - before MiB",
                    "VmHWM MiB",
                    "rows/s",
                ],
                [
                    [
                        f"{r['rows']:,}",
                        mib(r["before_kib"]),
                        mib(r["peak_kib"]),
                        mib(r["peak_kib"] - r["before_kib"]),
                        mib(r["vm_hwm_kib"]) if r["vm_hwm_kib"] else "-",
                        rate(r["rows"], r["seconds"]),
                    ]
                    for r in (small, big)
                ],
            )
        )
        print("before scoring = after imports and loading the model.")
        ratio = big["peak_kib"] / small["peak_kib"]
        rss_ratio = round(ratio, 3)
        print(
            f"peak RSS {sizes.big_rows // sizes.score_rows}x rows / 1x rows = {ratio:.3f} "
            f"(target < 1.2: {'met' if ratio < 1.2 else 'NOT met'})"
        )

        section(
            f"where the time goes: stages run serially, median ms per {sizes.breakdown_batch:,}-row batch "
            f"(first {sizes.breakdown_batches} batches)"
        )
        stage_rows = []
        parts = tmp / "parts"
        for model in models:
            for threads in (1, 2):
                parts.mkdir()
                st = stage_times(
                    model.onnx,
                    spec,
                    score_path,
                    parts,
                    threads=threads,
                    batch_size=sizes.breakdown_batch,
                    batches=sizes.breakdown_batches,
                )
                shutil.rmtree(parts)
                medians = [
                    median_ms(v) for v in (st.read, st.validate, st.infer, st.build, st.write)
                ]
                total = sum(medians)
                stage_rows.append(
                    [
                        model.algorithm,
                        str(threads),
                        *(f"{m:.0f} ({100 * m / total:.0f}%)" for m in medians),
                        f"{total:.0f}",
                        rate(sizes.breakdown_batch, total / 1000),
                    ]
                )
        print(
            table(
                [
                    "algorithm",
                    "threads",
                    "(a) read",
                    "(b) validate",
                    "(c) ORT infer",
                    "(d1) build out",
                    "(d2) write zstd",
                    "serial total",
                    "serial rows/s",
                ],
                stage_rows,
            )
        )

        section(f"experiments on one {sizes.experiment_batch:,}-row batch (median of 5)")
        parts.mkdir()
        for line in experiments(models, spec, score_path, parts, sizes.experiment_batch):
            print(line)
        print(
            "ONNX ops: onnxmltools emits ai.onnx.ml TreeEnsembleClassifier (declared ml opset 3 by build_onnx)."
        )

    print(
        f"\ntotal benchmark time {time.perf_counter() - total_started:.0f} s; "
        f"load average at the end {' '.join(f'{v:.1f}' for v in os.getloadavg())}"
    )
    print(json.dumps({"results": results, "rss_ratio_5m_1m": rss_ratio,
                      "ratio_table_stream_worst": worst_table_ratio(results)}))


if __name__ == "__main__":
    main()
