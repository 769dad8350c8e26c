"""Retraining learns from the new period: a concept change at a known date, labels for
the scored rows of the new period, and `driftloop retrain` on a real Prefect server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from driftloop.feedback import collect_labelled_data
from driftloop.flows.labels import ingest_labels
from driftloop.flows.retrain import retrain
from driftloop.flows.score import score
from driftloop.onnx_model import load_model, predict_scores
from driftloop.registry import open_registry
from driftloop.settings import get_settings
from driftloop.spec import load_spec
from driftloop.storage import read_bytes
from driftloop.tables import open_tables
from driftloop.tasks.fit import fit_model, prepare_training_data
from driftloop.tasks.split import split_dataset
from tests.support.data import make_period, write_spec
from tests.support.models import train_fast

pytestmark = [pytest.mark.prefect, pytest.mark.usefixtures("prefect_server")]

FAST = {"trials": 3, "algorithms": ["lightgbm"]}
GATE = {"thresholds": {"roc_auc": {"min": 0.6}}, "max_regression": 0.01}


def cli(*args: str) -> subprocess.Popen[str]:
    driftloop = Path(sys.executable).with_name("driftloop")
    return subprocess.Popen([str(driftloop), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy())


def auc_of(version, frame: pl.DataFrame) -> float:
    scores = predict_scores(load_model(read_bytes(version.onnx_uri)), frame)
    return float(roc_auc_score(frame["repaid"].to_numpy(), scores))


def new_period_only_auc(spec_path: Path, new: pl.DataFrame, later: pl.DataFrame) -> float:
    """What a model trained on the new period alone reaches on the later period."""
    spec = load_spec(spec_path)
    split = split_dataset(new, spec)
    data, encoding, _ = prepare_training_data(spec, split.train, split.valid)
    fitted = fit_model("lightgbm", {"learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 20}, data, seed=0)
    scores = fitted.booster.predict(encoding.matrix(later))
    return float(roc_auc_score(later["repaid"].to_numpy(), scores))


def train_on_old(tmp_path: Path, name: str, window: dict, old: pl.DataFrame) -> Path:
    """v1, trained on the old period."""
    spec = write_spec(tmp_path, {"name": name, "gate": GATE,
                                 "retrain": {"window": window, "min_new_labels": 500}}, name=f"{name}.yaml")
    old_path = tmp_path / f"{name}-old.parquet"
    old.write_parquet(old_path)
    v1 = train_fast(spec_path=str(spec), source=str(old_path), parity_min_rows=5_000, **FAST)
    assert v1.version == 1 and v1.promoted
    return spec


def score_and_label(tmp_path: Path, spec: Path, name: str, new: pl.DataFrame) -> None:
    """The new period scored by the champion; its labels arrive later (and a correction
    for ten of them after that), plus labels for ids that were never scored."""
    new_path = tmp_path / f"{name}-new.parquet"
    new.drop("repaid").write_parquet(new_path)
    score(input_uri=str(new_path), model=f"{name}@champion")
    labels = new.select("id", "repaid")
    corrected = labels.sort("id").head(10).with_columns((1 - pl.col("repaid")).alias("repaid"))
    unscored = pl.DataFrame({"id": np.arange(900_000, 900_050), "repaid": np.ones(50, dtype=np.int64)})
    labels_path, late_path = tmp_path / f"{name}-labels.csv", tmp_path / f"{name}-late.csv"
    pl.concat([labels, unscored]).write_csv(labels_path)
    corrected.write_csv(late_path)
    ingest_labels(spec_path=str(spec), source=str(labels_path))
    ingest_labels(spec_path=str(spec), source=str(late_path))


def start_model(tmp_path: Path, name: str, window: dict, old: pl.DataFrame, new: pl.DataFrame) -> Path:
    spec = train_on_old(tmp_path, name, window, old)
    score_and_label(tmp_path, spec, name, new)
    return spec


def test_retrain_learns_the_new_concept(tmp_path: Path, home: Path) -> None:
    old = make_period(3000, start="2024-01-01", days=120, seed=1, first_id=0, concept="old")
    new = make_period(2000, start="2024-05-01", days=30, seed=2, first_id=10_000, concept="new")
    later = make_period(2000, start="2024-06-01", days=30, seed=3, first_id=20_000, concept="new")
    registry = open_registry(get_settings().registry_database_url())

    spec = train_on_old(tmp_path, "loans", {"last": "35d"}, old)
    # No labelled rows newer than the champion's data: no training, no version.
    waiting = retrain(model="loans", **FAST)
    assert waiting.skipped and waiting.reason == "waiting for labels: 0 of 500 labelled rows newer than champion v1's training data"
    assert [v.version for v in registry.list_versions("loans")] == [1]

    score_and_label(tmp_path, spec, "loans", new)
    v1 = registry.resolve("loans@champion")

    # Two retrains started together: one trains, the other is turned away by the lease.
    procs = [cli("retrain", "--model", "loans", "--trials", "3", "--json") for _ in range(2)]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(json.loads(out))
    trained = [o for o in outputs if not o["skipped"]]
    turned_away = [o for o in outputs if o["skipped"]]
    assert len(trained) == 1 and len(turned_away) == 1, outputs
    assert turned_away[0]["reason"].startswith("another retrain of loans is running")
    result = trained[0]
    assert result["promoted"], result["reason"]
    assert set(result) >= {"model", "skipped", "reason", "window", "champion", "challenger", "promoted"}
    assert result["champion"]["version"] == v1.version and result["challenger"]["version"] == v1.version + 1
    # Both models judged on the same newest rows; the challenger is better there.
    assert result["challenger"]["metrics"]["roc_auc"] > result["champion"]["metrics"]["roc_auc"]

    v2 = registry.resolve("loans@champion")
    window = v2.window
    assert window is not None and window["policy"] == "last 35d"
    assert window["end"] > v1.split["holdout"][1]  # it learned from data after v1's
    assert window["rows"] >= 2000 and window["new_labels"] == 2000 and window["labels_unscored"] == 50
    assert window["scoring_runs"] and datetime.fromisoformat(window["start"]) >= datetime(2024, 4, 25)

    auc_v1, auc_v2 = auc_of(v1, later), auc_of(v2, later)
    auc_new_only = new_period_only_auc(spec, new, later)
    print(f"\nconcept drift, later period ROC AUC: champion v{v1.version} {auc_v1:.4f}, "
          f"retrained v{v2.version} (last 35d) {auc_v2:.4f}, trained on the new period only {auc_new_only:.4f}")
    # Relative to this world's own gap (several seeds: tests/unit/test_retrain_window_seeds.py).
    gap = auc_new_only - auc_v1
    assert gap > 0
    assert auc_v2 - auc_v1 >= 0.8 * gap

    # The same data again is never a promoted clone: nothing new has been labelled.
    cooled = retrain(model="loans", **FAST)
    assert cooled.skipped and cooled.reason.startswith("cooldown: the last retrain of loans started at")
    again = retrain(model="loans", cooldown_s=0, **FAST)
    assert again.skipped and again.reason.startswith("waiting for labels: 0 of 500")
    assert registry.resolve("loans@champion").version == v2.version

    # window {all: true}: old and new concept mixed; recorded, and worse on the later period.
    start_model(tmp_path, "loans-all", {"all": True}, old, new)
    mixed = retrain(model="loans-all", **FAST)
    assert not mixed.skipped and mixed.window is not None
    assert mixed.window.policy == "all labelled rows" and mixed.window.rows == old.height + new.height
    assert mixed.window.start == str(old["ts"].min())
    v_all = registry.get_version("loans-all", mixed.challenger.version)
    auc_all = auc_of(v_all, later)
    print(f"window all: {mixed.window.rows} rows; later period ROC AUC {auc_all:.4f} "
          f"({'promoted' if mixed.promoted else 'rejected'}: {mixed.reason})")
    assert auc_all - auc_v1 <= auc_v2 - auc_v1 - 0.1 * gap  # half the window follows the old concept


def test_feedback_joins_labels_to_scored_rows(tmp_path: Path, home: Path) -> None:
    """The join itself on registered data: a later label wins; unscored labels counted."""
    old = make_period(600, start="2024-01-01", days=60, seed=4, first_id=0)
    new = make_period(300, start="2024-03-01", days=10, seed=5, first_id=5_000, concept="new")
    spec_path = start_model(tmp_path, "fb", {"all": True}, old, new)
    spec = load_spec(spec_path)
    registry = open_registry(get_settings().registry_database_url())
    data = collect_labelled_data(registry, open_tables(registry.engine, get_settings().artifact_root_uri()), spec)
    assert data.labels == 300 + 50 and data.labels_unscored == 50
    assert data.frame.height == 600 + 300 and data.frame["id"].n_unique() == 900
    feedback = data.frame.filter(pl.col("id") >= 5_000).sort("id")
    expected = new.sort("id")["repaid"].to_list()
    expected[:10] = [1 - y for y in expected[:10]]  # the later label wins
    assert feedback["repaid"].to_list() == expected
    assert len(data.scoring_runs) == 1 and len(data.datasets) == 1 and not data.skipped
