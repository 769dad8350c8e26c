"""Faults provoked for real in the database a flow writes to."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError


@contextmanager
def inserts_fail(engine: Engine, table: str) -> Iterator[list[str]]:
    """The database refuses every INSERT into ``table`` (a DBAPI error raised on the
    connection for that statement only, as a database failing at that moment would);
    everything else goes through. Yields the refused statements."""
    refused: list[str] = []
    prefix = f"INSERT INTO {table.upper()}"

    def refuse(conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().upper().startswith(prefix):
            refused.append(statement)
            raise OperationalError(statement, parameters, sqlite3.OperationalError("disk I/O error"))

    event.listen(engine, "before_cursor_execute", refuse)
    try:
        yield refused
    finally:
        event.remove(engine, "before_cursor_execute", refuse)
