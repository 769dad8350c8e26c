"""Labels for realized performance go through the spec: a labels file whose ids have
another type than the spec's, with bad rows among them, is parsed, validated and joined;
without a file, the labels registered with `driftloop labels` are used."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from driftloop.flows.labels import ingest_labels
from driftloop.flows.monitor import monitor
from driftloop.flows.score import score
from driftloop.registry import open_registry
from driftloop.settings import get_settings
from tests.support.data import LOAN_SPEC, make_loans, write_spec
from tests.support.models import train_fast

pytestmark = [pytest.mark.prefect, pytest.mark.usefixtures("prefect_server")]


def test_integer_ids_for_a_string_id_spec_and_bad_rows(tmp_path: Path, home: Path) -> None:
    # The spec does not declare its id column: ids are strings.
    columns = {k: v for k, v in LOAN_SPEC["columns"].items() if k != "id"}
    spec = write_spec(tmp_path, {"columns": columns, "gate": {"thresholds": {}}})
    train_fast(spec_path=str(spec), source=str(_parquet(tmp_path / "train.parquet", make_loans(3000, seed=1))),
          trials=1, algorithms=["lightgbm"], parity_min_rows=5_000)
    analysis = make_loans(2400, seed=2)
    scored = score(input_uri=str(_parquet(tmp_path / "analysis.parquet", analysis.drop("repaid"))),
                   model="loans")

    # Integer ids (the scored ids are strings), and three rows no spec accepts.
    labels = analysis.select("id", "repaid").with_columns(pl.col("id").cast(pl.Int64))
    bad = pl.DataFrame({"id": [1, 2, None], "repaid": [7, -1, 1]}, schema={"id": pl.Int64, "repaid": pl.Int64})
    labels_file = _parquet(tmp_path / "labels.parquet", pl.concat([labels.slice(3), bad]))
    result = monitor(scoring_run=scored.run_id, model="loans", labels_uri=str(labels_file))
    assert result.labels is not None
    assert (result.labels.rows_in, result.labels.rows_quarantined) == (2400 - 3 + 3, 3)
    assert result.labels.matched == 2400 - 3
    assert all(c.realized is not None for c in result.chunks)

    # Without a file: the labels registered for the model (here: none yet, then some).
    assert monitor(scoring_run=scored.run_id, model="loans").labels is None
    ingest_labels(spec_path=str(spec), source=str(labels_file))
    registered = monitor(scoring_run=scored.run_id, model="loans")
    assert registered.labels is not None and registered.labels.source.startswith("labels.loans@")
    assert registered.labels.matched == 2400 - 3
    assert [c.realized for c in registered.chunks] == [c.realized for c in result.chunks]


def _parquet(path: Path, frame: pl.DataFrame) -> Path:
    frame.write_parquet(path)
    return path


def test_a_labelled_period_after_training_as_the_reference(tmp_path: Path, home: Path) -> None:
    """The policy names a period the version scored and whose labels arrived: its rows,
    not the holdout, are the reference (and the calibration's)."""
    from driftloop.spec import MonitoringPolicy, ReferencePeriod

    spec = write_spec(tmp_path, {"gate": {"thresholds": {}}})
    train_fast(spec_path=str(spec), source=str(_parquet(tmp_path / "train.parquet", make_loans(3000, seed=1))),
          trials=1, algorithms=["lightgbm"], parity_min_rows=5_000)
    later = make_loans(6000, seed=2, start="2024-06-01")
    scored = score(input_uri=str(_parquet(tmp_path / "later.parquet", later.drop("repaid"))),
                   model="loans")
    period = ReferencePeriod(start=later["ts"].min(), end=later["ts"].sort()[3000])
    policy = MonitoringPolicy(reference_period=period)
    with pytest.raises(Exception, match="holds 0 labelled rows scored by v1"):
        monitor(scoring_run=scored.run_id, model="loans", policy=policy)
    ingest_labels(spec_path=str(spec), source=str(_parquet(tmp_path / "labels.parquet", later.select("id", "repaid"))))
    result = monitor(scoring_run=scored.run_id, model="loans", policy=policy)
    registry = open_registry(get_settings().registry_database_url())
    (run,) = [r for r in registry.list_monitoring_runs("loans") if r["id"] == result.run_id]
    assert run["decision"]["calibration"]["reference_rows"] == 3000  # the period's labelled rows, not the holdout
    assert not result.policy.fired, result.policy.reasons
