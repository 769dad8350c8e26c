"""The data files the tables write: float features (all distinct) are not dictionary-
encoded whole, constant tags are, and a table made by an earlier release takes the
current write properties."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from driftloop.registry.store import open_registry
from driftloop.storage import ArtifactStore
from driftloop.tables import TABLE_PROPERTIES, open_tables


def _rows(n: int) -> pl.DataFrame:
    rng = np.random.default_rng(7)
    return pl.DataFrame({"id": np.arange(n), "x": rng.standard_normal(n), "prediction": np.zeros(n, dtype=np.int64),
                         "model_version": np.ones(n, dtype=np.int64), "input_key": ["night-1"] * n,
                         "role": ["served"] * n, "scoring_run_id": ["run-1"] * n})


def _dictionary_bytes(path: Path) -> dict[str, int]:
    """Per column: bytes of its dictionary pages in the file (0: no dictionary)."""
    meta = pq.ParquetFile(path).metadata
    out: dict[str, int] = {}
    for group in range(meta.num_row_groups):
        for column in range(meta.num_columns):
            chunk = meta.row_group(group).column(column)
            size = chunk.data_page_offset - chunk.dictionary_page_offset if chunk.has_dictionary_page else 0
            out[chunk.path_in_schema] = out.get(chunk.path_in_schema, 0) + size
    return out


def test_unique_floats_fall_back_to_plain_and_constant_tags_keep_their_dictionary(tmp_path: Path) -> None:
    registry = open_registry(f"sqlite:///{tmp_path / 'registry.db'}")
    store = ArtifactStore(str(tmp_path / "artifacts"))
    tables = open_tables(registry.engine, store.uri("").rstrip("/"))
    rows = _rows(50_000)
    table = tables.predictions("loans", sample=rows)
    assert table is not None
    writer = table.writer()
    writer.write(rows)
    writer.commit()
    (data_file,) = (Path(t.file.file_path.removeprefix("file://")) for t in table.table.scan().plan_files())
    dictionaries = _dictionary_bytes(data_file)
    # 50,000 distinct doubles are 400 KB of dictionary: under pyiceberg's 2 MiB default the
    # whole column was dictionary-encoded. Now it stops past 32 KiB (pyarrow looks once per
    # 20,000-row write batch, so at the first look: ~160 KB) and the rest is plain.
    assert 0 < dictionaries["x"] < 200_000 and dictionaries["id"] < 200_000
    assert 0 < dictionaries["input_key"] < 1_000  # one value: a tiny dictionary, kept


def test_a_table_made_before_the_setting_takes_it(tmp_path: Path) -> None:
    registry = open_registry(f"sqlite:///{tmp_path / 'registry.db'}")
    store = ArtifactStore(str(tmp_path / "artifacts"))
    tables = open_tables(registry.engine, store.uri("").rstrip("/"))
    table = tables.predictions("loans", sample=_rows(3))
    assert table is not None
    with table.table.transaction() as tx:  # as an earlier release left it
        tx.remove_properties("write.parquet.dict-size-bytes")
    assert "write.parquet.dict-size-bytes" not in table.table.refresh().properties
    reopened = tables.predictions("loans")
    assert reopened is not None
    assert reopened.table.properties["write.parquet.dict-size-bytes"] == TABLE_PROPERTIES["write.parquet.dict-size-bytes"]
