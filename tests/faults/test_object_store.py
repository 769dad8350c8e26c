"""Scoring outputs on an object store, against a real S3 endpoint (moto's server mode,
through s3fs): ingest from, score to and monitor from ``s3://``; a reader never sees a
manifest whose parts are missing; a crash between the parts and the manifest leaves the
previous output; two runs into one output at once leave exactly one complete run; a
prefix holding someone else's objects is refused untouched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import fsspec
import polars as pl
import pytest

from driftloop.flows.ingest import ingest
from driftloop.flows.monitor import monitor
from driftloop.flows.score import score
from driftloop.onnx_model import LoadedModel, load_model
from driftloop.outputs import (
    ORPHAN_GRACE,
    RUNS,
    Manifest,
    OutputError,
    ScoringOutput,
    current_manifest,
    read_predictions,
    read_quarantine,
)
from driftloop.registry import open_registry
from driftloop.settings import get_settings
from driftloop.tasks.score import fetch_verified, score_stream
from tests.support import tables as memory
from tests.support.data import make_loans, write_spec
from tests.support.models import train_fast

pytestmark = [pytest.mark.prefect, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture(scope="module")
def on_s3(tmp_path_factory: pytest.TempPathFactory, s3_server) -> Iterator[dict]:
    """A model trained on data ingested from S3, its artifacts in an S3 artifact root."""
    root = tmp_path_factory.mktemp("object-store")
    bucket = s3_server.create_bucket("driftloop-loop")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DRIFTLOOP_HOME", str(root / "home"))
        mp.setenv("DRIFTLOOP_ARTIFACT_ROOT", f"{bucket}/artifacts")
        spec = write_spec(root)
        with fsspec.open(f"{bucket}/raw/train.csv", "wb") as fh:
            make_loans(3000, seed=1).write_csv(fh)
        dataset = ingest(spec_path=str(spec), source=f"{bucket}/raw/train.csv").dataset_id
        train_fast(spec_path=str(spec), dataset_id=dataset, trials=2, algorithms=["lightgbm"], parity_min_rows=2000)
        record = open_registry(get_settings().registry_database_url()).resolve("loans")
        assert record.onnx_uri.startswith(f"{bucket}/artifacts/")
        onnx = fetch_verified(record.onnx_uri, record.onnx_sha256)
        (root / "model.onnx").write_bytes(onnx)
        yield {"root": root, "bucket": bucket, "model": load_model(onnx), "model_path": root / "model.onnx"}


def _objects(uri: str) -> list[str]:
    """Every object under ``uri``, relative to it, listed afresh."""
    fs, path = fsspec.core.url_to_fs(uri)
    fs.invalidate_cache()
    return sorted(p.removeprefix(path.rstrip("/") + "/") for p in fs.find(path))


def _batch(n: int, *, seed: int, first_id: int = 0, bad: bool = False) -> pl.DataFrame:
    frame = make_loans(n, seed=seed).drop("repaid").with_columns(pl.col("id") + first_id)
    if bad:  # one row that fails validation (amount < 0), for the quarantine
        frame = pl.concat([frame, frame.head(1).with_columns(pl.lit(-5.0).alias("amount"), pl.lit(first_id + n, dtype=pl.Int64).alias("id"))])
    return frame


def _score(model: LoadedModel, source: str, out: str, **kwargs) -> object:
    return score_stream(model, source, out, model_name="loans", model_version=kwargs.pop("version", 1), **kwargs)


@pytest.fixture
def before_manifest(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[], None]], None]:
    """Fault injection: ``before_manifest(hook)`` runs ``hook`` in the moment between a
    run's last part and its manifest (every commit, in every thread, for this test)."""
    real = ScoringOutput._write_manifest

    def install(hook: Callable[[], None]) -> None:
        def hooked(self: ScoringOutput, manifest: Manifest) -> tuple[str, Manifest]:
            hook()
            return real(self, manifest)

        monkeypatch.setattr(ScoringOutput, "_write_manifest", hooked)

    return install


def test_ingest_score_and_monitor_through_s3(on_s3, monkeypatch) -> None:
    monkeypatch.setenv("DRIFTLOOP_HOME", str(on_s3["root"] / "home"))
    monkeypatch.setenv("DRIFTLOOP_ARTIFACT_ROOT", f"{on_s3['bucket']}/artifacts")
    bucket = on_s3["bucket"]
    # A directory of Parquet files on S3 is one input.
    with fsspec.open(f"{bucket}/incoming/day=1/a.parquet", "wb") as fh:
        _batch(1500, seed=5, bad=True).write_parquet(fh)
    with fsspec.open(f"{bucket}/incoming/day=1/b.parquet", "wb") as fh:
        _batch(1000, seed=6, first_id=10_000).write_parquet(fh)
    result = score(input_uri=f"{bucket}/incoming/day=1/", output_uri=f"{bucket}/exports/day1.parquet", model="loans",
                   batch_size=700)
    assert (result.rows_in, result.rows_scored, result.rows_quarantined) == (2501, 2500, 1)
    predictions = memory.rows("loans", result.snapshot_id, run=result.run_id)
    assert predictions.height == 2500 and predictions["id"].n_unique() == 2500
    assert _objects(f"{bucket}/artifacts/tables/predictions/loans")  # the table lives in the bucket
    with fsspec.open(f"{result.quarantine_uri}/part-00000-00002.parquet", "rb") as fh:
        assert pl.read_parquet(fh)["id"].cast(pl.String).to_list() == ["1500"]
    with fsspec.open(f"{bucket}/exports/day1.parquet", "rb") as fh:
        assert pl.read_parquet(fh).height == 2500

    again = score(input_uri=f"{bucket}/incoming/day=1/", model="loans", batch_size=2000)
    assert again.rows_scored == 2500 and again.input_key == result.input_key
    assert memory.rows("loans").filter(pl.col("input_key") == result.input_key).height == 2500  # replaced, not added to

    report = monitor(model="loans")
    assert report.chunks and report.report_uri.startswith(f"{bucket}/artifacts/")
    assert _objects(report.report_uri)  # the report was written to the bucket


_TABLE_SCORER = """
import sys, time
from pathlib import Path
from driftloop.onnx_model import load_model
from driftloop.registry import open_registry
from driftloop.storage import ArtifactStore
from driftloop.tables import open_tables
from driftloop.tasks.score import TableSink, score_to_table
model_path, registry_url, root, source, run_id, start = sys.argv[1:7]
model = load_model(Path(model_path).read_bytes())
sink = TableSink(open_tables(open_registry(registry_url).engine, root), ArtifactStore(root), model.spec(),
                 model_name="loans", run_id=run_id, input_key=source, form="onnx")
while time.time() < float(start):
    time.sleep(0.01)
result = score_to_table(model, source, sink, model_version=1, batch_size=300,
                        on_batch=lambda done, total: print(done, flush=True))
print("snapshot", result.snapshot_id, flush=True)
"""


def _table_scorer(on_s3, registry_url: str, root: str, source: str, run_id: str, start: float = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _TABLE_SCORER, str(on_s3["model_path"]), registry_url, root, source,
                             run_id, str(start)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy())


@pytest.mark.parametrize("catalog", ["sqlite", "postgres"])
def test_the_predictions_table_on_s3_replaces_survives_kill_and_takes_concurrent_runs(
        on_s3, s3_bucket: str, tmp_path: Path, catalog: str, request) -> None:
    """On a real S3 endpoint, with the catalog in SQLite and in PostgreSQL: re-scoring an
    input replaces its rows; kill -9 mid-run leaves the previous snapshot; two runs at once
    both land."""
    import time

    from driftloop.tables import open_tables

    if catalog == "postgres":
        registry_url = request.getfixturevalue("postgres").create_database(f"s3_{uuid.uuid4().hex[:8]}")
    else:
        registry_url = f"sqlite:///{tmp_path / 'registry.db'}"
    root = f"{s3_bucket}/artifacts"
    inputs = {}
    for name, first_id in (("a", 0), ("big", 100_000), ("b", 200_000), ("c", 300_000)):
        inputs[name] = f"{s3_bucket}/in/{name}.parquet"
        with fsspec.open(inputs[name], "wb") as fh:
            _batch(30_000 if name == "big" else 900, seed=first_id % 97, first_id=first_id).write_parquet(fh)

    def table():
        found = open_tables(open_registry(registry_url).engine, root).predictions("loans")
        assert found is not None
        return found.refresh()

    for run in ("first", "again"):  # the same input twice: replaced
        proc = _table_scorer(on_s3, registry_url, root, inputs["a"], run)
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    rows = table().scan().collect()
    assert rows.height == 900 and rows["scoring_run_id"].unique().to_list() == ["again"]

    before = table().snapshot_id()
    proc = _table_scorer(on_s3, registry_url, root, inputs["big"], "killed")
    assert proc.stdout is not None
    for _ in range(5):
        assert proc.stdout.readline(), "scorer ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert table().snapshot_id() == before and table().scan().collect().height == 900

    start = time.time() + 8
    procs = [_table_scorer(on_s3, registry_url, root, inputs[name], f"concurrent-{name}", start) for name in ("b", "c")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    rows = table().scan().collect()
    assert {r: rows.filter(pl.col("scoring_run_id") == r).height for r in ("again", "concurrent-b", "concurrent-c")} == {
        "again": 900, "concurrent-b": 900, "concurrent-c": 900}


def test_a_reader_never_sees_a_manifest_whose_parts_are_missing(on_s3, s3_bucket: str, tmp_path: Path,
                                                                 before_manifest) -> None:
    model = on_s3["model"]
    source = tmp_path / "in.parquet"
    _batch(1200, seed=7).write_parquet(source)
    out = f"{s3_bucket}/predictions"

    def all_parts_then_manifest() -> None:
        # The moment before the commit: every part of the run is in the bucket, no
        # manifest of it is. After the commit, every manifest's parts are there.
        listed = set(_objects(out))
        runs_here = {p.split("/")[1] for p in listed if p.startswith(RUNS)}
        committed = {n.split("-", 1)[1].removesuffix(".json") for n in ScoringOutput(out).manifest_names()}
        assert runs_here - committed, "the run's parts are not in the bucket before its manifest"

    before_manifest(all_parts_then_manifest)
    _score(model, str(source), out)
    seen: list[int] = []
    runs_seen: set[object] = set()
    failures: list[BaseException] = []
    stop = threading.Event()

    def read_until_stopped() -> None:
        while not stop.is_set():
            try:
                frame = read_predictions(out)
                assert frame.height == 1200 and frame["id"].n_unique() == 1200
                seen.append(frame.height)
                runs_seen.add(frame["scored_at"][0])
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)
                return

    reader = threading.Thread(target=read_until_stopped)
    reader.start()
    try:
        for batch_size in (100, 300, 250, 1200, 90):  # each rerun supersedes (and collects) the previous run
            _score(model, str(source), out, batch_size=batch_size)
            for name in ScoringOutput(out).manifest_names():
                manifest = ScoringOutput(out).load_manifest(name)
                assert {p.path for p in manifest.parts} <= set(_objects(out))
    finally:
        stop.set()
        reader.join(timeout=60)
    assert not failures, failures[0]
    assert len(seen) >= 5 and len(runs_seen) >= 2  # it really read while runs were replaced


_KILLED_BEFORE_MANIFEST = """
import sys, time
from driftloop.onnx_model import load_model
from driftloop.outputs import ScoringOutput
from driftloop.tasks.score import score_stream

def hold(self, manifest):  # the moment between the last part and the manifest
    print("parts written", flush=True)
    time.sleep(600)

ScoringOutput._write_manifest = hold
model = load_model(open(sys.argv[1], "rb").read())
score_stream(model, sys.argv[2], sys.argv[3], model_name="loans", model_version=2, batch_size=300)
"""


def test_a_crash_between_parts_and_manifest_leaves_the_previous_output(on_s3, s3_bucket: str, tmp_path: Path) -> None:
    earlier, later = tmp_path / "earlier.parquet", tmp_path / "later.parquet"
    _batch(800, seed=8).write_parquet(earlier)
    _batch(1500, seed=9, first_id=50_000).write_parquet(later)
    out = f"{s3_bucket}/predictions"
    first = _score(on_s3["model"], str(earlier), out)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_BEFORE_MANIFEST, str(on_s3["model_path"]), str(later), out],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "parts written", proc.stderr.read()
        crashed = {p.split("/")[1] for p in _objects(out) if p.startswith(RUNS)} - {first.run_id}
        assert len(crashed) == 1  # the killed run's parts are in the bucket
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    kept = read_predictions(out)
    assert kept.height == 800 and kept["model_version"].unique().to_list() == [1]  # the earlier output, whole
    assert current_manifest(out).run_id == first.run_id and len(ScoringOutput(out).manifest_names()) == 1

    (run,) = crashed
    later_on = datetime.now(UTC) + ORPHAN_GRACE + timedelta(minutes=1)
    assert ScoringOutput(out).collect_garbage() == []  # young: as far as anyone knows, a run in progress
    assert ScoringOutput(out).collect_garbage(now=later_on) == [f"{RUNS}/{run}"]
    assert not [p for p in _objects(out) if p.startswith(f"{RUNS}/{run}")] and read_predictions(out).height == 800


def test_two_runs_into_one_output_at_once_leave_one_complete_run(on_s3, s3_bucket: str, tmp_path: Path,
                                                                  before_manifest) -> None:
    inputs = {"a": (tmp_path / "a.parquet", 0), "b": (tmp_path / "b.parquet", 100_000)}
    for seed, (path, first_id) in enumerate(inputs.values()):
        _batch(1000 + 300 * seed, seed=seed, first_id=first_id, bad=True).write_parquet(path)
    out = f"{s3_bucket}/predictions"
    both_written = threading.Barrier(2, timeout=120)  # neither commits before both have written every part
    before_manifest(both_written.wait)
    results: dict[str, object] = {}
    failures: list[BaseException] = []

    def run(name: str) -> None:
        try:
            results[name] = _score(on_s3["model"], str(inputs[name][0]), out, batch_size=250)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in inputs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not failures, failures[0]
    assert {r.rows_scored for r in results.values()} == {1000, 1300}  # both finished

    manifest = current_manifest(out)
    winner = next(name for name, r in results.items() if r.run_id == manifest.run_id)
    expected = pl.read_parquet(inputs[winner][0])
    predictions = read_predictions(out)
    assert sorted(predictions["id"].to_list()) == sorted(expected["id"].to_list()[:-1])  # one run, whole
    assert read_quarantine(out)["id"].cast(pl.String).to_list() == [str(expected["id"][-1])]
    runs_left = {p.split("/")[1] for p in _objects(out) if p.startswith(RUNS)}
    assert runs_left == {manifest.run_id} and len(ScoringOutput(out).manifest_names()) == 1


def test_a_prefix_holding_other_objects_is_refused_untouched(on_s3, s3_bucket: str, tmp_path: Path) -> None:
    source = tmp_path / "in.parquet"
    _batch(50, seed=3).write_parquet(source)
    fs, _ = fsspec.core.url_to_fs(s3_bucket)
    fs.pipe_file(f"{s3_bucket}/exports/ledger.csv".removeprefix("s3://"), b"id,amount\n1,2\n")
    with pytest.raises(OutputError, match=rf"refusing to write the scoring output into {s3_bucket}/exports.*ledger.csv"):
        _score(on_s3["model"], str(source), f"{s3_bucket}/exports")
    assert _objects(f"{s3_bucket}/exports") == ["ledger.csv"]
