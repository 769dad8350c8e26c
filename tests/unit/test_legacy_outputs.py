"""The upgrade to the tables keeps every row scored and every label registered before
them: scoring outputs (manifests, the pre-manifest _SUCCESS layout) and `.labels`
datasets recorded in the registry are imported once; running the import again adds
nothing; an unreadable output is reported and left; nothing is deleted."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

import driftloop.legacy_outputs as legacy
from driftloop.feedback import latest_labels
from driftloop.legacy_outputs import LEGACY, SUPERSEDED, import_legacy_outputs
from driftloop.outputs import LEGACY_SUCCESS, ScoringOutput
from driftloop.registry import DatasetRecord, RegistryStore
from driftloop.registry.store import open_registry
from driftloop.spec import load_spec
from driftloop.storage import ArtifactStore
from driftloop.tables import Tables, open_tables
from tests.support.data import write_spec
from tests.unit.test_gc import _scoring_run

SECRET_INPUT = "s3://alice:hunter2@bucket/nightly/in.parquet"


def _scored(ids: list[int], version: int = 1) -> pl.DataFrame:
    n = len(ids)
    return pl.DataFrame({
        "id": ids, "ts": [datetime(2025, 6, 1) + timedelta(days=i) for i in ids],
        "amount": [100.0 * i for i in ids], "ratio": [0.5] * n, "prev_ok": [True] * n, "term": [12] * n,
        "band": pl.Series(["low"] * n, dtype=pl.Categorical),
        "prediction": [i % 2 for i in ids], "probability": [0.25 + 0.5 * (i % 2) for i in ids],
        "model_name": ["loans"] * n, "model_version": pl.Series([version] * n, dtype=pl.Int64),
        "scored_at": pl.Series([datetime(2025, 7, 1, tzinfo=UTC)] * n).dt.cast_time_unit("us"),
    })


def _manifest_run(output: ScoringOutput, ids: list[int]) -> str:
    run = output.start_run()
    run.write_part(_scored(ids[: len(ids) // 2]), partition="00000", index=0)
    run.write_part(_scored(ids[len(ids) // 2:]), partition="00000", index=1)
    run.commit(model_name="loans", model_version=1, input_uri=SECRET_INPUT, rows_in=len(ids), rows_scored=len(ids),
               rows_quarantined=0)
    return run.run_id


def _labels_dataset(registry: RegistryStore, store: ArtifactStore, ids: list[int], target: list[bool],
                    created_at: datetime, source: str) -> DatasetRecord:
    dataset_id = "ds_" + uuid.uuid4().hex[:16]
    uri = store.write_parquet(f"datasets/loans.labels/{dataset_id}/rows.parquet",
                              pl.DataFrame({"id": ids, "repaid": target}))
    record = DatasetRecord(id=dataset_id, name="loans.labels", content_hash=uuid.uuid4().hex, spec_hash="s" * 64,
                           source=source, labelled=True, rows_in=len(ids), rows_valid=len(ids), rows_quarantined=0,
                           snapshot_uri=uri, quarantine_uri=None, column_types={}, created_at=created_at)
    return registry.add_dataset(record)[0]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


class Before:
    """A registry and artifact store as the release before the tables left them."""

    def __init__(self, tmp_path: Path) -> None:
        self.registry = open_registry(f"sqlite:///{tmp_path / 'registry.db'}")
        self.root = str(tmp_path / "artifacts")
        self.store = ArtifactStore(self.root)
        self.spec = load_spec(write_spec(tmp_path))
        t0 = datetime(2025, 7, 1, tzinfo=UTC)
        # A manifest output scored twice: the second run replaced the first one's rows.
        self.nightly = tmp_path / "artifacts" / "predictions" / "loans" / "data"
        output = ScoringOutput(str(self.nightly))
        output.claim()
        self.old_run = _manifest_run(output, [1, 2, 3, 4])
        self.current_run = _manifest_run(output, [1, 2, 3, 4, 5, 6])
        # An output committed before manifests: _SUCCESS and part-NNNNN.parquet.
        self.success = tmp_path / "exports" / "old"
        self.success.mkdir(parents=True)
        _scored([10, 11, 12]).write_parquet(self.success / "part-00000.parquet")
        (self.success / LEGACY_SUCCESS).write_text("")
        self.missing = tmp_path / "exports" / "gone"  # a user deleted it
        for run_id, uri, at, rows in ((self.old_run, self.nightly, t0, 4),
                                      (self.current_run, self.nightly, t0 + timedelta(days=1), 6),
                                      ("success-run", self.success, t0, 3), ("missing-run", self.missing, t0, 2)):
            self.registry.add_scoring_run(_scoring_run(run_id, None, output_uri=str(uri), input_uri=SECRET_INPUT.replace(
                "alice:hunter2", "***"), rows=rows, finished_at=at, input_key=None))
        # A run recorded after the tables: not the import's business.
        self.registry.add_scoring_run(_scoring_run("table-run", 123, input_key="key"))
        self.labels_first = _labels_dataset(self.registry, self.store, [1, 2, 3], [False, False, False], t0, "a.csv")
        self.labels_later = _labels_dataset(self.registry, self.store, [2, 3], [True, True], t0 + timedelta(days=2),
                                            "b.csv")
        self.scored_rows = ScoringOutput(str(self.nightly)).read().height + ScoringOutput(str(self.success)).read().height
        self.files = {"nightly": _files(self.nightly), "success": _files(self.success)}

    def tables(self) -> Tables:
        return open_tables(self.registry.engine, self.root)


@pytest.fixture(autouse=True)
def _fresh_process_memo() -> None:
    legacy._done.clear()


def test_upgrade_keeps_every_scored_row_and_label_and_a_second_run_adds_nothing(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    before = Before(tmp_path)
    monkeypatch.setattr(legacy, "_spec_from_registry", lambda registry, model: before.spec)  # no artifact here
    tables = before.tables()

    report = import_legacy_outputs(before.registry, tables, before.root)  # what `driftloop db upgrade` runs

    table = tables.predictions("loans")
    assert table is not None
    rows = table.scan().collect()
    assert rows.height == before.scored_rows == 9
    assert sorted(rows["id"].to_list()) == [1, 2, 3, 4, 5, 6, 10, 11, 12]
    by_run = {r: sorted(g["id"].to_list()) for (r,), g in rows.group_by("scoring_run_id")}
    assert by_run == {before.current_run: [1, 2, 3, 4, 5, 6], "success-run": [10, 11, 12]}
    assert set(rows["role"]) == {"served"} and set(rows["scoring_form"]) == {"onnx"}
    assert set(rows["input_key"]) == {f"s3://***@bucket/nightly/in.parquet{LEGACY}"}
    assert not any("hunter2" in k for k in rows["input_key"])
    # the records: the current run names its snapshot; the one it replaced is marked; the unreadable one is left
    runs = {r.id: r for r in before.registry.list_scoring_runs()}
    imported = {r.run_id: r for r in report.scoring_runs}
    assert set(imported) == {before.current_run, "success-run"}
    assert runs[before.current_run].snapshot_id == imported[before.current_run].snapshot_id is not None
    assert table.scan(runs[before.current_run].snapshot_id).filter(
        pl.col("scoring_run_id") == before.current_run).collect().height == 6
    assert runs[before.old_run].snapshot_id is None
    assert runs[before.old_run].input_key.endswith(f"{SUPERSEDED}{before.current_run}")
    assert imported[before.current_run].superseded == [before.old_run]
    assert (runs["missing-run"].snapshot_id, runs["missing-run"].input_key) == (None, None)
    assert len(report.problems) == 1 and "missing-run" in report.problems[0]
    assert (runs["table-run"].snapshot_id, runs["table-run"].input_key) == (123, "key")
    # labels: both datasets, oldest first, registered when they were; the later one wins
    labels_table = tables.labels("loans")
    assert labels_table is not None
    label_rows = labels_table.scan().collect()
    assert label_rows.height == 5
    assert set(label_rows["registration_id"]) == {before.labels_first.id, before.labels_later.id}
    assert set(label_rows["source"]) == set(label_rows["registration_id"])
    latest, _ = latest_labels(tables, before.spec)
    assert latest is not None
    assert dict(latest.select("id", "repaid").collect().sort("id").iter_rows()) == {1: False, 2: True, 3: True}
    # nothing deleted or changed in the old outputs
    assert _files(before.nightly) == before.files["nightly"] and _files(before.success) == before.files["success"]

    snapshots = ({s.snapshot_id for s in table.refresh().table.snapshots()},
                 {s.snapshot_id for s in labels_table.refresh().table.snapshots()})
    legacy._done.clear()
    again = import_legacy_outputs(before.registry, tables, before.root)
    assert again.scoring_runs == [] and again.labels == [] and len(again.problems) == 1  # the missing output, again
    assert table.scan().collect().height == 9 and labels_table.scan().collect().height == 5
    assert ({s.snapshot_id for s in table.refresh().table.snapshots()},
            {s.snapshot_id for s in labels_table.refresh().table.snapshots()}) == snapshots
    # the score flow's call for one model: nothing either
    assert not import_legacy_outputs(before.registry, tables, before.root, model="loans", spec=before.spec).imported


def test_an_import_cut_short_before_its_record_leaves_one_copy(tmp_path: Path) -> None:
    before = Before(tmp_path)
    tables = before.tables()
    real_mark = legacy._mark_runs

    def crash(*args: object) -> None:
        raise KeyboardInterrupt("killed between the table commit and the registry update")

    legacy._mark_runs = crash  # type: ignore[assignment]
    try:
        with pytest.raises(KeyboardInterrupt):
            import_legacy_outputs(before.registry, tables, before.root, model="loans", spec=before.spec)
    finally:
        legacy._mark_runs = real_mark  # type: ignore[assignment]
    report = import_legacy_outputs(before.registry, tables, before.root, model="loans", spec=before.spec)
    assert report.imported
    table = tables.predictions("loans")
    assert table is not None
    ids = table.scan().select("id").collect()["id"]
    assert ids.len() == before.scored_rows and ids.n_unique() == ids.len()


def test_labels_registered_through_the_table_are_not_imported_again(tmp_path: Path) -> None:
    before = Before(tmp_path)
    tables = before.tables()
    # After the upgrade, `driftloop labels` made a dataset and appended the same rows to the table.
    now = datetime.now(UTC)
    after = _labels_dataset(before.registry, before.store, [7, 8], [True, False], now, "c.csv")
    table = tables.labels("loans", sample=pl.DataFrame({
        "id": [7, 8], "repaid": [True, False], "label_timestamp": pl.Series([None, None], dtype=pl.Datetime("us")),
        "registered_at": pl.Series([now + timedelta(seconds=1)] * 2).dt.cast_time_unit("us"),
        "source": ["c.csv"] * 2, "registration_id": ["reg-1"] * 2}))
    assert table is not None
    table.append(pl.DataFrame({
        "id": [7, 8], "repaid": [True, False],
        "registered_at": pl.Series([now + timedelta(seconds=1)] * 2).dt.cast_time_unit("us"),
        "source": ["c.csv"] * 2, "registration_id": ["reg-1"] * 2}))
    report = import_legacy_outputs(before.registry, tables, before.root, model="loans", spec=before.spec)
    assert report.labels_already_in == [after.id]
    assert {x.dataset_id for x in report.labels} == {before.labels_first.id, before.labels_later.id}
    assert table.scan().collect().height == 2 + 5
    assert table.refresh().table.properties.get(legacy.LABELS_DONE) == "true"
