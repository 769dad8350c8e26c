"""A registered champion for flow tests: the real ingest and train flows, in a
DRIFTLOOP_HOME of its own (held for as long as the context is open)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.data import make_loans, write_spec


def train_fast(*, parity_min_rows: int, **params):
    """The ``train`` flow with the parity gate checked on ``parity_min_rows`` rows (the
    worker's DRIFTLOOP_PARITY_MIN_ROWS; the flow takes no such parameter)."""
    from driftloop.flows.train import train

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DRIFTLOOP_PARITY_MIN_ROWS", str(parity_min_rows))
        return train(**params)


@contextmanager
def loans_champion(root: Path, *, algorithm: str = "lightgbm", trials: int = 1, rows: int = 3000, seed: int = 1,
                   parity_min_rows: int = 2000) -> Iterator[Path]:
    """Train and register the ``loans`` model under ``root/home``; yields the spec path."""
    from driftloop.flows.ingest import ingest

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DRIFTLOOP_HOME", str(root / "home"))
        spec = write_spec(root)
        data = root / "train.parquet"
        make_loans(rows, seed=seed).write_parquet(data)
        dataset = ingest(spec_path=str(spec), source=str(data)).dataset_id
        train_fast(spec_path=str(spec), dataset_id=dataset, trials=trials, algorithms=[algorithm],
                   parity_min_rows=parity_min_rows)
        yield spec
