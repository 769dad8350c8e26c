"""The retrain's window on several worlds, not one lucky seed: after a concept change,
a model trained on the window driftloop selects (``select_window``, the spec's
``last: 35d``) recovers most of what a model trained on the new period alone recovers
over the stale champion, and a window of all labelled rows (half of it the old concept)
recovers clearly less. Margins are fractions of each world's own gap, not absolute AUC."""

from __future__ import annotations

from datetime import datetime

import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from driftloop.feedback import REGISTERED_AT, SOURCE, LabelledData, select_window
from driftloop.spec import RetrainPolicy, load_spec
from driftloop.tasks.fit import fit_model, prepare_training_data
from driftloop.tasks.split import split_dataset
from tests.support.data import make_period, write_spec

SEEDS = (11, 23, 37, 41, 59)
PARAMS = {"learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 20}


def _auc_on(spec, train: pl.DataFrame, later: pl.DataFrame) -> float:
    split = split_dataset(train, spec)
    data, encoding, _ = prepare_training_data(spec, split.train, split.valid)
    booster = fit_model("lightgbm", PARAMS, data, seed=0, threads=1).booster
    return float(roc_auc_score(later["repaid"].to_numpy(), booster.predict(encoding.matrix(later))))


def _labelled(old: pl.DataFrame, new: pl.DataFrame) -> LabelledData:
    registered = datetime(2024, 7, 1)
    tagged = [frame.with_columns(pl.lit(source).alias(SOURCE), pl.lit(registered).alias(REGISTERED_AT))
              for frame, source in ((old, "dataset-old"), (new, "scoring-run-new"))]
    return LabelledData(frame=pl.concat(tagged), datasets=["dataset-old"], scoring_runs=["scoring-run-new"])


@pytest.mark.parametrize("seed", SEEDS)
def test_the_selected_window_recovers_most_of_the_gap_on_every_seed(tmp_path, seed: int) -> None:
    spec = load_spec(write_spec(tmp_path))
    old = make_period(3000, start="2024-01-01", days=120, seed=seed, first_id=0, concept="old")
    new = make_period(2000, start="2024-05-01", days=30, seed=seed + 1, first_id=10_000, concept="new")
    later = make_period(2000, start="2024-06-01", days=30, seed=seed + 2, first_id=20_000, concept="new")
    data = _labelled(old, new)

    window = select_window(data, spec, RetrainPolicy(window={"last": "35d"}), champion_end=old["ts"].max())
    everything = select_window(data, spec, RetrainPolicy(window={"all": True}), champion_end=old["ts"].max())
    assert window.record.new_labels == new.height and window.record.scoring_runs == ["scoring-run-new"]
    assert everything.record.rows == old.height + new.height

    stale = _auc_on(spec, old, later)
    oracle = _auc_on(spec, new, later)  # the new period alone: what a perfect window learns
    windowed = _auc_on(spec, window.frame, later)
    mixed = _auc_on(spec, everything.frame, later)
    gap = oracle - stale
    print(f"seed {seed}: stale {stale:.3f}, oracle {oracle:.3f}, last 35d {windowed:.3f}, all {mixed:.3f}")
    assert gap > 0, "the world's concept change did not hurt the stale model: the test's premise is gone"
    assert windowed - stale >= 0.8 * gap
    assert mixed - stale <= windowed - stale - 0.1 * gap
