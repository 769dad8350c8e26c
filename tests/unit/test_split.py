from pathlib import Path

import polars as pl

from driftloop.spec import load_spec
from driftloop.tasks.split import split_dataset
from tests.support.data import make_loans, write_spec


def test_time_split_puts_no_future_rows_in_training(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path))
    frame = make_loans(2000).sample(fraction=1.0, shuffle=True, seed=1)  # order must not matter
    # Many rows share timestamps at the boundaries: ties must not straddle parts.
    frame = frame.with_columns(pl.col("ts").dt.truncate("1d"))
    split = split_dataset(frame, spec, seed=0)
    assert split.train["ts"].max() < split.valid["ts"].min()
    assert split.valid["ts"].max() < split.holdout["ts"].min()
    assert split.train.height + split.valid.height + split.holdout.height == frame.height
    assert split.boundaries["method"] == "time"
    assert split.boundaries["train"][1] == str(split.train["ts"].max())
    assert split.boundaries["holdout"][0] == str(split.holdout["ts"].min())


def test_stratified_split_is_seeded_and_keeps_class_balance(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, {"timestamp": None, "columns": {k: v for k, v in load_spec(write_spec(tmp_path)).model_dump()["columns"].items() if k != "ts"}}, name="nots.yaml"))
    frame = make_loans(3000).drop("ts")
    one, two = split_dataset(frame, spec, seed=7), split_dataset(frame, spec, seed=7)
    assert one.holdout["id"].to_list() == two.holdout["id"].to_list()
    assert split_dataset(frame, spec, seed=8).holdout["id"].to_list() != one.holdout["id"].to_list()
    overall = frame["repaid"].mean()
    for part in (one.train, one.valid, one.holdout):
        assert abs(part["repaid"].mean() - overall) < 0.01
    assert set(one.train["id"]).isdisjoint(one.holdout["id"])
    assert one.boundaries["method"] == "stratified"
