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
