"""The ingest flow and the CLI, run against a real Prefect server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from driftloop.errors import RejectLimitExceeded
from driftloop.flows.ingest import ingest
from driftloop.registry import open_registry
from driftloop.settings import get_settings
from tests.support.data import GOOD_ROWS, write_csv, write_spec

pytestmark = [pytest.mark.prefect, pytest.mark.usefixtures("prefect_server")]

BAD_ROWS = ["5,2024-01-05,forty,0.5,low,true,12,1", "6,2024-01-06,10,0.5,gold,true,12,1"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    driftloop = Path(sys.executable).with_name("driftloop")
    return subprocess.run([str(driftloop), *args], check=False, capture_output=True, text=True, timeout=300)


def loans_table(path: Path, values: str) -> str:
    """A SQLite database at ``path`` with a ``loans`` table holding ``values``; its URL."""
    import sqlalchemy as sa

    url = f"sqlite:///{path}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE loans (id INT, ts TEXT, amount REAL, ratio REAL, band TEXT, prev_ok INT, term INT, repaid INT)")
        conn.exec_driver_sql(f"INSERT INTO loans VALUES {values}")
    engine.dispose()
    return url


def test_ingest_snapshots_valid_rows_and_quarantines_the_rest(tmp_path: Path, home: Path) -> None:
    spec = write_spec(tmp_path)
    result = ingest(spec_path=str(spec), source=str(write_csv(tmp_path, GOOD_ROWS + BAD_ROWS)))
    assert (result.rows_in, result.rows_valid, result.rows_quarantined) == (6, 4, 2)
    snapshot = pl.read_parquet(result.snapshot_uri)
    assert snapshot["id"].to_list() == [1, 2, 3, 4]
    quarantine = pl.read_parquet(result.quarantine_uri)
    assert quarantine["id"].to_list() == ["5", "6"]
    assert quarantine["_checks"].to_list() == [["dtype(float)"], ["isin(['low', 'mid', 'high'])"]]
    assert result.snapshot_uri.startswith(str(home / "artifacts" / "datasets" / "loans"))

    # Same content again: the same dataset, not a duplicate.
    again = ingest(spec_path=str(spec), source=str(write_csv(tmp_path, GOOD_ROWS + BAD_ROWS, name="copy.csv")))
    assert again.dataset_id == result.dataset_id and not again.created
    registry = open_registry(get_settings().registry_database_url())
    assert [d.id for d in registry.list_datasets()] == [result.dataset_id]


def test_reject_fraction_above_limit_fails_the_run_and_keeps_the_quarantine(tmp_path: Path, home: Path) -> None:
    spec = write_spec(tmp_path, {"max_reject_fraction": 0.2})
    state = ingest(spec_path=str(spec), source=str(write_csv(tmp_path, GOOD_ROWS + BAD_ROWS)), return_state=True)
    assert state.is_failed()
    with pytest.raises(RejectLimitExceeded) as err:
        state.result()
    assert "2 of 6 rows (33.3%) failed validation" in str(err.value)
    assert "max_reject_fraction of 20.0%" in str(err.value)
    assert pl.read_parquet(err.value.quarantine_uri).height == 2
    assert open_registry(get_settings().registry_database_url()).list_datasets() == []


def test_cli_ingest_and_list_print_one_json_object(tmp_path: Path, home: Path) -> None:
    spec = write_spec(tmp_path)
    data = write_csv(tmp_path, GOOD_ROWS + BAD_ROWS)
    run = cli("ingest", "--spec", str(spec), str(data), "--json")
    assert run.returncode == 0, run.stderr
    payload = json.loads(run.stdout)
    assert {"dataset_id", "rows_in", "rows_valid", "rows_quarantined", "quarantine_uri", "snapshot_uri"} <= payload.keys()
    assert (payload["rows_in"], payload["rows_valid"], payload["rows_quarantined"]) == (6, 4, 2)

    listing = cli("datasets", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    datasets = json.loads(listing.stdout)["datasets"]
    assert [d["id"] for d in datasets] == [payload["dataset_id"]]


def test_cli_ingest_from_sql_table(tmp_path: Path, home: Path) -> None:
    url = loans_table(tmp_path / "src.db", "(1,'2024-01-01',1,0.1,'low',1,12,1),(2,'2024-01-02',2,0.2,'mid',0,12,0)")
    run = cli("ingest", "--spec", str(write_spec(tmp_path)), "--sql-url", url, "--table", "loans", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["rows_valid"] == 2


@pytest.mark.parametrize(
    ("make_args", "expected", "code", "kind"),
    [
        # found by the CLI's checks before anything ran: usage errors (exit 2)
        (lambda d: ["--spec", str(write_spec(d, {"colour": 1})), str(write_csv(d, GOOD_ROWS))], "key 'colour': unknown key",
         2, "spec"),
        (lambda d: ["--spec", str(write_spec(d)), str(d / "absent.csv")], "absent.csv does not exist", 2, "source"),
        # found by the flow (exit 1)
        (lambda d: ["--spec", str(write_spec(d)), str(write_csv(d, GOOD_ROWS, header="id,ts"))], "missing columns",
         1, "schema"),
        (lambda d: ["--spec", str(write_spec(d)), "--sql-url", f"sqlite:///{d}/src.db", "--table", "nope"],
         "table 'nope' does not exist", 1, "source"),
    ],
)
def test_cli_failure_is_one_clear_line(tmp_path: Path, home: Path, make_args, expected: str, code: int,
                                       kind: str) -> None:
    run = cli("ingest", *make_args(tmp_path), "--json")
    assert run.returncode == code
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("driftloop: error: ") and expected in lines[0]
    error = json.loads(run.stdout)  # --json: the error as one object on stdout, the same words
    assert error == {"error": lines[0].removeprefix("driftloop: error: "), "kind": kind}


def test_sql_credentials_from_a_prefect_secret_block(tmp_path: Path, home: Path) -> None:
    from prefect.blocks.system import Secret

    from driftloop.tasks.ingest import SqlSource

    url = loans_table(tmp_path / "secret-src.db", "(7,'2024-01-01',1,0.1,'low',1,12,1)")
    Secret(value=url).save("loans-source-url", overwrite=True)
    result = ingest(spec_path=str(write_spec(tmp_path)), sql=SqlSource(secret_block="loans-source-url", table="loans"))
    assert result.rows_valid == 1


def test_registry_and_sql_source_named_by_blocks(tmp_path: Path, home: Path) -> None:
    """What a user configures in the UI: the flow reads the table a SqlDataSource block
    names and writes to the registry a RegistryConnection block names, not the
    environment's; the dataset records the block reference so a retrain can read it again."""
    from pydantic import SecretStr

    from driftloop.blocks.driftloop_blocks import RegistryConnection, SqlDataSource

    source_url = loans_table(tmp_path / "warehouse.db", "(1,'2024-01-01',1,0.1,'low',1,12,1),(2,'2024-01-02',2,0.2,'mid',0,12,0),(3,'2024-01-03',3,0.3,'high',1,24,1)")
    SqlDataSource(url=SecretStr(source_url), query="SELECT * FROM loans WHERE term = :term", params={"term": 12}).save("loans-warehouse", overwrite=True)
    team_registry = f"sqlite:///{tmp_path / 'team-registry.db'}"
    RegistryConnection(url=SecretStr(team_registry), artifact_root=str(tmp_path / "team-artifacts")).save("team", overwrite=True)

    result = ingest(spec_path=str(write_spec(tmp_path)), source="sql-block:loans-warehouse", registry_block="team")

    assert (result.rows_in, result.rows_valid) == (2, 2)
    assert result.snapshot_uri.startswith(str(tmp_path / "team-artifacts"))
    (dataset,) = open_registry(team_registry).list_datasets()
    assert dataset.id == result.dataset_id and dataset.source == "sql-block:loans-warehouse"
    assert open_registry(get_settings().registry_database_url()).list_datasets() == []


def test_unknown_block_names_the_block_and_what_to_do(tmp_path: Path, home: Path) -> None:
    from driftloop.errors import DriftloopError

    with pytest.raises(DriftloopError, match=r"driftloop-registry block 'nowhere'.*create it in the UI"):
        ingest(spec_path=str(write_spec(tmp_path)), source=str(write_csv(tmp_path, GOOD_ROWS)), registry_block="nowhere")
    with pytest.raises(DriftloopError, match=r"driftloop-sql-source block 'absent'"):
        ingest(spec_path=str(write_spec(tmp_path)), source="sql-block:absent")


@pytest.mark.postgres
def test_labels_from_a_sql_block_on_postgres(postgres, tmp_path: Path, home: Path) -> None:
    """`driftloop labels --spec ... sql-block:<name>` reads the labels a SqlDataSource
    block names (here a query on PostgreSQL), as the README promises, and appends them to
    the model's labels table with the block reference as their source."""
    import sqlalchemy as sa
    from pydantic import SecretStr

    from driftloop.blocks.driftloop_blocks import SqlDataSource
    from tests.support import tables as memory

    url = postgres.create_database("labels_block_source")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE outcomes (loan_id INT, repaid INT, closed_on DATE)")
        conn.exec_driver_sql("INSERT INTO outcomes VALUES (11, 1, '2024-03-01'), (12, 0, '2024-03-02'), "
                             "(13, 1, '2024-03-03'), (14, 7, '2024-03-04')")  # 7: not a valid target
    engine.dispose()
    SqlDataSource(url=SecretStr(url), query="SELECT loan_id AS id, repaid FROM outcomes WHERE closed_on >= CAST(:since AS DATE)",
                  params={"since": "2024-03-02"}).save("loans-labels", overwrite=True)

    run = cli("labels", "--spec", str(write_spec(tmp_path)), "sql-block:loans-labels", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert (result["rows_in"], result["rows_valid"], result["rows_quarantined"]) == (3, 2, 1)
    assert result["table"] == "labels.loans"
    labels = memory.tables().labels("loans")
    assert labels is not None
    rows = labels.scan(result["table_snapshot"]).collect().sort("id")
    assert rows.select("id", "repaid").rows() == [(12, 0), (13, 1)]
    assert rows["source"].unique().to_list() == ["sql-block:loans-labels"]
    (dataset,) = [d for d in open_registry(get_settings().registry_database_url()).list_datasets() if d.id == result["dataset_id"]]
    assert dataset.source == "sql-block:loans-labels" and dataset.name == "loans.labels"
