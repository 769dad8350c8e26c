"""Partitioned scoring on a real Dask cluster (distributed.LocalCluster, 2 worker
processes) through Prefect's DaskTaskRunner equals single-process scoring row for row:
ids, bitwise-equal probabilities, quarantine (ids repeated across partitions included),
row accounting; and a worker killed mid-run still leaves one complete, correct output."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from driftloop.flows.score import score
from driftloop.registry import open_registry
from driftloop.settings import get_settings
from driftloop.tasks.partitions import plan_partitions
from driftloop.tasks.validate import ROW
from tests.support import tables as memory
from tests.support.data import make_loans
from tests.support.models import loans_champion

pytestmark = [pytest.mark.prefect, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("partitioned")
    with loans_champion(root):
        yield root


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as local, \
            Client(local) as client:
        yield local, client


def _files(directory: Path) -> Path:
    """Three files; the second repeats ids of the first, the third has invalid rows."""
    directory.mkdir()
    first = make_loans(3000, seed=11).drop("repaid")
    second = make_loans(3000, seed=12).drop("repaid").with_columns(pl.col("id") + 2500)  # ids 2500..2999 again
    third = make_loans(3000, seed=13).drop("repaid").with_columns(pl.col("id") + 6000)
    third = third.with_columns(pl.when(pl.col("id") % 97 == 0).then(-1.0).otherwise(pl.col("amount")).alias("amount"))
    for i, frame in enumerate((first, second, third)):
        frame.write_parquet(directory / f"part-{i}.parquet")
    return directory


def _rows(summary) -> pl.DataFrame:
    """A run's rows as it committed them (a later run of the same input replaces them
    in the current snapshot, not in this one)."""
    return memory.rows("loans", summary.snapshot_id, run=summary.run_id).sort("id")


def _quarantine(summary) -> pl.DataFrame:
    return pl.read_parquet(f"{summary.quarantine_uri}/*.parquet") if summary.quarantine_uri else pl.DataFrame()


def _same(single, partitioned) -> None:
    """Equal row for row. Probabilities bitwise: both sides score with one ONNX Runtime
    thread per process (its tree kernel may sum in another order with more threads)."""
    ours, theirs = _rows(single), _rows(partitioned)
    assert ours["id"].to_list() == theirs["id"].to_list()
    assert ours["probability"].to_numpy().tobytes() == theirs["probability"].to_numpy().tobytes()  # bitwise
    q_ours, q_theirs = _quarantine(single), _quarantine(partitioned)
    assert q_ours.height == q_theirs.height
    if q_ours.height:
        columns = [ROW, "id", "_checks"]
        assert q_ours.sort(ROW).select(columns).to_dicts() == q_theirs.sort(ROW).select(columns).to_dicts()
    assert (single.rows_in, single.rows_scored, single.rows_quarantined) == (
        partitioned.rows_in, partitioned.rows_scored, partitioned.rows_quarantined)
    assert partitioned.rows_in == partitioned.rows_scored + partitioned.rows_quarantined
    assert partitioned.input_key == single.input_key


def test_partitioned_scoring_equals_one_process(trained: Path, cluster, tmp_path: Path) -> None:
    local, _ = cluster
    source = _files(tmp_path / "in")
    single = score(input_uri=str(source), model="loans", threads=1)
    parted = score(input_uri=str(source), model="loans", dask_address=local.scheduler_address)
    assert single.rows_in == parted.rows_in == 9000
    assert parted.rows_quarantined == single.rows_quarantined >= 500 + 30  # the repeated ids and the bad amounts
    _same(single, parted)
    # The same input: the partitioned run replaced the single run's rows in the table.
    assert memory.rows("loans", parted.snapshot_id).filter(pl.col("input_key") == parted.input_key).height == 9000 - parted.rows_quarantined
    repeats = _quarantine(parted).filter(pl.col("_checks").list.contains("unique(earlier batch)"))
    assert sorted(repeats["id"].to_list()) == list(range(2500, 3000))  # the later copies, not the first
    # The run is recorded with the form its workers scored with, as its rows and its snapshot say.
    recorded = open_registry(get_settings().registry_database_url()).get_scoring_run(parted.run_id)
    assert recorded is not None and recorded.snapshot_id == parted.snapshot_id
    assert _rows(parted)["scoring_form"].unique().to_list() == [recorded.form] == [parted.form]
    props = memory.predictions("loans").table.snapshot_by_id(parted.snapshot_id).summary.additional_properties
    assert props["driftloop.form"] == recorded.form and int(props["driftloop.rows-in"]) == recorded.rows_in == 9000
    assert props["driftloop.quarantine-uri"] == recorded.quarantine_uri


def test_one_large_parquet_file_is_split_by_row_groups(trained: Path, tmp_path: Path) -> None:
    source = tmp_path / "big.parquet"
    make_loans(20_000, seed=21).drop("repaid").write_parquet(source, row_group_size=2_000)
    plan = plan_partitions(str(source), workers=2)
    assert len(plan) == 8 and plan[0].row_groups == (0, 1) and plan[-1].row_groups[1] == 10
    single = score(input_uri=str(source), model="loans", batch_size=3_000, threads=1)
    parted = score(input_uri=str(source), model="loans", batch_size=3_000, workers=2)
    _same(single, parted)


def test_a_worker_killed_mid_run_still_leaves_one_complete_output(trained: Path, cluster, tmp_path: Path) -> None:
    local, client = cluster
    source = tmp_path / "in"
    source.mkdir()
    for i in range(8):
        make_loans(60_000, seed=30 + i).drop("repaid").with_columns(pl.col("id") + i * 60_000).write_parquet(
            source / f"f{i}.parquet")
    work = Path(get_settings().artifact_root_uri()) / "scoring" / "loans"
    pids = list(client.run(os.getpid).values())
    done: dict[str, object] = {}

    def run() -> None:
        try:
            done["result"] = score(input_uri=str(source), model="loans", batch_size=20_000,
                                   dask_address=local.scheduler_address)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            done["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 300
    while not list(work.glob("*/runs/*/part-*.parquet")):
        assert time.monotonic() < deadline and thread.is_alive(), "no partition started writing"
        time.sleep(0.05)
    os.kill(pids[0], signal.SIGKILL)  # a worker dies mid-partition; its nanny starts another
    thread.join(timeout=600)
    assert "error" not in done, done.get("error")
    result = done["result"]
    assert result.rows_in == result.rows_scored == 480_000
    predictions = _rows(result)
    assert predictions.height == 480_000 and predictions["id"].n_unique() == 480_000
    assert not list(work.glob(f"{result.run_id}/runs/*/part-*.parquet"))  # the table holds the rows now
    single = score(input_uri=str(source), model="loans", batch_size=20_000, threads=1)
    _same(single, result)
