"""The one input reader: format by content then name, compression by name, a directory
or glob of files as one input, and the listing partitioned scoring hands out."""

from __future__ import annotations

import gzip
from pathlib import Path

import polars as pl
import pytest

from driftloop.errors import SourceError
from driftloop.inputs import (
    input_format,
    iter_input,
    list_input_files,
    parquet_row_groups,
    read_input,
)
from tests.support.data import make_loans


def test_format_is_decided_by_content_before_name(tmp_path: Path) -> None:
    assert input_format("x.csv", b"PAR1") == "parquet"  # the bytes win over a wrong name
    assert input_format("x.parquet.gz") == input_format("x.PQ") == "parquet"
    assert input_format("x.csv.gz", b"id,a") == input_format("x") == "csv"
    frame = make_loans(50, seed=1)
    unnamed = tmp_path / "export"  # Parquet without an extension
    frame.write_parquet(unnamed)
    assert read_input(str(unnamed)).frame.equals(frame)
    batches, total = iter_input(str(unnamed), 20)
    assert total == 50 and [b.frame.height for b in batches] == [20, 20, 10]


def test_compressed_csv_is_read_whole_and_streamed(tmp_path: Path) -> None:
    frame = make_loans(30, seed=2).drop("ts")
    path = tmp_path / "rows.csv.gz"
    path.write_bytes(gzip.compress(frame.write_csv().encode()))
    assert read_input(str(path)).frame.height == 30
    batches, total = iter_input(str(path), 25)
    assert total is None and sum(b.frame.height for b in batches) == 30


def test_a_directory_or_glob_is_one_input_in_name_order(tmp_path: Path) -> None:
    data = tmp_path / "day"
    (data / "part=1").mkdir(parents=True)
    first, second = make_loans(40, seed=3), make_loans(25, seed=4).with_columns(pl.col("id") + 1000)
    first.write_parquet(data / "a.parquet")
    second.write_parquet(data / "part=1" / "b.parquet")
    (data / "_SUCCESS").write_text("")  # bookkeeping beside data is not data
    (data / "_manifests").mkdir()
    (data / "_manifests" / "x.parquet").write_bytes(b"not data")
    (data / "notes.md").write_text("not data either")
    files = list_input_files(str(data))
    assert [Path(f.uri).name for f in files] == ["a.parquet", "b.parquet"]
    assert all(f.format == "parquet" and f.size for f in files)
    raw = read_input(str(data))
    assert raw.frame["id"].to_list() == first["id"].to_list() + second["id"].to_list()
    batches, total = iter_input(str(data), 30)
    assert total == 65 and [b.frame.height for b in batches] == [30, 10, 25]
    assert [Path(f.uri).name for f in list_input_files(str(data / "*.parquet"))] == ["a.parquet"]
    assert read_input(str(data)).content_hash == read_input(str(data)).content_hash != read_input(str(data / "a.parquet")).content_hash


def test_row_groups_are_listed_from_the_footer(tmp_path: Path) -> None:
    path = tmp_path / "big.parquet"
    make_loans(1000, seed=5).write_parquet(path, row_group_size=300)
    assert parquet_row_groups(str(path)) == [300, 300, 300, 100]


def test_inputs_that_cannot_be_read_say_so(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no .parquet or .csv files"):
        list_input_files(str(tmp_path))
    with pytest.raises(SourceError, match="matches no files"):
        list_input_files(str(tmp_path / "*.csv"))
    with pytest.raises(SourceError, match="absent does not exist"):
        iter_input(str(tmp_path / "absent"), 10)
    make_loans(5).write_parquet(tmp_path / "a.parquet")
    make_loans(5).write_csv(tmp_path / "b.csv")
    with pytest.raises(SourceError, match="mixes CSV and Parquet"):
        read_input(str(tmp_path))


@pytest.mark.parametrize("read", [read_input, list_input_files, parquet_row_groups, lambda uri: iter_input(uri, 10)])
def test_a_uri_with_credentials_is_refused_before_anything_is_opened(read, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader is the choke point every stage reads through: nothing is opened."""
    import fsspec

    opened: list[str] = []
    monkeypatch.setattr(fsspec, "open", lambda uri, *a, **k: opened.append(uri))
    monkeypatch.setattr(fsspec.core, "url_to_fs", lambda uri, *a, **k: opened.append(uri))
    with pytest.raises(SourceError, match=r"s3://AKIAKEY:\*\*\*@bucket/x.parquet holds credentials") as err:
        read("s3://AKIAKEY:wJalr/K7MDENG#x@bucket/x.parquet")
    assert "K7MDENG" not in str(err.value) and opened == []
