"""The worlds the loop is measured on: each a generator of monthly periods whose changes
are known (written in each generator's docstring). Period 0 trains the first model;
labels arrive one period late (at the start of period m, period m-1's labels arrive).

Synthetic worlds (``today``, ``gradual``, ``recurring``, ``stationary``): ``rows`` loans-
like rows a month with an id, a timestamp, features x1, x2, x3 (numbers), seg (north,
south, east) and flag (bool); the target y is a logistic function of them. A seed draws
a new sample of the same world.

``census``: real data no one here generated, NannyML's US Census (ACS) employment data
for Massachusetts, shipped inside the installed ``nannyml`` package (no download):
2015 is period 0, 2016, 2017 and 2018 are four periods each (a year's rows drawn at
random into its four periods: the survey has no date within a year, so changes happen
between years, at periods 1, 5 and 9). A seed draws another sample of ``rows`` a period.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

START = datetime(2025, 1, 1)
CONCEPT_MONTH = 9  # today's world: x1's effect reverses
RECURRING_SPAN = 3  # recurring world: months per regime


def month_start(m: int) -> datetime:
    return datetime(START.year + (START.month - 1 + m) // 12, (START.month - 1 + m) % 12 + 1, 1)


def _timestamps(rng: np.random.Generator, m: int, rows: int) -> list[datetime]:
    span = (month_start(m + 1) - month_start(m)).total_seconds()
    return [month_start(m) + timedelta(seconds=float(s)) for s in np.sort(rng.uniform(0, span, rows))]


def _synthetic(m: int, rows: int, seed: int, logit_of: Callable[..., np.ndarray], *, x2_mean: float = 0.0,
               season: float = 0.0) -> pl.DataFrame:
    rng = np.random.default_rng(seed * 1000 + m)
    x1 = rng.normal(0, 1, rows)
    x2 = rng.normal(x2_mean, 1, rows)
    x3 = rng.normal(0.3 * season, 1, rows)
    seg = np.array(["north", "south", "east"])[rng.integers(0, 3, rows)]
    flag = rng.random(rows) < 0.4
    logit = logit_of(x1=x1, x2=x2, x3=x3, seg=seg, flag=flag)
    y = (logit + rng.logistic(size=rows) > 0).astype(np.int64)
    return pl.DataFrame({
        "id": np.arange(m * 1_000_000, m * 1_000_000 + rows, dtype=np.int64), "ts": _timestamps(rng, m, rows),
        "x1": x1, "x2": x2, "x3": x3, "seg": seg, "flag": flag, "y": y,
    }).with_columns(pl.col("ts").cast(pl.Datetime("us")))


def today(m: int, rows: int, seed: int = 0) -> pl.DataFrame:
    """bench/loop.py's world: months 0-4 stationary; months 5-7 a covariate shift (x2's
    mean moves up 0.6 sd a month and stays; it does not hurt: x2 enters through tanh);
    from month 9 an abrupt concept drift (the sign of x1's effect reverses, and stays);
    all year a seasonal pattern (the base rate and x3's mean follow the calendar)."""
    season = math.sin(2 * math.pi * m / 12)
    sign = -1.0 if m >= CONCEPT_MONTH else 1.0

    def logit(x1, x2, x3, seg, flag):
        return sign * 1.6 * x1 + 1.2 * np.tanh(x2) + 0.8 * x3 * (seg == "north") + 0.7 * flag + 0.5 * season - 0.3

    return _synthetic(m, rows, seed, logit, x2_mean=0.6 * min(max(m - 4, 0), 3), season=season)


def gradual(m: int, rows: int, seed: int = 0) -> pl.DataFrame:
    """A gradual concept drift: the weight on (x1, x2) rotates by 7.5 degrees a month
    (90 degrees over the year), so the model of any month is a little worse every month
    after; the features' distribution never changes."""
    angle = math.radians(7.5 * m)

    def logit(x1, x2, x3, seg, flag):
        return 1.8 * (math.cos(angle) * x1 + math.sin(angle) * x2) + 0.8 * x3 * (seg == "north") + 0.7 * flag - 0.3

    return _synthetic(m, rows, seed, logit)


def recurring(m: int, rows: int, seed: int = 0) -> pl.DataFrame:
    """A recurring concept: two regimes alternating every three months (A: months 0-2,
    6-8, 12-13; B: months 3-5, 9-11). In A, y follows x1 and flag; in B, y follows -x1
    and x2. A window too short forgets the other regime; too long mixes them."""
    regime_b = (m // RECURRING_SPAN) % 2 == 1

    def logit(x1, x2, x3, seg, flag):
        if regime_b:
            return -1.4 * x1 + 1.4 * x2 + 0.8 * x3 * (seg == "north") - 0.3
        return 1.6 * x1 + 0.9 * flag + 0.8 * x3 * (seg == "north") - 0.3

    return _synthetic(m, rows, seed, logit)


def stationary(m: int, rows: int, seed: int = 0) -> pl.DataFrame:
    """The control: nothing changes (no shift, no season, no concept drift). Any retrain
    is waste."""

    def logit(x1, x2, x3, seg, flag):
        return 1.6 * x1 + 1.2 * np.tanh(x2) + 0.8 * x3 * (seg == "north") + 0.7 * flag - 0.3

    return _synthetic(m, rows, seed, logit)


CENSUS_CATEGORIES = ("SCHL", "MAR", "RELP", "DIS", "ESP", "CIT", "MIG", "MIL", "ANC", "NATIVITY", "DEAR", "DEYE",
                     "DREM", "SEX", "RAC1P")
CENSUS_YEARS = {0: 2015, **{m: 2016 + (m - 1) // 4 for m in range(1, 13)}}


@cache
def census_rows() -> pl.DataFrame:
    """Every row of NannyML's Massachusetts employment data (2015-2018) with its target,
    read from the files inside the installed package (nannyml.datasets)."""
    import os

    os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
    import nannyml.datasets

    folder = Path(nannyml.datasets.__file__).parent / "data"
    reference = pl.read_parquet(folder / "employment_MA_reference.pq")
    analysis = pl.read_parquet(folder / "employment_MA_analysis.pq").join(
        pl.read_parquet(folder / "employment_MA_analysis_target.pq"), on="id")
    keep = ["id", "year", "AGEP", *CENSUS_CATEGORIES, "employed"]
    frames = [f.select(keep).with_columns(pl.col(c).cast(pl.String) for c in CENSUS_CATEGORIES)
              for f in (reference, analysis)]
    return pl.concat(frames).with_columns(pl.col("id").cast(pl.Int64), pl.col("AGEP").cast(pl.Float64),
                                          pl.col("employed").cast(pl.Int64))


def census(m: int, rows: int, seed: int = 0) -> pl.DataFrame:
    """Period 0: 2015; periods 1-4: 2016; 5-8: 2017; 9-12: 2018 (see the module docstring)."""
    year = CENSUS_YEARS[m]
    pool = census_rows().filter(pl.col("year") == year)
    # The year's rows in a seeded order, cut into its periods: no row is used twice.
    order = np.random.default_rng(seed * 7919 + year).permutation(pool.height)
    part = 0 if m == 0 else (m - 1) % 4
    chosen = pool[order[part * rows:(part + 1) * rows]]
    rng = np.random.default_rng(seed * 1000 + m)
    return chosen.drop("year").with_columns(
        pl.Series("ts", _timestamps(rng, m, chosen.height)).cast(pl.Datetime("us")))


@dataclass(frozen=True)
class World:
    name: str
    make: Callable[[int, int, int], pl.DataFrame]
    periods: int
    changes: dict[int, str]  # period -> what changes there (for tables and charts)

    def spec(self, window: str) -> dict[str, Any]:
        return census_spec(window) if self.name == "census" else synthetic_spec(self.name, window)

    def data(self, rows: int, seed: int, periods: int | None = None) -> list[pl.DataFrame]:
        return [self.make(m, rows, seed) for m in range(periods or self.periods)]


WORLDS = {
    "today": World("today", today, 14, {5: "covariate shift", 6: "covariate shift", 7: "covariate shift",
                                        CONCEPT_MONTH: "concept flip"}),
    "gradual": World("gradual", gradual, 14, {m: "rotation" for m in range(1, 14)}),
    "recurring": World("recurring", recurring, 14, {m: "regime switch" for m in range(RECURRING_SPAN, 14, RECURRING_SPAN)}),
    "stationary": World("stationary", stationary, 14, {}),
    "census": World("census", census, 13, {1: "2016", 5: "2017", 9: "2018"}),
}


def policy_sections(window: str) -> dict[str, Any]:
    """The gate, monitoring and retrain sections every world's spec shares (the loop's
    policy as bench/loop.py has always run it)."""
    return {
        "gate": {"metric": "roc_auc", "thresholds": {"roc_auc": {"min": 0.65}}, "max_regression": 0.01},
        "monitoring": {"multivariate_drift": False, "performance": {"alerts": 2, "of_last": 3}},
        "retrain": {"window": {"last": window} if window != "all" else {"all": True}, "skip_recent": "0d",
                    "min_new_labels": 1000, "min_improvement": 0.0},
    }


def synthetic_spec(name: str, window: str) -> dict[str, Any]:
    return {
        "name": name, "task": "binary_classification", "target": "y", "id": "id", "timestamp": "ts", "segment": "seg",
        "columns": {
            "id": {"dtype": "int"}, "ts": {"dtype": "datetime"}, "x1": {"dtype": "float"}, "x2": {"dtype": "float"},
            "x3": {"dtype": "float"}, "seg": {"dtype": "category", "allowed": ["north", "south", "east"]},
            "flag": {"dtype": "bool"}, "y": {"dtype": "int", "allowed": [0, 1]},
        },
        **policy_sections(window),
    }


def census_spec(window: str) -> dict[str, Any]:
    columns: dict[str, Any] = {"id": {"dtype": "int"}, "ts": {"dtype": "datetime"}, "AGEP": {"dtype": "float"}}
    columns |= {c: {"dtype": "category"} for c in CENSUS_CATEGORIES}
    columns["employed"] = {"dtype": "int", "allowed": [0, 1]}
    return {"name": "census", "task": "binary_classification", "target": "employed", "id": "id", "timestamp": "ts",
            "columns": columns, **policy_sections(window)}
