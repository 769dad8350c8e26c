"""The loop's memory: scored rows and labels in Iceberg tables that only grow, are read
by any engine and whose windows can be read again exactly (issue 18)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from driftloop.feedback import WindowRecord, latest_labels, reread_window
from driftloop.flows.labels import ingest_labels
from driftloop.flows.retrain import retrain
from driftloop.flows.score import score
from driftloop.registry import open_registry
from driftloop.settings import get_settings
from driftloop.spec import load_spec
from driftloop.storage import read_parquet
from tests.support import tables as memory
from tests.support.data import make_period, write_spec
from tests.support.models import train_fast

pytestmark = [pytest.mark.prefect, pytest.mark.usefixtures("prefect_server")]

# The snippet lives where the predictions table is documented.
TABLES_DOC = Path(__file__).resolve().parents[2] / "docs" / "scoring-and-edge.md"


@pytest.fixture(scope="module")
def loans(tmp_path_factory: pytest.TempPathFactory):
    """v1 of ``loans`` trained on January (ids 0..2999), its window: all labelled rows."""
    root = tmp_path_factory.mktemp("memory")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DRIFTLOOP_HOME", str(root / "home"))
        spec = write_spec(root, {"retrain": {"window": {"all": True}, "min_new_labels": 100}})
        history = root / "history.parquet"
        make_period(3000, start="2024-01-01", days=28, seed=1, first_id=0).write_parquet(history)
        train_fast(spec_path=str(spec), source=str(history), trials=1, algorithms=["lightgbm"], parity_min_rows=2000)
        yield {"root": root, "spec": spec}


def night(root: Path, folder: str, *, start: str, first_id: int, n: int) -> tuple[Path, pl.DataFrame]:
    """One nightly export, always named data.parquet, and its (later) labels."""
    frame = make_period(n, start=start, days=1, seed=first_id, first_id=first_id)
    (root / folder).mkdir(exist_ok=True)
    path = root / folder / "data.parquet"
    frame.drop("repaid").write_parquet(path)
    return path, frame.select("id", "repaid")


def sorted_hash(frame: pl.DataFrame) -> str:
    rows = frame.select("id", "repaid").sort("id")
    return hashlib.sha256(rows.write_csv().encode()).hexdigest()


def test_two_nights_with_the_same_file_name_are_both_remembered_and_retrained_on(loans) -> None:
    root, spec_path = loans["root"], loans["spec"]
    day1, labels1 = night(root, "day1", start="2024-02-01", first_id=10_000, n=400)
    day2, labels2 = night(root, "day2", start="2024-02-02", first_id=20_000, n=300)
    first = score(input_uri=str(day1), model="loans")
    second = score(input_uri=str(day2), model="loans")
    assert first.input_key != second.input_key  # same name, another file: appended, not replacing

    (root / "labels.csv").write_text(pl.concat([labels1, labels2]).write_csv())
    ingest_labels(spec_path=str(spec_path), source=str(root / "labels.csv"))
    result = retrain(model="loans", trials=1, algorithms=["lightgbm"], cooldown_s=0)
    assert result.window is not None
    print(f"two nights: window {result.window.rows} rows = 3000 history + 400 + 300; scoring runs "
          f"{sorted(result.window.scoring_runs)}; labels {result.labels}, unscored {result.labels_unscored}; "
          f"{result.reason}")
    assert result.window.rows == 3000 + 400 + 300
    assert sorted(result.window.scoring_runs) == sorted([first.run_id, second.run_id])
    assert result.labels == 700 and result.labels_unscored == 0 and not result.skipped

    # Scoring the second night again replaces its rows: the count does not change.
    served = memory.rows("loans").filter(pl.col("role") == "served")
    again = score(input_uri=str(day2), model="loans@champion")
    assert again.input_key == second.input_key
    now = memory.rows("loans").filter(pl.col("role") == "served")
    assert now.height == served.height
    assert now.filter(pl.col("input_key") == second.input_key)["scoring_run_id"].unique().to_list() == [again.run_id]

    # The stored window read again from its snapshot ids is exactly what the retrain trained on.
    registry = open_registry(get_settings().registry_database_url())
    version = registry.get_version("loans", result.challenger.version)
    record = WindowRecord(**version.window)
    assert record.predictions_snapshot is not None and record.labels_snapshot is not None
    trained_on = read_parquet(registry.get_dataset(version.dataset_id).snapshot_uri)
    spec = load_spec(spec_path)
    reread = reread_window(registry, memory.tables(), spec, spec.retrain, record)
    assert reread.frame.height == trained_on.height == 3700
    assert sorted_hash(reread.frame) == sorted_hash(trained_on)


def test_a_label_sent_again_wins_over_a_later_one(loans) -> None:
    """Label files A, then B, then A again: A's labels are the latest."""
    root, spec_path = loans["root"], loans["spec"]
    a, b = root / "a.csv", root / "b.csv"
    a.write_text("id,repaid\n90001,1\n90002,1\n")
    b.write_text("id,repaid\n90001,0\n90002,0\n")
    spec = load_spec(spec_path)
    snapshots = []
    for path in (a, b, a):
        snapshots.append(ingest_labels(spec_path=str(spec_path), source=str(path)).table_snapshot)
    assert len(set(snapshots)) == 3  # every registration is a commit, even of content sent before
    labels, _ = latest_labels(memory.tables(), spec)
    latest = labels.filter(pl.col("id").is_in([90001, 90002])).collect().sort("id")
    assert latest["repaid"].to_list() == [1, 1]
    # ... and as of B's registration, B's labels were the latest.
    at_b, _ = latest_labels(memory.tables(), spec, snapshots[1])
    assert at_b.filter(pl.col("id").is_in([90001, 90002])).collect()["repaid"].to_list() == [0, 0]


_CONCURRENT_SCORER = """
import sys, time
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
                 model.spec(), model_name="loans", run_id=sys.argv[2], input_key=sys.argv[2], form="onnx")
while time.time() < float(sys.argv[3]):  # start together
    time.sleep(0.01)
print(score_to_table(model, sys.argv[1], sink, model_version=record.version, batch_size=100).snapshot_id)
"""


def test_two_concurrent_scoring_runs_both_land(loans) -> None:
    import time

    root = loans["root"]
    inputs = [night(root, f"concurrent-{i}", start="2024-03-01", first_id=30_000 + 1000 * i, n=500)[0] for i in range(2)]
    start = str(time.time() + 8)
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_SCORER, str(path), f"concurrent-{i}", start],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
             for i, path in enumerate(inputs)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    current = memory.rows("loans")
    for i in range(2):
        assert current.filter(pl.col("scoring_run_id") == f"concurrent-{i}").height == 500


def test_the_readme_snippet_reads_a_run_without_driftloop(loans) -> None:
    """The docs' polars/pyarrow snippet, run as written in a process that cannot
    import driftloop, reads a scoring run's rows from the table."""
    scored = score(input_uri=str(night(loans["root"], "snippet", start="2024-04-01", first_id=50_000, n=250)[0]),
                   model="loans")
    text = TABLES_DOC.read_text()
    match = re.search(r"<!-- snippet: read-predictions -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert match, f"{TABLES_DOC.name} lost its read-predictions snippet"
    guard = ("import sys\nclass Guard:\n    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in ('driftloop', 'tasks', 'flows', 'blocks'):\n"
             "            raise ImportError('the snippet must not need driftloop: ' + name)\n"
             "sys.meta_path.insert(0, Guard())\n")
    settings = get_settings()
    env = {**os.environ, "REGISTRY_URL": settings.registry_database_url(),
           "WAREHOUSE": f"file://{settings.artifact_root_uri()}/tables", "RUN_ID": scored.run_id,
           "TABLE": "predictions.loans"}
    run = subprocess.run([sys.executable, "-c", guard + match.group(1) + "\nprint(rows.height, arrow.num_rows)\n"],
                         check=False, capture_output=True, text=True, env=env, cwd=loans["root"], timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "250 250"
