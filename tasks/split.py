"""Train / validation / holdout split.

With a timestamp the split is by time: every training row is older than every
validation row, which is older than every holdout row (rows sharing a boundary
timestamp all go to the later part). Without one it is a seeded, stratified shuffle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
from prefect import task
from prefect.cache_policies import NONE

from driftloop.errors import DriftloopError
from driftloop.spec import DatasetSpec


@dataclass
class Split:
    train: pl.DataFrame
    valid: pl.DataFrame
    holdout: pl.DataFrame
    boundaries: dict[str, Any]


def split_dataset(
    frame: pl.DataFrame, spec: DatasetSpec, *, valid_fraction: float = 0.15,
    holdout_fraction: float = 0.15, seed: int = 0,
) -> Split:
    if not 0 < valid_fraction < 1 or not 0 < holdout_fraction < 1 or valid_fraction + holdout_fraction >= 1:
        raise DriftloopError(
            f"split fractions valid={valid_fraction}, holdout={holdout_fraction} must be in (0, 1) "
            "and leave rows for training"
        )
    if frame.height < 30:
        raise DriftloopError(f"dataset '{spec.name}' has {frame.height} valid rows; at least 30 are needed to train")
    if spec.timestamp:
        return _split_by_time(frame, spec.timestamp, valid_fraction, holdout_fraction)
    return _split_stratified(frame, spec, valid_fraction, holdout_fraction, seed)


def _split_by_time(frame: pl.DataFrame, ts: str, valid_fraction: float, holdout_fraction: float) -> Split:
    ordered = frame.sort(ts, maintain_order=True)
    n = ordered.height
    valid_start = ordered[ts][int(n * (1 - valid_fraction - holdout_fraction))]
    holdout_start = ordered[ts][int(n * (1 - holdout_fraction))]
    train = ordered.filter(pl.col(ts) < valid_start)
    valid = ordered.filter((pl.col(ts) >= valid_start) & (pl.col(ts) < holdout_start))
    holdout = ordered.filter(pl.col(ts) >= holdout_start)
    if min(train.height, valid.height, holdout.height) == 0:
        raise DriftloopError(
            f"time split on '{ts}' left an empty part (train {train.height}, valid {valid.height}, "
            f"holdout {holdout.height}): too few distinct timestamps"
        )
    return Split(
        train, valid, holdout,
        {
            "method": "time",
            "column": ts,
            "train": [str(train[ts].min()), str(train[ts].max())],
            "valid": [str(valid[ts].min()), str(valid[ts].max())],
            "holdout": [str(holdout[ts].min()), str(holdout[ts].max())],
            "rows": {"train": train.height, "valid": valid.height, "holdout": holdout.height},
        },
    )


def _split_stratified(frame: pl.DataFrame, spec: DatasetSpec, valid_fraction: float, holdout_fraction: float, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    part = np.empty(frame.height, dtype=np.int8)  # 0 train, 1 valid, 2 holdout
    if spec.task == "regression":
        groups = [np.arange(frame.height)]
    else:
        labels = frame[spec.target].cast(pl.String).to_numpy()
        groups = [np.flatnonzero(labels == value) for value in np.unique(labels)]
    for idx in groups:
        idx = rng.permutation(idx)
        n_hold = round(len(idx) * holdout_fraction)
        n_valid = round(len(idx) * valid_fraction)
        part[idx[:n_hold]] = 2
        part[idx[n_hold : n_hold + n_valid]] = 1
        part[idx[n_hold + n_valid :]] = 0
    parts = pl.Series("_part", part)
    train, valid, holdout = (frame.filter(parts == k) for k in range(3))
    return Split(
        train, valid, holdout,
        {"method": "stratified" if spec.task != "regression" else "random", "seed": seed,
         "rows": {"train": train.height, "valid": valid.height, "holdout": holdout.height}},
    )


@task(name="split", cache_policy=NONE)
def split_task(frame: pl.DataFrame, spec: DatasetSpec, seed: int) -> Split:
    return split_dataset(frame, spec, seed=seed)
