"""Reading the loop's memory in tests: the model's tables as the registry in the
environment (DRIFTLOOP_HOME) sees them."""

from __future__ import annotations

import polars as pl

from driftloop.registry import open_registry
from driftloop.settings import get_settings
from driftloop.tables import SCORING_RUN, MemoryTable, Tables, open_tables


def tables() -> Tables:
    settings = get_settings()
    return open_tables(open_registry(settings.registry_database_url()).engine, settings.artifact_root_uri())


def predictions(model: str) -> MemoryTable:
    table = tables().predictions(model)
    assert table is not None, f"no predictions table for {model}"
    return table


def rows(model: str, snapshot: int | None = None, run: str | None = None) -> pl.DataFrame:
    """The predictions table's rows (as of ``snapshot``; one scoring run's if ``run``)."""
    scan = predictions(model).scan(snapshot)
    return (scan.filter(pl.col(SCORING_RUN) == run) if run else scan).collect()
