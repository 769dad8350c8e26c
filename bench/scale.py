"""Scaling out: what a second worker buys, measured on this machine in one run.

Tuning. ``tasks.tune_workers.tune_in_workers``: LightGBM trials on one Optuna study in
PostgreSQL, with 1 and then 2 worker processes (each on 1 thread, so 2 workers can use
2 cores), the same data (synthetic loans, ``--rows``), the same number of trials and the
same base seed, each on a fresh database. Two rates per worker count:

  end to end  -- trials / minute around the whole call: process start, imports, data
                 load, tuning, clean-up (what a user waits for);
  tuning      -- trials / minute from the first trial's start to the last trial's end,
                 read from the study (what the workers do once they run).

tuning_efficiency_2 = rate(2) / (2 x rate(1)) on the *tuning* rate (1.0: a second worker
doubles the trials per minute). Trials differ between the runs: each worker samples with
its own seed, TPE samples without the results of trials still running, and the pruner
stops poor trials early, so two workers may prune fewer trials and do more work per trial.
To separate that from the machinery, the work is also counted in boosting rounds (pruned:
the last reported round; complete: best round + the early-stopping patience) and printed
as rounds / minute with its own efficiency.

Ceiling. What the machine gives two processes: LightGBM fits with fixed parameters on the
same data, 1 thread each, no Optuna and no database, in 1 and then 2 processes over the
same time window: fit_efficiency_2 = fits/s(2) / (2 x fits/s(1)). Tuning cannot scale
better than this; on a machine shared with other jobs it is far below 1. PostgreSQL: ``--postgres-url`` (a server the script may create databases
on), or a throwaway server started here (Debian's postgresql package, as the tests do).

Scoring. The ``score`` flow with ``dask_address``: partitioned scoring of one Parquet file
(``--score-rows`` rows in row groups of 100k, split into about four partitions per
worker) on a ``distributed.LocalCluster`` of 1 and then 2 single-threaded worker
processes, started and warmed up before the clock starts (every worker has imported the
code and loaded the model: a cold worker spends seconds on imports); the same registered LightGBM model, a fresh output each run. rows/s around the
flow call: planning, partitions as Prefect tasks on the DaskTaskRunner, settling, the
manifest. scoring_efficiency_2 = rate(2) / (2 x rate(1)). Single-process scoring at 1
and 2 ONNX threads is printed beside it for reference.

Run from the repository root:

    .venv/bin/python bench/scale.py                  # 40 trials per worker count
    .venv/bin/python bench/scale.py --trials 12      # quicker, noisier

The last line is JSON: {"scoring_efficiency_2": ..., "tuning_efficiency_2": ...}.
"""

from __future__ import annotations

import os

os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")

import argparse
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support: data and services


@dataclass
class TuningFigures:
    workers: int
    trials: int
    wall_s: float
    tuning_s: float
    trials_per_min: float  # tuning rate
    trials_per_min_end_to_end: float
    pruned: int
    rounds_per_min: float  # boosting rounds trained, over the tuning span


def measure_tuning(create_database: Callable[[str], str], *, workers: int, trials: int, rows: int = 20_000,
                   algorithm: str = "lightgbm", seed: int = 0) -> TuningFigures:
    """Tune ``trials`` trials with ``workers`` processes on a fresh study database
    (``create_database(name)`` creates it and returns its URL)."""
    import optuna

    from driftloop.tasks.tune_workers import tune_in_workers

    data = _training_data(rows)
    storage = create_database(f"bench_tune_{workers}_{uuid.uuid4().hex[:8]}")
    started = time.perf_counter()
    result = tune_in_workers(algorithm, data, study_name="bench", storage=storage, n_trials=trials,
                             workers=workers, seed=seed, threads=1)
    wall = time.perf_counter() - started
    assert result.trials_run == trials, result
    study = optuna.load_study(study_name="bench", storage=storage)
    done = [t for t in study.trials if t.datetime_start and t.datetime_complete]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    rounds = sum(_rounds(t) for t in study.trials)
    return TuningFigures(workers, trials, round(wall, 2), round(span, 2), round(60 * trials / span, 2),
                         round(60 * trials / wall, 2), pruned, round(60 * rounds / span))


def _rounds(trial: Any) -> int:
    from driftloop.tasks.fit import EARLY_STOPPING, MAX_ROUNDS

    if "best_iteration" in trial.user_attrs:
        return min(int(trial.user_attrs["best_iteration"]) + EARLY_STOPPING, MAX_ROUNDS)
    return max(trial.intermediate_values, default=0) + 1


@contextmanager
def postgres(url: str | None) -> Iterator[Callable[[str], str]]:
    """A function that creates a database and returns its URL: on the server at ``url``,
    or on a throwaway local one."""
    if url:
        import psycopg
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)

        def create(name: str) -> str:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            return parsed.set(database=name).render_as_string(hide_password=False)

        yield create
        return
    from tests.support.services import PostgresServer

    with tempfile.TemporaryDirectory(prefix="driftloop-bench-") as tmp:
        Path(tmp).chmod(0o755)  # as root, the server runs as the postgres user
        server = PostgresServer(Path(tmp) / "postgres")
        server.start()
        try:
            yield server.create_database
        finally:
            server.stop()


def _training_data(rows: int) -> Any:
    from driftloop.spec import load_spec
    from driftloop.tasks.fit import prepare_training_data
    from driftloop.tasks.split import split_dataset
    from tests.support.data import make_loans, write_spec

    with tempfile.TemporaryDirectory() as tmp:
        spec = load_spec(write_spec(Path(tmp)))
        split = split_dataset(make_loans(rows), spec, seed=0)
        return prepare_training_data(spec, split.train, split.valid)[0]


def _fit_loop(rows: int, start_at: float, seconds: float) -> float:
    """Fits per second in the window [start_at, start_at + seconds] (wall clock, so that
    processes started together measure the same moment)."""
    from driftloop.tasks.fit import fit_model

    data = _training_data(rows)
    fit_model("lightgbm", {"learning_rate": 0.05}, data, threads=1)  # imports, first-call costs
    time.sleep(max(0.0, start_at - time.time()))
    fits = 0
    while time.time() < start_at + seconds:
        fit_model("lightgbm", {"learning_rate": 0.05}, data, threads=1)
        fits += 1
    return fits / (time.time() - start_at)


def measure_fit_ceiling(*, processes: int, rows: int, seconds: float = 15.0) -> float:
    """Total fits/s of ``processes`` processes fitting at once."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    start_at = time.time() + 30  # after every process has imported and loaded its data
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        return sum(pool.map(_fit_loop, [rows] * processes, [start_at] * processes, [seconds] * processes))


def tuning_section(args: argparse.Namespace) -> dict[str, Any]:
    print(f"== tuning: {args.trials} LightGBM trials on {args.rows:,} rows, PostgreSQL study, 1 thread per worker")
    with postgres(args.postgres_url) as create:
        figures = [measure_tuning(create, workers=n, trials=args.trials, rows=args.rows) for n in (1, 2)]
    for f in figures:
        print(f"  {f.workers} worker(s): {f.trials_per_min:6.1f} trials/min tuning ({f.tuning_s:.1f} s), "
              f"{f.trials_per_min_end_to_end:6.1f} trials/min end to end ({f.wall_s:.1f} s), {f.pruned} pruned, "
              f"{f.rounds_per_min:,.0f} boosting rounds/min")
    one, two = figures
    efficiency = two.trials_per_min / (2 * one.trials_per_min)
    end_to_end = two.trials_per_min_end_to_end / (2 * one.trials_per_min_end_to_end)
    rounds = two.rounds_per_min / (2 * one.rounds_per_min)
    print(f"  efficiency with 2 workers: {efficiency:.2f} trials/min while tuning, {end_to_end:.2f} end to end, "
          f"{rounds:.2f} boosting rounds/min")
    fits = [measure_fit_ceiling(processes=n, rows=args.rows) for n in (1, 2)]
    ceiling = fits[1] / (2 * fits[0])
    print(f"  ceiling: plain LightGBM fits, no Optuna, no database: {fits[0]:.2f} fits/s in 1 process, "
          f"{fits[1]:.2f} in 2: fit_efficiency_2 {ceiling:.2f}")
    return {"tuning_efficiency_2": round(efficiency, 3), "tuning_end_to_end_efficiency_2": round(end_to_end, 3),
            "tuning_rounds_efficiency_2": round(rounds, 3), "fit_efficiency_2": round(ceiling, 3),
            "tuning": [asdict(f) for f in figures]}


def _timed_score(**kwargs: Any) -> float:
    from driftloop.flows.score import score

    started = time.perf_counter()
    result = score(**kwargs)
    return result.rows_in / (time.perf_counter() - started)


def scoring_section(args: argparse.Namespace) -> dict[str, Any]:
    """Rows/s of partitioned scoring with 1 and 2 Dask workers on one input."""
    from pathlib import Path

    from distributed import Client, LocalCluster
    from prefect.testing.utilities import prefect_test_harness

    from driftloop.flows.ingest import ingest
    from driftloop.flows.score_partitioned import SINGLE_THREADED_WORKER_ENV
    from driftloop.flows.train import train
    from tests.support.data import make_loans, write_spec

    rows = args.score_rows
    print(f"== scoring: {rows:,} rows, one Parquet file (row groups of 100k), LightGBM, Dask workers of 1 thread")
    with tempfile.TemporaryDirectory(prefix="driftloop-scale-") as tmp, prefect_test_harness(server_startup_timeout=120):
        root = Path(tmp)
        os.environ["DRIFTLOOP_HOME"] = str(root / "home")
        os.environ["DRIFTLOOP_PARITY_MIN_ROWS"] = "5000"  # this bench times scoring, not registration
        spec = write_spec(root)
        make_loans(5000, seed=1).write_parquet(root / "train.parquet")
        dataset = ingest(spec_path=str(spec), source=str(root / "train.parquet")).dataset_id
        train(spec_path=str(spec), dataset_id=dataset, trials=1, algorithms=["lightgbm"])
        source = root / "score.parquet"
        make_loans(rows, seed=2).drop("repaid").write_parquet(source, row_group_size=100_000)
        warm = root / "warm.parquet"  # enough row groups that every worker gets a partition
        make_loans(8000, seed=3).drop("repaid").write_parquet(warm, row_group_size=500)

        single = {t: _timed_score(input_uri=str(source), output_uri=str(root / f"single-{t}"), model="loans",
                                  threads=t) for t in (1, 2)}
        rates: dict[int, float] = {}
        for workers in (1, 2):
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                              env=SINGLE_THREADED_WORKER_ENV) as cluster:
                address = cluster.scheduler_address
                with Client(address) as client:  # every worker imports what a partition runs
                    client.run(lambda: __import__("driftloop.flows.score_partitioned"))
                _timed_score(input_uri=str(warm), output_uri=str(root / f"warm-{workers}"), model="loans",
                             dask_address=address, workers=workers)
                rates[workers] = _timed_score(input_uri=str(source), output_uri=str(root / f"dask-{workers}"),
                                              model="loans", dask_address=address, workers=workers)
    for t, rate in single.items():
        print(f"  one process, {t} ONNX thread(s): {rate:10,.0f} rows/s")
    for workers, rate in rates.items():
        print(f"  {workers} Dask worker(s):            {rate:10,.0f} rows/s")
    efficiency = rates[2] / (2 * rates[1])
    print(f"  scaling efficiency with 2 workers: {efficiency:.2f}")
    return {"scoring_efficiency_2": round(efficiency, 3),
            "scoring": {"rows": rows, "dask_rows_s": rates, "single_process_rows_s": single}}


# Sections in the order they run; each returns figures for the summary.
SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "scoring": scoring_section,
    "tuning": tuning_section,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres-url", help="PostgreSQL server to create the bench's databases on "
                        "(default: start a throwaway one)")
    parser.add_argument("--trials", type=int, default=40, help="tuning trials per worker count (default 40)")
    parser.add_argument("--rows", type=int, default=20_000, help="rows of synthetic training data (default 20000)")
    parser.add_argument("--score-rows", type=int, default=2_000_000, help="rows to score (default 2000000)")
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only these sections")
    args = parser.parse_args()
    print(f"cpus: {os.cpu_count()}, load average: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    results: dict[str, Any] = {}
    for name, section in SECTIONS.items():
        if not args.only or name in args.only:
            results |= section(args)
    print(json.dumps({"scoring_efficiency_2": results.get("scoring_efficiency_2"),
                      "tuning_efficiency_2": results.get("tuning_efficiency_2")}))


if __name__ == "__main__":
    main()
