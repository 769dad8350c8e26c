"""Small specs and files for tests."""

from __future__ import annotations

from pathlib import Path

import yaml

LOAN_SPEC = {
    "name": "loans",
    "task": "binary_classification",
    "target": "repaid",
    "id": "id",
    "timestamp": "ts",
    "segment": "band",
    "max_reject_fraction": 0.5,
    "columns": {
        "id": {"dtype": "int"},
        "amount": {"dtype": "float", "min": 0},
        "ratio": {"dtype": "float", "min": 0, "max": 1, "nullable": True},
        "band": {"dtype": "category", "allowed": ["low", "mid", "high"]},
        "prev_ok": {"dtype": "bool"},
        "term": {"dtype": "int", "min": 1},
        "ts": {"dtype": "datetime"},
    },
    "features": ["amount", "ratio", "band", "prev_ok", "term"],
}

HEADER = "id,ts,amount,ratio,band,prev_ok,term,repaid"
GOOD_ROWS = [
    "1,2024-01-01 00:00:00,100.5,0.1,low,true,12,1",
    "2,2024-01-02 00:00:00,200,,mid,False,24,0",
    "3,2024-01-03 00:00:00,300,0.3,high,1,36,1",
    "4,2024-01-04 00:00:00,400,0.4,low,no,48,0",
]


def write_spec(directory: Path, overrides: dict | None = None, name: str = "spec.yaml") -> Path:
    spec = {**LOAN_SPEC, **(overrides or {})}
    path = directory / name
    path.write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def write_csv(directory: Path, rows: list[str], header: str = HEADER, name: str = "data.csv") -> Path:
    path = directory / name
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def make_loans(n: int, seed: int = 0, start: str = "2024-01-01"):
    """A learnable loans frame matching LOAN_SPEC (validated types)."""
    from datetime import datetime, timedelta

    import numpy as np
    import polars as pl

    rng = np.random.default_rng(seed)
    bands = np.array(["low", "mid", "high"])
    amount = rng.gamma(2.0, 500.0, n)
    ratio = rng.uniform(0, 1, n)
    band = bands[rng.integers(0, 3, n)]
    prev_ok = rng.random(n) < 0.6
    term = rng.integers(1, 60, n)
    logit = -amount / 800 + 2.5 * (1 - ratio) + (band == "high") * 1.0 + prev_ok * 0.8 - term / 40
    repaid = (logit + rng.logistic(size=n) > 0.5).astype(np.int64)
    ratio_with_nulls = np.where(rng.random(n) < 0.05, np.nan, ratio)
    t0 = datetime.fromisoformat(start)
    return pl.DataFrame(
        {
            "id": np.arange(n, dtype=np.int64),
            "ts": [t0 + timedelta(minutes=int(m)) for m in np.sort(rng.integers(0, n * 10, n))],
            "amount": amount,
            "ratio": ratio_with_nulls,
            "band": band,
            "prev_ok": prev_ok,
            "term": term,
            "repaid": repaid,
        }
    ).with_columns(pl.col("ratio").fill_nan(None), pl.col("ts").cast(pl.Datetime("us")))


def make_period(n: int, *, start: str, days: int, seed: int, first_id: int, concept: str = "old"):
    """Loans over ``days`` days from ``start`` under a concept: ``old`` (as make_loans)
    or ``new``, where the relation of ``ratio`` and ``prev_ok`` to the target is reversed
    (the features' distribution is unchanged: only labels reveal the change)."""
    from datetime import datetime, timedelta

    import numpy as np
    import polars as pl

    rng = np.random.default_rng(seed)
    bands = np.array(["low", "mid", "high"])
    amount = rng.gamma(2.0, 500.0, n)
    ratio = rng.uniform(0, 1, n)
    band = bands[rng.integers(0, 3, n)]
    prev_ok = rng.random(n) < 0.6
    term = rng.integers(1, 60, n)
    if concept == "old":
        logit = -amount / 800 + 3.0 * (1 - ratio) + (band == "high") * 1.0 + prev_ok * 1.2 - term / 40
    else:
        logit = -amount / 800 + 3.0 * ratio + (band == "high") * 1.0 - prev_ok * 1.2 - term / 40 + 0.6
    repaid = (logit + rng.logistic(size=n) > 0.5).astype(np.int64)
    t0 = datetime.fromisoformat(start)
    seconds = np.sort(rng.integers(0, days * 86_400, n))
    return pl.DataFrame(
        {
            "id": np.arange(first_id, first_id + n, dtype=np.int64),
            "ts": [t0 + timedelta(seconds=int(s)) for s in seconds],
            "amount": amount,
            "ratio": ratio,
            "band": band,
            "prev_ok": prev_ok,
            "term": term,
            "repaid": repaid,
        }
    ).with_columns(pl.col("ts").cast(pl.Datetime("us")))
