"""The data files the tables and the scoring outputs write: float features (all
distinct) are not dictionary-encoded whole, repeating values and constant tags are, and a
table made by an earlier release takes the current write properties."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from driftloop import tables as tables_module
from driftloop.outputs import encode_part
from driftloop.registry.store import open_registry
from driftloop.storage import ArtifactStore
from driftloop.tables import TABLE_PROPERTIES, open_tables, to_arrow


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


def test_a_part_dictionary_encodes_repeating_features_and_gives_up_on_distinct_ones(tmp_path: Path) -> None:
    rows = _rows(50_000).with_columns(amount=(pl.col("x") * 100).round().cast(pl.Int64) / 100)  # cents: repeats
    path = tmp_path / "part.parquet"
    path.write_bytes(encode_part(rows))
    assert pl.read_parquet(path).equals(rows)
    dictionaries = _dictionary_bytes(path)
    assert 0 < dictionaries["amount"] < 10_000  # ~600 distinct values: all of them in the dictionary
    assert 0 < dictionaries["x"] < 200_000  # distinct doubles: stops after the first look, the rest plain
    plain = pq.ParquetFile(path).metadata.row_group(0)
    amount = next(plain.column(i) for i in range(plain.num_columns) if plain.column(i).path_in_schema == "amount")
    x = next(plain.column(i) for i in range(plain.num_columns) if plain.column(i).path_in_schema == "x")
    assert amount.total_compressed_size < x.total_compressed_size / 3


def _dated(n: int, *, months: int) -> pl.DataFrame:
    start = datetime(2026, 1, 20, tzinfo=UTC)
    step = timedelta(days=30 * months) / n if months > 1 else timedelta(seconds=1)
    return _rows(n).with_columns(ts=pl.Series([start + i * step for i in range(n)]).dt.cast_time_unit("us"))


def test_a_batch_in_one_partition_skips_the_split_and_writes_what_pyiceberg_would(tmp_path: Path) -> None:
    from pyiceberg.io.pyarrow import _dataframe_to_data_files

    registry = open_registry(f"sqlite:///{tmp_path / 'registry.db'}")
    tables = open_tables(registry.engine, ArtifactStore(str(tmp_path / "artifacts")).uri("").rstrip("/"))
    rows = _dated(5_000, months=1)
    table = tables.predictions("loans", sample=rows, timestamp="ts")
    assert table is not None
    data = tables_module._conformed(table.table, to_arrow(rows), "test")
    assert tables_module._single_partition(table.table.metadata, data) is not None
    ours = tables_module._data_files(table.table, data, write_uuid=uuid.uuid4(), counter=itertools.count())
    theirs = list(_dataframe_to_data_files(table.table.metadata, data, table.table.io))
    assert len(ours) == len(theirs) == 1

    def described(f: object) -> dict[str, object]:
        fields = ("partition", "record_count", "value_counts", "null_value_counts", "lower_bounds", "upper_bounds",
                  "file_size_in_bytes")
        return {name: getattr(f, name) for name in fields}

    assert described(ours[0]) == described(theirs[0])
    assert ours[0].partition[0] == 1 and ours[0].partition[1] == 672  # version 1, 2026-01 (months since 1970)
    assert pq.read_table(ours[0].file_path.removeprefix("file://")).equals(pq.read_table(theirs[0].file_path.removeprefix("file://")))


def test_a_batch_across_partitions_is_split_by_pyiceberg(tmp_path: Path) -> None:
    registry = open_registry(f"sqlite:///{tmp_path / 'registry.db'}")
    tables = open_tables(registry.engine, ArtifactStore(str(tmp_path / "artifacts")).uri("").rstrip("/"))
    rows = pl.concat([_dated(3_000, months=3), _dated(10, months=1).with_columns(model_version=pl.lit(2, pl.Int64))])
    table = tables.predictions("loans", sample=rows, timestamp="ts")
    assert table is not None
    data = tables_module._conformed(table.table, to_arrow(rows), "test")
    assert tables_module._single_partition(table.table.metadata, data) is None
    written = tables_module._data_files(table.table, data, write_uuid=uuid.uuid4(), counter=itertools.count())
    assert sorted((f.partition[0], f.partition[1]) for f in written) == [(1, 672), (1, 673), (1, 674), (1, 675), (2, 672)]
    assert sum(f.record_count for f in written) == rows.height
    nulls = rows.with_columns(model_version=pl.when(pl.col("id") == 7).then(None).otherwise(pl.col("model_version")))
    assert tables_module._single_partition(table.table.metadata, tables_module._conformed(
        table.table, to_arrow(nulls), "test")) is None  # a null key: pyiceberg's split decides
