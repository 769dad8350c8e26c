"""`make server` on PostgreSQL: the Prefect server runs on a real PostgreSQL database and
records a flow run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.services import PrefectServer, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

_FLOW = """
from prefect import flow

@flow(name="hello-postgres")
def hello() -> int:
    return 42

assert hello() == 42
"""


def test_prefect_server_on_postgres(postgres, tmp_path: Path) -> None:
    url = postgres.create_database("prefect_server")
    os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = url.replace("postgresql+psycopg://", "postgresql+asyncpg://")
    server = PrefectServer(port=free_port(), home=tmp_path / "prefect")
    try:
        server.start()
    finally:
        del os.environ["PREFECT_API_DATABASE_CONNECTION_URL"]
    try:
        env = {**os.environ, "PREFECT_API_URL": server.api_url}
        done = subprocess.run([sys.executable, "-c", _FLOW], env=env, check=False, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        runs = httpx.post(f"{server.api_url}/flow_runs/filter", json={"flows": {"name": {"any_": ["hello-postgres"]}}}, timeout=60).json()
        assert [r["state_type"] for r in runs] == ["COMPLETED"]
    finally:
        server.stop()
    import psycopg

    with psycopg.connect(f"host=127.0.0.1 port={postgres.port} user=postgres dbname=prefect_server") as conn:
        (count,) = conn.execute("SELECT count(*) FROM flow_run").fetchone()
    assert count == 1  # the run lives in PostgreSQL, not in a SQLite file
