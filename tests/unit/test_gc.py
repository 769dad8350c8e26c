"""driftloop gc: a dry run lists, --apply removes, and only what no alias, version or
recent run needs."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import optuna

from driftloop.gc import collect
from driftloop.registry.store import open_registry
from driftloop.storage import ArtifactStore
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


def test_gc_removes_crashed_scoring_runs_but_never_the_current_one(tmp_path: Path) -> None:
    import polars as pl

    from driftloop.outputs import RUNS, ScoringOutput, read_predictions

    registry = open_registry(f"sqlite:///{tmp_path / 'registry.db'}")
    store = ArtifactStore(str(tmp_path / "artifacts"))
    out = tmp_path / "artifacts" / "predictions" / "loans" / "batch"
    output = ScoringOutput(str(out))
    output.claim()
    done = output.start_run()
    done.write_part(pl.DataFrame({"id": [1, 2]}), partition="00000", index=0)
    done.commit(model_name="loans", model_version=1, input_uri="in.csv", rows_in=2, rows_scored=2, rows_quarantined=0)
    crashed = output.start_run()
    crashed.write_part(pl.DataFrame({"id": [3]}), partition="00000", index=0)  # killed before its manifest
    for path in (out / RUNS / crashed.run_id).rglob("*"):
        _age(path, 3)
    in_progress = output.start_run()
    in_progress.write_part(pl.DataFrame({"id": [4]}), partition="00000", index=0)

    dry = collect(registry, store, keep_days=90, apply=False)
    assert dry.files == [f"predictions/loans/batch/{RUNS}/{crashed.run_id}"]
    assert (out / RUNS / crashed.run_id).exists()
    done_gc = collect(registry, store, keep_days=90, apply=True)
    assert done_gc.files == dry.files and not (out / RUNS / crashed.run_id).exists()
    assert (out / RUNS / in_progress.run_id).exists() and read_predictions(str(out))["id"].to_list() == [1, 2]


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
