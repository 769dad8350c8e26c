"""driftloop gc: a dry run lists, --apply removes, and only what no alias, version or
recent run needs."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import optuna
import polars as pl
import pytest
from pyiceberg.expressions import EqualTo

from driftloop.errors import DriftloopError
from driftloop.gc import collect
from driftloop.registry import RegistryStore, ScoringRunRecord
from driftloop.registry.store import open_registry
from driftloop.storage import ArtifactStore
from driftloop.tables import INPUT_KEY, MemoryTable, TableError, Tables, open_tables
from driftloop.tasks.register import register_unaliased, store_onnx
from tests.unit.test_registry import version_draft


def _age(path: Path, hours: float) -> None:
    then = time.time() - hours * 3600
    os.utime(path, (then, then))


def test_gc_removes_only_what_nothing_needs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    registry = open_registry(url)
    store = ArtifactStore(str(tmp_path / "artifacts"))
    kept_onnx = store.write_bytes(f"models/loans/onnx/{'0' * 64}.onnx", b"registered")
    registry.register_version(version_draft(onnx_uri=kept_onnx, onnx_sha256="0" * 64))
    orphan = Path(store.write_bytes(f"models/loans/onnx/{'f' * 64}.onnx", b"crashed before registering"))
    fresh_orphan = Path(store.write_bytes(f"models/loans/onnx/{'e' * 64}.onnx", b"a run registering right now"))
    _age(orphan, 5)
    now = datetime.now(UTC)
    for run_id, days in (("old-1", 200), ("old-2", 120), ("recent", 3)):
        registry.add_monitoring_run({
            "id": run_id, "model_name": "loans", "model_version": 1, "analysis_uri": "x", "labels_uri": None,
            "decision": {}, "event": None, "report_uri": None, "created_at": now - timedelta(days=days)}, [])
        store.write_text(f"monitoring/loans/{run_id}/summary.md", "report")
    only = ("old-only", 300)  # a model's newest run is kept, however old
    registry.register_version(version_draft(name="other"))
    registry.add_monitoring_run({"id": only[0], "model_name": "other", "model_version": 1, "analysis_uri": "x",
                                 "labels_uri": None, "decision": {}, "event": None, "report_uri": None,
                                 "created_at": now - timedelta(days=only[1])}, [])
    staging = tmp_path / "artifacts" / "predictions" / "loans" / ".tmp-run-abc"
    staging.mkdir(parents=True)
    (staging / "part-0.parquet").write_bytes(b"half written")
    _age(staging, 3)
    study = optuna.create_study(study_name="loans-xgboost-run1", storage=url)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)

    dry = collect(registry, store, keep_days=90, apply=False, now=now + timedelta(days=100))
    # 100 days on: the study is old too; each model's newest run stays, however old.
    assert sorted(dry.monitoring_runs) == ["old-1", "old-2"] and "old-only" not in dry.monitoring_runs
    assert dry.studies == ["loans-xgboost-run1"]
    assert f"models/loans/onnx/{'f' * 64}.onnx" in dry.files and "predictions/loans/.tmp-run-abc" in dry.files
    assert f"models/loans/onnx/{'0' * 64}.onnx" not in dry.files  # a version points at it
    assert orphan.exists() and staging.exists()  # a dry run changes nothing

    done = collect(registry, store, keep_days=90, apply=True, now=now)
    assert sorted(done.monitoring_runs) == ["old-1", "old-2"] and done.applied
    assert [r["id"] for r in registry.list_monitoring_runs("loans")] == ["recent"]
    assert [r["id"] for r in registry.list_monitoring_runs("other")] == ["old-only"]
    assert not orphan.exists() and not staging.exists() and fresh_orphan.exists()
    assert not (tmp_path / "artifacts" / "monitoring" / "loans" / "old-1").exists()
    assert (tmp_path / "artifacts" / "monitoring" / "loans" / "recent" / "summary.md").exists()
    assert Path(kept_onnx).exists()
    assert done.studies == []  # started today: within the retention


def _scoring_run(run_id: str, snapshot_id: int | None, *, model: str = "loans", output_uri: str = "predictions.loans",
                 input_uri: str = "in.csv", rows: int = 3, finished_at: datetime | None = None,
                 input_key: str | None = "k") -> ScoringRunRecord:
    at = finished_at or datetime.now(UTC)
    return ScoringRunRecord(id=run_id, model_name=model, model_version=1, onnx_sha256="0" * 64, input_uri=input_uri,
                            output_uri=output_uri, quarantine_uri=None, rows_in=rows, rows_scored=rows,
                            rows_quarantined=0, started_at=at, finished_at=at, snapshot_id=snapshot_id,
                            input_key=input_key)


def _rows(ids: list[int], key: str) -> pl.DataFrame:
    return pl.DataFrame({"id": ids, "ts": [datetime(2026, 1, 1 + i) for i in range(len(ids))],
                         "x": [float(i) for i in ids], "prediction": [0] * len(ids),
                         "model_version": [1] * len(ids), "input_key": [key] * len(ids), "role": ["served"] * len(ids),
                         "scoring_run_id": [f"run-{key}"] * len(ids)})


def _commit(table: MemoryTable, ids: list[int], key: str, *, replace: bool = False) -> int:
    writer = table.writer()
    writer.write(_rows(ids, key))
    return writer.commit(replace=EqualTo(INPUT_KEY, key) if replace else None)


def _label_rows(ids: list[int], registration: str) -> pl.DataFrame:
    return pl.DataFrame({"id": ids, "y": [1] * len(ids), "registered_at": [datetime.now(UTC)] * len(ids),
                         "registration_id": [registration] * len(ids)})


def _files(table: MemoryTable) -> set[Path]:
    root = Path(table.table.location().removeprefix("file://"))
    return {p for p in root.rglob("*") if p.is_file()}


def _history(tmp_path: Path) -> tuple[RegistryStore, ArtifactStore, Tables, dict[str, int], Path]:
    """A predictions table with four snapshots and a labels table with three, some named
    by records, and a crashed writer's data file."""
    registry = open_registry(f"sqlite:///{tmp_path / 'registry.db'}")
    store = ArtifactStore(str(tmp_path / "artifacts"))
    tables = open_tables(registry.engine, store.uri("").rstrip("/"))
    predictions = tables.predictions("loans", sample=_rows([0], "a"), timestamp="ts")
    labels = tables.labels("loans", sample=_label_rows([0], "r0"))
    assert predictions is not None and labels is not None
    snaps = {
        "p1": _commit(predictions, [1, 2, 3], "a"),  # named by nothing; its rows replaced by p2
        "p2": _commit(predictions, [4, 5, 6], "a", replace=True),  # a scoring run's
        "p3": _commit(predictions, [7, 8, 9], "b"),  # the newest monitoring run's
        "p4": _commit(predictions, [10, 11, 12], "c"),  # current
        "l1": labels.append(_label_rows([1, 2], "r1")),  # a training window's
        "l2": labels.append(_label_rows([3], "r2")),  # only an old monitoring run's, which gc removes
        "l3": labels.append(_label_rows([4], "r3")),  # current
    }
    registry.register_version(version_draft(window={"predictions_snapshot": None, "labels_snapshot": snaps["l1"]}))
    registry.add_scoring_run(_scoring_run("run-p2", snaps["p2"]))
    now = datetime.now(UTC)
    for run_id, days, named in (("mon-old", 200, {"labels": snaps["l2"]}), ("mon-new", 1, {"predictions": snaps["p3"]})):
        registry.add_monitoring_run({
            "id": run_id, "model_name": "loans", "model_version": 1, "analysis_uri": "x", "labels_uri": None,
            "decision": {}, "event": None, "report_uri": None, "created_at": now - timedelta(days=days),
            "snapshots": named}, [])
    stray = Path(predictions.table.location().removeprefix("file://")) / "data" / "crashed-writer.parquet"
    _rows([99], "z").write_parquet(stray)
    return registry, store, tables, snaps, stray


def test_gc_keeps_every_snapshot_a_record_names_and_expires_the_rest(tmp_path: Path) -> None:
    registry, store, tables, snaps, stray = _history(tmp_path)
    predictions, labels = tables.predictions("loans"), tables.labels("loans")
    assert predictions is not None and labels is not None
    p1_files = {f for f in _files(predictions)}
    before = {s.snapshot_id for s in predictions.table.snapshots()}
    # p1, and the delete half of p2's replace (one transaction, two snapshots): named by nothing
    unnamed = sorted(before - {snaps["p2"], snaps["p3"], snaps["p4"]})
    assert snaps["p1"] in unnamed and len(unnamed) == 2
    later = datetime.now(UTC) + timedelta(days=100)  # every snapshot and file is old by then

    dry = collect(registry, store, keep_days=90, apply=False, now=later, tables=tables)
    by_table = {t.table: t for t in dry.tables}
    assert by_table["predictions.loans"].snapshots == unnamed
    assert by_table["predictions.loans"].kept_named == sorted([snaps["p2"], snaps["p3"]])
    assert by_table["labels.loans"].snapshots == [snaps["l2"]]  # its only record is an old monitoring run
    assert by_table["labels.loans"].kept_named == [snaps["l1"]]
    shown = by_table["predictions.loans"].files
    data = [f for f in shown if f.startswith("tables/predictions/loans/data/")]
    # the crashed writer's file, and p1's data file (ids 1-3: p2 replaced them), referenced by p1 alone
    assert len(data) == 2 and "tables/predictions/loans/data/crashed-writer.parquet" in data
    p1_data = next(f for f in data if "crashed" not in f)
    assert pl.read_parquet(store.path(p1_data))["id"].to_list() == [1, 2, 3]
    assert any(f.startswith("tables/predictions/loans/metadata/snap-") for f in shown)  # expired manifest lists
    # a dry run changes nothing
    assert {s.snapshot_id for s in predictions.refresh().table.snapshots()} == before
    assert _files(predictions) == p1_files and stray.exists()
    assert predictions.scan(snaps["p1"]).select("id").collect()["id"].sort().to_list() == [1, 2, 3]
    assert [r["id"] for r in registry.list_monitoring_runs("loans")] == ["mon-new", "mon-old"]

    done = collect(registry, store, keep_days=90, apply=True, now=later, tables=tables)
    assert done.applied and done.monitoring_runs == ["mon-old"]
    done_tables = {t.table: t for t in done.tables}
    assert done_tables["predictions.loans"].snapshots == unnamed
    assert sorted(done_tables["predictions.loans"].files) == sorted(shown)
    assert {s.snapshot_id for s in predictions.refresh().table.snapshots()} == {snaps["p2"], snaps["p3"], snaps["p4"]}
    assert {s.snapshot_id for s in labels.refresh().table.snapshots()} == {snaps["l1"], snaps["l3"]}
    assert not stray.exists()
    # every named snapshot still reads exactly; the current one has every row
    assert predictions.scan(snaps["p2"]).select("id").collect()["id"].sort().to_list() == [4, 5, 6]
    assert predictions.scan(snaps["p3"]).select("id").collect()["id"].sort().to_list() == [4, 5, 6, 7, 8, 9]
    assert predictions.scan().select("id").collect()["id"].sort().to_list() == [4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert labels.scan(snaps["l1"]).select("id").collect()["id"].sort().to_list() == [1, 2]
    with pytest.raises(TableError, match="no snapshot"):
        predictions.scan(snaps["p1"])
    # nothing left to do
    again = collect(registry, store, keep_days=90, apply=False, now=later, tables=tables)
    assert all(not t.snapshots and not t.files for t in again.tables)


def test_orphan_files_wait_for_the_grace(tmp_path: Path) -> None:
    registry, store, tables, snaps, stray = _history(tmp_path)
    predictions = tables.predictions("loans")
    assert predictions is not None
    keep = 1e-6  # days (0.09 s): every snapshot is past the retention, only the grace keeps anything
    # Everything was written (and superseded) seconds ago: within the hour's grace.
    young = collect(registry, store, keep_days=keep, apply=True, tables=tables)
    assert all(not t.snapshots and not t.files for t in young.tables) and stray.exists()
    assert snaps["p1"] in {s.snapshot_id for s in predictions.refresh().table.snapshots()}
    # A crashed writer's file from three hours ago goes; the snapshots are still young.
    _age(stray, 3)
    aged = collect(registry, store, keep_days=keep, apply=True, tables=tables)
    assert [f for t in aged.tables for f in t.files] == ["tables/predictions/loans/data/crashed-writer.parquet"]
    assert not stray.exists()
    # No grace at all: p1 expires now, and its data file with it.
    done = collect(registry, store, keep_days=keep, apply=True, tables=tables, grace=timedelta(0))
    assert snaps["p1"] in {t.table: t.snapshots for t in done.tables}["predictions.loans"]
    assert any(f.startswith("tables/predictions/loans/data/") for t in done.tables for f in t.files)
    assert predictions.scan().select("id").collect()["id"].sort().to_list() == [4, 5, 6, 7, 8, 9, 10, 11, 12]


def test_gc_keeps_partitioned_runs_quarantine_and_removes_uncommitted_work_areas(tmp_path: Path) -> None:
    registry = open_registry(f"sqlite:///{tmp_path / 'registry.db'}")
    store = ArtifactStore(str(tmp_path / "artifacts"))
    tables = open_tables(registry.engine, store.uri("").rstrip("/"))
    table = tables.predictions("loans", sample=_rows([0], "a"), timestamp="ts")
    assert table is not None
    committed_unrecorded = "run-committed-then-crashed"
    writer = table.writer()
    writer.write(_rows([1], "a").with_columns(pl.lit(committed_unrecorded).alias("scoring_run_id")))
    writer.commit()
    registry.add_scoring_run(_scoring_run("run-recorded", table.snapshot_id()))
    areas = {}
    for run_id in ("run-recorded", committed_unrecorded, "run-crashed", "run-in-progress"):
        part = tmp_path / "artifacts" / "scoring" / "loans" / run_id / "runs" / run_id / "quarantine" / "part-00000-00000.parquet"
        part.parent.mkdir(parents=True)
        part.write_bytes(b"quarantined rows")
        if run_id != "run-in-progress":
            _age(part, 3)
        areas[run_id] = part
    dry = collect(registry, store, keep_days=90, apply=False, tables=tables)
    assert dry.files == ["scoring/loans/run-crashed"]
    done = collect(registry, store, keep_days=90, apply=True, tables=tables)
    assert done.files == ["scoring/loans/run-crashed"]
    assert not areas["run-crashed"].exists()
    assert all(areas[r].exists() for r in ("run-recorded", committed_unrecorded, "run-in-progress"))


def test_gc_keeps_every_file_a_version_or_dataset_points_at(tmp_path: Path) -> None:
    """A version's whole lineage survives gc however old: its ONNX artifact, its other
    scoring forms, its model card and monitoring reference, and the snapshot of the
    dataset it was trained on; beside them, an unreferenced old ONNX file goes."""
    import hashlib

    from driftloop.registry.store import DatasetRecord

    registry = open_registry(f"sqlite:///{tmp_path / 'registry.db'}")
    store = ArtifactStore(str(tmp_path / "artifacts"))

    def artifact(relpath: str, data: bytes) -> tuple[str, str]:
        return store.write_bytes(relpath, data), hashlib.sha256(data).hexdigest()

    onnx_uri, onnx_sha = artifact(f"models/loans/onnx/{hashlib.sha256(b'onnx').hexdigest()}.onnx", b"onnx")
    forms = [{"kind": "onnx", "uri": onnx_uri, "sha256": onnx_sha}]
    for kind, ext in (("native", "ubj"), ("tensor", "onnx")):
        data = f"{kind} form".encode()
        uri, sha = artifact(f"models/loans/{kind}/{hashlib.sha256(data).hexdigest()}.{ext}", data)
        forms.append({"kind": kind, "uri": uri, "sha256": sha})
    forms = [{**f, "parity_rows": 100_000, "parity_max_abs_diff": 0.0, "parity_flips": 0, "rows_per_s": 1.0} for f in forms]
    snapshot, _ = artifact("datasets/loans/ds_lineage/rows.parquet", b"training rows")
    registry.add_dataset(DatasetRecord(
        id="ds_lineage", name="loans", content_hash="c" * 64, spec_hash="s" * 64, source="train.csv", labelled=True,
        rows_in=1, rows_valid=1, rows_quarantined=0, snapshot_uri=snapshot, quarantine_uri=None, column_types={},
        created_at=datetime.now(UTC) - timedelta(days=400)))
    version = registry.register_version(version_draft(onnx_uri=onnx_uri, onnx_sha256=onnx_sha, forms=forms,
                                                      dataset_id="ds_lineage")).version
    reference, reference_sha = artifact(f"models/loans/v{version}/reference.parquet", b"reference rows")
    registry.set_reference("loans", version, reference, reference_sha)
    card, _ = artifact(f"models/loans/v{version}/model_card.md", b"# card")
    registry.set_card_uri("loans", version, card)
    orphan, _ = artifact(f"models/loans/onnx/{'f' * 64}.onnx", b"never registered")
    lineage = [onnx_uri, *(f["uri"] for f in forms), snapshot, reference, card]
    for uri in [*lineage, orphan]:
        _age(Path(uri), 24 * 400)

    later = datetime.now(UTC) + timedelta(days=400)
    dry = collect(registry, store, keep_days=1, apply=False, now=later)
    done = collect(registry, store, keep_days=1, apply=True, now=later)
    kept = {str(Path(u).relative_to(tmp_path / "artifacts")) for u in lineage}
    assert not kept & set(dry.files) and not kept & set(done.files), (dry.files, done.files)
    assert all(Path(u).exists() for u in lineage), [u for u in lineage if not Path(u).exists()]
    assert f"models/loans/onnx/{'f' * 64}.onnx" in done.files and not Path(orphan).exists()  # gc did run
    assert registry.get_version("loans", version).forms == forms


@pytest.mark.parametrize("keep_days", [0, -5, float("nan"), float("inf")])
def test_gc_refuses_a_retention_that_is_not_a_positive_number_of_days(tmp_path: Path, keep_days: float) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    registry = open_registry(url)
    store = ArtifactStore(str(tmp_path / "artifacts"))
    study = optuna.create_study(study_name="loans-lightgbm-run1", storage=url)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    with pytest.raises(DriftloopError, match="keep.days"):
        collect(registry, store, keep_days=keep_days, apply=True)
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["loans-lightgbm-run1"]


def test_gc_never_deletes_a_study_with_a_running_trial(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    registry = open_registry(url)
    store = ArtifactStore(str(tmp_path / "artifacts"))
    done = optuna.create_study(study_name="loans-xgboost-done", storage=url)
    done.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    running = optuna.create_study(study_name="loans-xgboost-running", storage=url)
    running.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    running.ask()  # a worker is evaluating this trial now
    later = datetime.now(UTC) + timedelta(days=100)  # both studies started long before the retention
    dry = collect(registry, store, keep_days=90, apply=False, now=later)
    assert dry.studies == ["loans-xgboost-done"]
    applied = collect(registry, store, keep_days=90, apply=True, now=later)
    assert applied.studies == ["loans-xgboost-done"]
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["loans-xgboost-running"]


def test_a_training_runs_artifact_is_kept_until_it_registers(tmp_path: Path) -> None:
    """Training stores the ONNX artifact, then builds its forms and evaluates it before
    it registers the version: however long that takes, gc leaves the artifact alone.
    One that never registers (the run crashed) goes once its pending mark is stale."""
    registry = open_registry(f"sqlite:///{tmp_path / 'registry.db'}")
    store = ArtifactStore(str(tmp_path / "artifacts"))
    registry.register_version(version_draft())  # the model exists (a retrain, not a first training)
    in_flight, sha = store_onnx(store, "loans", b"a model whose forms are being built")
    crashed, _ = store_onnx(store, "loans", b"a model whose training crashed before registering")
    hours_later = datetime.now(UTC) + timedelta(hours=5)
    during = collect(registry, store, keep_days=90, apply=True, now=hours_later)
    assert Path(in_flight).exists() and Path(crashed).exists(), during.files
    record = register_unaliased(registry, version_draft(onnx_uri=in_flight, onnx_sha256=sha))
    assert record.onnx_sha256 == sha
    days_later = datetime.now(UTC) + timedelta(days=3)
    after = collect(registry, store, keep_days=90, apply=True, now=days_later)
    assert Path(in_flight).exists()  # registered: lineage
    assert not Path(crashed).exists() and str(Path(crashed).relative_to(tmp_path / "artifacts")) in after.files
    assert not list((tmp_path / "artifacts" / "models" / "loans" / "onnx").glob("*.pending"))  # no mark left behind


def test_a_first_training_that_crashed_leaves_nothing_behind(tmp_path: Path) -> None:
    """The first training of a new model crashed before registering: the registry has no
    version of that model at all, and its artifact still goes once its mark is stale."""
    registry = open_registry(f"sqlite:///{tmp_path / 'registry.db'}")
    store = ArtifactStore(str(tmp_path / "artifacts"))
    registry.register_version(version_draft(name="loans"))
    crashed, _ = store_onnx(store, "brand_new", b"the first model of a name, never registered")
    after = collect(registry, store, keep_days=90, apply=True, now=datetime.now(UTC) + timedelta(days=3))
    assert not Path(crashed).exists()
    assert str(Path(crashed).relative_to(tmp_path / "artifacts")) in after.files
    assert not list((tmp_path / "artifacts" / "models" / "brand_new" / "onnx").glob("*"))  # the stale mark went too
