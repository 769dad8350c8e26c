from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from pydantic import SecretStr, ValidationError

from driftloop.errors import SourceError
from driftloop.spec import load_spec
from driftloop.tasks.ingest import SqlSource, read_sql
from driftloop.tasks.validate import validate_rows
from tests.support.data import write_spec


@pytest.fixture()
def loans_db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'source.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE loans (id INTEGER, ts TEXT, amount REAL, ratio REAL, band TEXT,"
            " prev_ok INTEGER, term INTEGER, repaid INTEGER)"
        )
        conn.exec_driver_sql(
            "INSERT INTO loans VALUES (1,'2024-01-01',10,0.1,'low',1,12,1),"
            "(2,'2024-01-02',20,NULL,'mid',0,24,0),(3,'2024-01-03',-5,0.2,'high',1,36,1)"
        )
    engine.dispose()
    return url


def test_table_is_read_and_validated(tmp_path: Path, loans_db: str) -> None:
    batch = read_sql(SqlSource(url=SecretStr(loans_db), table="loans"))
    assert batch.rows_in == 3 and "(table loans)" in batch.source
    result = validate_rows(batch.frame, load_spec(write_spec(tmp_path)), source=batch.source)
    assert (result.rows_valid, result.rows_quarantined) == (2, 1)  # amount -5 fails min 0


def test_parameterised_query_with_url_from_environment(loans_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOANS_DB_URL", loans_db)
    source = SqlSource(url_env="LOANS_DB_URL", query="SELECT * FROM loans WHERE term >= :t", params={"t": 24})
    assert read_sql(source).frame["id"].to_list() == [2, 3]


def test_same_rows_hash_the_same(loans_db: str) -> None:
    one = read_sql(SqlSource(url=SecretStr(loans_db), table="loans"))
    two = read_sql(SqlSource(url=SecretStr(loans_db), query="SELECT * FROM loans"))
    assert one.content_hash == two.content_hash


def test_missing_table_lists_the_tables(loans_db: str) -> None:
    with pytest.raises(SourceError, match=r"table 'loanz' does not exist; tables found: loans"):
        read_sql(SqlSource(url=SecretStr(loans_db), table="loanz"))


def test_unreachable_database_hides_the_password() -> None:
    url = "postgresql+psycopg://scorer:hunter2@127.0.0.1:1/loans"
    with pytest.raises(SourceError) as err:
        read_sql(SqlSource(url=SecretStr(url), table="loans"))
    message = str(err.value)
    assert "cannot connect" in message and "scorer:***@127.0.0.1:1" in message
    assert "hunter2" not in message


def test_unset_environment_variable() -> None:
    with pytest.raises(SourceError, match="environment variable NOPE_NOT_SET is not set"):
        read_sql(SqlSource(url_env="NOPE_NOT_SET", table="loans"))


def test_source_needs_one_url_and_one_of_table_or_query() -> None:
    with pytest.raises(ValidationError, match="exactly one of url"):
        SqlSource(table="loans")
    with pytest.raises(ValidationError, match="exactly one of table or query"):
        SqlSource(url=SecretStr("sqlite://"), table="a", query="SELECT 1")


def _rows(url: str) -> int:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        count = conn.exec_driver_sql("SELECT count(*) FROM loans").scalar_one()
    engine.dispose()
    return count


def test_a_query_that_writes_fails_and_changes_nothing_sqlite(loans_db: str) -> None:
    with pytest.raises(SourceError, match="the query tries to write .* nothing was changed: give a SELECT"):
        read_sql(SqlSource(url=SecretStr(loans_db), query="DELETE FROM loans RETURNING *"))
    assert _rows(loans_db) == 3


@pytest.mark.postgres
def test_a_query_that_writes_fails_and_changes_nothing_postgres(postgres) -> None:
    url = postgres.create_database("sql_source_read_only")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE loans (id INTEGER, repaid INTEGER)")
        conn.exec_driver_sql("INSERT INTO loans VALUES (1, 1), (2, 0)")
    engine.dispose()
    for query in ("DELETE FROM loans RETURNING *", "UPDATE loans SET repaid = 1 - repaid RETURNING *"):
        with pytest.raises(SourceError, match="read-only transaction"):
            read_sql(SqlSource(url=SecretStr(url), query=query))
    assert _rows(url) == 2
    assert read_sql(SqlSource(url=SecretStr(url), query="SELECT * FROM loans")).rows_in == 2


def _pg_loans(postgres, name: str) -> str:
    url = postgres.create_database(name)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (id INTEGER)")
        conn.exec_driver_sql("INSERT INTO t VALUES (1), (2), (3)")
    engine.dispose()
    return url


def _count(url: str, table: str = "t") -> int:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        count = conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one()
    engine.dispose()
    return count


ESCAPES = ["SELECT 1; COMMIT; DELETE FROM t", "SELECT 1 AS id; COMMIT; DELETE FROM t; SELECT 1 AS id",
           "select 1;commit;delete from t;", "SELECT 1 /* ; */; COMMIT; DELETE FROM t -- ;"]


@pytest.mark.postgres
@pytest.mark.parametrize("query", ESCAPES)
def test_more_than_one_statement_is_refused_and_the_table_keeps_its_rows(postgres, query: str) -> None:
    url = _pg_loans(postgres, f"sql_escape_{ESCAPES.index(query)}")
    with pytest.raises(SourceError, match="holds more than one statement"):
        read_sql(SqlSource(url=SecretStr(url), query=query))
    assert _count(url) == 3


@pytest.mark.postgres
def test_without_the_statement_check_the_extended_protocol_still_runs_one_statement(postgres, monkeypatch) -> None:
    """The second wall on its own: with the statement count check out of the way, psycopg
    is made to use the extended protocol, which runs one statement per query."""
    import driftloop.tasks.ingest

    url = _pg_loans(postgres, "sql_escape_extended")
    monkeypatch.setattr(driftloop.tasks.ingest, "count_statements", lambda query: 1)
    with pytest.raises(SourceError, match="cannot insert multiple commands"):
        read_sql(SqlSource(url=SecretStr(url), query="SELECT 1 AS id; COMMIT; DELETE FROM t"))
    assert _count(url) == 3
    assert read_sql(SqlSource(url=SecretStr(url), query="SELECT id FROM t")).rows_in == 3  # one SELECT still reads


@pytest.mark.parametrize(("query", "count"), [
    ("SELECT 1", 1), ("SELECT 1;", 1), ("  SELECT ';' AS semi ;  ", 1), ('SELECT 1 AS "a;b"', 1),
    ("SELECT $$a$$, $tag$ b $tag$", 1), ("SELECT 1 -- ; trailing comment", 1), ("SELECT /* ; */ 1", 1),
    ("SELECT 'it''s;'", 1), ("SELECT 1; SELECT 2", 2), ("SELECT 1;;", 1), ("SELECT 1; -- only a comment", 1),
    ("SELECT 1; COMMIT; DELETE FROM t", 3), ("SELECT E'\\\\'; DELETE FROM t", 2), ("SELECT E'a\\'; b'", 2),
    ("SELECT $x$; DELETE FROM t; $x$", 3), ("SELECT 1 AS `;`", 1), ("SELECT 1 /* /* */ ; DELETE */", 2),
    # one statement in PostgreSQL, more where '$' does not quote (MySQL): counted as more, refused
    ("SELECT $$;$$, $tag$ ; $tag$", 3),
])
def test_statements_are_counted_outside_strings_identifiers_and_comments(query: str, count: int) -> None:
    from driftloop.tasks.ingest import count_statements

    assert count_statements(query) == count
