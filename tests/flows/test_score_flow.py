"""Batch scoring, the edge agent and delayed labels against a real Prefect server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from driftloop.feedback import join_labels, latest_labels
from driftloop.flows.ingest import ingest
from driftloop.flows.labels import ingest_labels
from driftloop.flows.score import score
from driftloop.flows.score_edge import score_edge
from driftloop.outputs import read_predictions
from driftloop.registry import open_registry
from driftloop.settings import get_settings
from driftloop.spec import load_spec
from driftloop.tasks.edge import ModelCache
from driftloop.tasks.score import ArtifactIntegrityError
from tests.support import tables as memory
from tests.support.data import make_loans, write_spec
from tests.support.faults import inserts_fail
from tests.support.models import train_fast

pytestmark = [pytest.mark.prefect, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One registered champion for the module, in its own DRIFTLOOP_HOME."""
    root = tmp_path_factory.mktemp("scoring")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DRIFTLOOP_HOME", str(root / "home"))
        spec = write_spec(root)
        data = root / "train.parquet"
        make_loans(3000, seed=1).write_parquet(data)
        dataset = ingest(spec_path=str(spec), source=str(data)).dataset_id
        train_fast(spec_path=str(spec), dataset_id=dataset, trials=2, algorithms=["lightgbm"], parity_min_rows=2000)
        yield {"root": root, "spec": spec, "dataset": dataset}


def scoring_csv(path: Path, n: int, bad: int = 0, seed: int = 7) -> Path:
    frame = make_loans(n, seed=seed).drop("repaid").with_columns(pl.col("ts").dt.strftime("%Y-%m-%d %H:%M:%S"))
    frame.write_csv(path)
    if bad:
        with path.open("a") as fh:
            for i in range(bad):
                fh.write(f"{10_000 + i},2024-02-01 00:00:00,-5,0.5,low,true,12\n")  # amount < 0
            fh.write("99999,2024-02-01\n")  # wrong field count
    return path


def test_score_accounts_for_every_row_and_reruns_idempotently(trained, tmp_path: Path) -> None:
    source = scoring_csv(tmp_path / "batch.csv", 2500, bad=3)
    result = score(input_uri=str(source), model="loans@champion", batch_size=700)
    assert (result.rows_in, result.rows_scored, result.rows_quarantined) == (2504, 2500, 4)
    assert result.table == "predictions.loans" and result.output_uri is None
    predictions = memory.rows("loans", result.snapshot_id, run=result.run_id)
    assert predictions.height == 2500 and predictions["id"].n_unique() == 2500
    assert {"id", "ts", "amount", "band", "prediction", "probability", "model_name", "model_version", "scored_at",
            "scoring_form", "scoring_run_id", "input_key", "role"} <= set(predictions.columns)
    assert predictions["model_version"].unique().to_list() == [1] and predictions["role"].unique().to_list() == ["served"]
    assert predictions["input_key"].unique().to_list() == [result.input_key]
    assert predictions["probability"].is_between(0, 1).all()
    assert result.quarantine_uri is not None and pl.read_parquet(f"{result.quarantine_uri}/*.parquet").height == 4

    # The same input again (another version even): its rows are replaced in one commit, not added.
    again = score(input_uri=str(source), model="loans:1", batch_size=1000)
    assert again.rows_scored == 2500 and again.input_key == result.input_key and again.snapshot_id != result.snapshot_id
    now = memory.rows("loans", again.snapshot_id).filter(pl.col("input_key") == result.input_key)
    assert now.height == 2500 and now["scoring_run_id"].unique().to_list() == [again.run_id]
    # ... and the first run's rows stay readable at the snapshot it committed.
    assert memory.rows("loans", result.snapshot_id, run=result.run_id).height == 2500
    runs = open_registry(get_settings().registry_database_url()).list_scoring_runs("loans")
    by_id = {r.id: r for r in runs}
    assert by_id[result.run_id].snapshot_id == result.snapshot_id and by_id[again.run_id].snapshot_id == again.snapshot_id
    assert all(r.rows_in == r.rows_scored + r.rows_quarantined for r in runs)


def test_another_input_with_the_same_file_name_appends(trained, tmp_path: Path) -> None:
    """Nightly exports day1/data.csv and day2/data.csv: both nights are kept."""
    (tmp_path / "day1").mkdir()
    (tmp_path / "day2").mkdir()
    night1 = score(input_uri=str(scoring_csv(tmp_path / "day1" / "data.csv", 300, seed=21)), model="loans")
    night2 = score(input_uri=str(scoring_csv(tmp_path / "day2" / "data.csv", 200, seed=22)), model="loans")
    assert night1.input_key != night2.input_key
    table = memory.rows("loans", night2.snapshot_id)
    assert table.filter(pl.col("scoring_run_id") == night1.run_id).height == 300
    assert table.filter(pl.col("scoring_run_id") == night2.run_id).height == 200


_CRASHING_SCORER = """
import sys
from driftloop.registry import open_registry
from driftloop.settings import get_settings
from driftloop.storage import ArtifactStore
from driftloop.tables import open_tables
from driftloop.tasks.score import TableSink, load_verified_model, score_to_table
settings = get_settings()
registry = open_registry(settings.registry_database_url())
record = registry.resolve("loans")
model = load_verified_model(record.onnx_uri, record.onnx_sha256)
sink = TableSink(open_tables(registry.engine, settings.artifact_root_uri()), ArtifactStore(settings.artifact_root_uri()),
                 model.spec(), model_name="loans", run_id="crashing-run", input_key="crash-test", form="onnx")
score_to_table(model, sys.argv[1], sink, model_version=record.version, batch_size=200,
               on_batch=lambda done, total: print(done, flush=True))
"""


def test_a_crash_mid_run_leaves_the_table_at_its_previous_snapshot(trained, tmp_path: Path) -> None:
    source = tmp_path / "big.parquet"
    make_loans(60_000, seed=3).drop("repaid").write_parquet(source)
    before = memory.predictions("loans").refresh().snapshot_id() if memory.tables().predictions("loans") else None
    proc = subprocess.Popen([sys.executable, "-c", _CRASHING_SCORER, str(source)],
                            stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    assert proc.stdout is not None
    for _ in range(5):  # let it write a few data files, then kill it without warning
        assert proc.stdout.readline(), "scorer ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    table = memory.predictions("loans").refresh()
    assert table.snapshot_id() == before  # nothing committed
    written = [p for p in Path(get_settings().artifact_root_uri(), "tables", "predictions", "loans", "data").rglob("*.parquet")]
    assert written  # it really was mid-run: data files exist, unreferenced
    assert memory.rows("loans").filter(pl.col("scoring_run_id") == "crashing-run").height == 0

    result = score(input_uri=str(source), model="loans", batch_size=20_000)
    assert result.rows_scored == 60_000
    assert memory.rows("loans", result.snapshot_id, run=result.run_id).height == 60_000


def test_tampered_or_missing_artifact_is_refused(trained, tmp_path: Path) -> None:
    registry = open_registry(get_settings().registry_database_url())
    record = registry.resolve("loans")
    artifact = Path(record.onnx_uri)
    original = artifact.read_bytes()
    source = scoring_csv(tmp_path / "b.csv", 50)
    out = tmp_path / "out"
    table = memory.tables().predictions("loans")
    before = table.refresh().snapshot_id() if table else None
    try:
        artifact.write_bytes(original[:-10] + b"0123456789")
        with pytest.raises(ArtifactIntegrityError) as err:
            score(input_uri=str(source), output_uri=str(out), model="loans")
        assert f"expected {record.onnx_sha256}" in str(err.value) and "has sha256" in str(err.value)
        artifact.unlink()
        with pytest.raises(ArtifactIntegrityError, match="is missing"):
            score(input_uri=str(source), output_uri=str(out), model="loans")
    finally:
        artifact.write_bytes(original)
    assert not out.exists() and not list(tmp_path.rglob(".tmp-*"))
    after = memory.tables().predictions("loans")
    assert (after.refresh().snapshot_id() if after else None) == before


def test_edge_agent_caches_scores_offline_updates_and_rolls_back(trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIFTLOOP_EDGE_CACHE_DIR", str(tmp_path / "cache"))
    source = scoring_csv(tmp_path / "edge.csv", 400)
    first = score_edge(input_uri=str(source), output_uri=str(tmp_path / "e1"), model="loans", batch_size=100)
    assert not first.cache_hit and not first.offline and first.rows_scored == 400
    assert first.latency_p95_ms >= first.latency_p50_ms > 0
    second = score_edge(input_uri=str(source), output_uri=str(tmp_path / "e2"), model="loans")
    assert second.cache_hit and not second.offline

    # The registry cannot be reached: score with the cached model and say so.
    with monkeypatch.context() as offline:
        offline.setenv("DRIFTLOOP_REGISTRY_URL", "postgresql+psycopg://edge@127.0.0.1:1/registry")
        third = score_edge(input_uri=str(source), output_uri=str(tmp_path / "e3"), model="loans")
    assert third.offline and third.cache_hit and third.version == first.version
    assert "unreachable" in third.note
    assert read_predictions(str(tmp_path / "e3")).height == 400

    # A new champion: the cache moves to it and keeps the previous one for rollback.
    registry = open_registry(get_settings().registry_database_url())
    data = tmp_path / "more.parquet"
    make_loans(3000, seed=9).write_parquet(data)
    dataset = ingest(spec_path=str(trained["spec"]), source=str(data)).dataset_id
    new = train_fast(spec_path=str(trained["spec"]), dataset_id=dataset, trials=2, algorithms=["xgboost"], parity_min_rows=2000, promote=False)
    registry.promote("loans", new.version, actor="test", reason="new data")
    fourth = score_edge(input_uri=str(source), output_uri=str(tmp_path / "e4"), model="loans")
    assert fourth.version == new.version and not fourth.cache_hit
    cache = ModelCache(tmp_path / "cache", "loans")
    state = cache.state()
    assert state["current"]["version"] == new.version and state["previous"]["version"] == first.version
    assert len(list((tmp_path / "cache" / "loans" / "artifacts").glob("*.onnx"))) == 2
    cache.rollback()
    assert cache.state()["current"]["version"] == first.version
    registry.rollback("loans", actor="test", reason="restore")


def test_delayed_labels_are_validated_and_joined(trained, tmp_path: Path) -> None:
    scored = score(input_uri=str(scoring_csv(tmp_path / "s.csv", 300)), model="loans")
    predictions = memory.rows("loans", scored.snapshot_id, run=scored.run_id)
    labels = tmp_path / "labels.csv"
    rows = [f"{i},{i % 2}" for i in range(200)] + ["5000,7", "abc,1"]  # bad label, bad id
    labels.write_text("id,repaid\n" + "\n".join(rows) + "\n")
    result = ingest_labels(spec_path=str(trained["spec"]), source=str(labels))
    assert (result.rows_in, result.rows_valid, result.rows_quarantined) == (202, 200, 2)
    assert result.table == "labels.loans" and result.table_snapshot is not None
    spec = load_spec(trained["spec"])
    labels, snapshot = latest_labels(memory.tables(), spec)
    assert labels is not None and snapshot == result.table_snapshot
    joined = join_labels(predictions, labels.collect(), spec=spec)
    assert joined.height == 300 and joined["repaid"].null_count() == 100


_GUARD = """
import sys
BLOCKED = {"xgboost", "lightgbm", "optuna", "optuna_integration", "onnxmltools", "nannyml", "sklearn", "onnx"}
class Guard:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"light install: {name} must not be imported when scoring")
sys.meta_path.insert(0, Guard())
from driftloop.flows.score import score
result = score(input_uri=sys.argv[1], output_uri=sys.argv[2], model="loans")
loaded = sorted(m for m in BLOCKED if m in sys.modules)
print(result.rows_scored, loaded)
"""


def test_scoring_imports_no_training_or_monitoring_library(trained, tmp_path: Path) -> None:
    source = scoring_csv(tmp_path / "light.csv", 120)
    run = subprocess.run([sys.executable, "-c", _GUARD, str(source), str(tmp_path / "o")],
                         check=False, capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "120 []"


def test_score_and_labels_cli(trained, tmp_path: Path) -> None:
    driftloop = str(Path(sys.executable).with_name("driftloop"))
    source = scoring_csv(tmp_path / "cli.csv", 150, bad=1)
    run = subprocess.run([driftloop, "score", "--model", "loans@champion", "--input", str(source), "--output",
                          str(tmp_path / "cli-out"), "--batch-size", "50", "--json"], check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    payload = json.loads(run.stdout)
    assert {k: payload[k] for k in ("rows_in", "rows_scored", "rows_quarantined", "model", "version", "table")} == {
        "rows_in": 152, "rows_scored": 150, "rows_quarantined": 2, "model": "loans", "version": 1,
        "table": "predictions.loans"}
    # The export is a plain Parquet file of exactly this run's rows.
    assert payload["output_uri"] == str(tmp_path / "cli-out" / f"{payload['run_id']}.parquet")
    exported = pl.read_parquet(payload["output_uri"])
    assert exported.height == 150 and exported["scoring_run_id"].unique().to_list() == [payload["run_id"]]
    labels = tmp_path / "l.csv"
    labels.write_text("id,repaid,ts\n1,1,2024-03-01 00:00:00\n2,0,\n")
    run = subprocess.run([driftloop, "labels", "--spec", str(trained["spec"]), str(labels), "--json"], check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["rows_valid"] == 2


def test_an_id_repeated_in_a_later_batch_is_quarantined(trained, tmp_path: Path) -> None:
    source = scoring_csv(tmp_path / "repeats.csv", 300)
    with source.open("a") as fh:  # ids 5, 250 and 299 again, in a fourth batch
        for line in source.read_text().splitlines()[1:]:
            if line.split(",")[0] in ("5", "250", "299"):
                fh.write(line + "\n")
    result = score(input_uri=str(source), model="loans@champion", batch_size=100)
    assert (result.rows_in, result.rows_scored, result.rows_quarantined) == (303, 300, 3)
    assert memory.rows("loans", result.snapshot_id, run=result.run_id)["id"].n_unique() == 300
    quarantine = pl.read_parquet(f"{result.quarantine_uri}/*.parquet").sort("id")
    assert quarantine["id"].to_list() == ["250", "299", "5"]
    assert quarantine["_checks"].to_list() == [["unique(earlier batch)"]] * 3


def test_each_scored_probability_belongs_to_its_own_id(trained, tmp_path: Path) -> None:
    """Scored output joined by id to the model's own prediction for that row, computed
    apart (one call, no batches, no threads): predictions attached to the wrong ids fail."""
    import numpy as np

    from driftloop.onnx_model import load_model, predict_scores
    from driftloop.tasks.score import fetch_verified

    frame = make_loans(5000, seed=13).drop("repaid").sample(fraction=1.0, shuffle=True, seed=4)
    source = tmp_path / "shuffled.parquet"
    frame.write_parquet(source)
    result = score(input_uri=str(source), model="loans@champion", batch_size=600)
    record = open_registry(get_settings().registry_database_url()).resolve("loans@champion")
    expected = frame.select("id").with_columns(
        pl.Series("expected", predict_scores(load_model(fetch_verified(record.onnx_uri, record.onnx_sha256)), frame)))
    joined = memory.rows("loans", result.snapshot_id, run=result.run_id).join(expected, on="id", how="inner")
    assert joined.height == 5000
    assert float(np.max(np.abs(joined["probability"].to_numpy() - joined["expected"].to_numpy()))) <= 1e-5


def test_an_export_into_a_users_directory_adds_its_own_file_only(trained, tmp_path: Path) -> None:
    """`--output ~/data` writes <run id>.parquet there and touches nothing else."""
    driftloop = str(Path(sys.executable).with_name("driftloop"))
    source = scoring_csv(tmp_path / "in.csv", 40)
    users = tmp_path / "data"
    users.mkdir()
    (users / "thesis.txt").write_text("years of work")
    run = subprocess.run([driftloop, "score", "--model", "loans", "--input", str(source), "--output", str(users), "--json"],
                         check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    run_id = json.loads(run.stdout)["run_id"]
    assert sorted(p.name for p in users.iterdir()) == sorted(["thesis.txt", f"{run_id}.parquet"])
    assert (users / "thesis.txt").read_text() == "years of work"
    assert pl.read_parquet(users / f"{run_id}.parquet").height == 40


def test_a_run_committed_but_not_recorded_is_accounted_from_its_snapshot(trained, tmp_path: Path) -> None:
    """The registry fails after the table's commit: the committed rows are not left
    unrecorded; the run is recorded from the snapshot it committed (which carries the
    run's accounting) by the next run that reads or writes the table."""
    registry = open_registry(get_settings().registry_database_url())
    source = scoring_csv(tmp_path / "lost.csv", 600, bad=2, seed=31)
    before = memory.predictions("loans").refresh().snapshot_id() if memory.tables().predictions("loans") else None
    with inserts_fail(registry.engine, "scoring_runs") as refused, pytest.raises(Exception) as failed:
        score(input_uri=str(source), model="loans@champion", batch_size=250)
    assert refused, "the fault was never reached"
    table = memory.predictions("loans").refresh()
    snapshot = table.table.current_snapshot()
    assert snapshot.snapshot_id != before  # the rows were committed ...
    run_id = snapshot.summary.additional_properties["driftloop.run-id"]
    assert memory.rows("loans", snapshot.snapshot_id, run=run_id).height == 600

    # ... and the next run that touches the table records the lost one from its snapshot.
    later = score(input_uri=str(scoring_csv(tmp_path / "next.csv", 50, seed=32)), model="loans@champion")
    lost = registry.get_scoring_run(run_id)
    assert lost is not None, "a committed scoring run is still unrecorded"
    assert (lost.rows_in, lost.rows_scored, lost.rows_quarantined) == (603, 600, 3)
    assert lost.snapshot_id == snapshot.snapshot_id and lost.model_name == "loans"
    assert lost.input_key == memory.rows("loans", snapshot.snapshot_id, run=run_id)["input_key"].unique().item()
    record = registry.resolve("loans@champion")
    assert (lost.model_version, lost.onnx_sha256) == (record.version, record.onnx_sha256)
    assert lost.form == later.form and lost.input_uri == str(source)
    assert lost.quarantine_uri is not None and pl.read_parquet(f"{lost.quarantine_uri}/*.parquet").height == 3
    assert lost.started_at <= lost.finished_at
    assert registry.get_scoring_run(later.run_id) is not None
    # Recorded once: the reconciled record is not added again.
    assert [r.id for r in registry.list_scoring_runs("loans")].count(run_id) == 1
    # The failed run said what happened to its rows.
    assert run_id in str(failed.value) and str(snapshot.snapshot_id) in str(failed.value)
