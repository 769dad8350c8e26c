"""Planted secrets reach nothing: not what the CLI prints, not the registry database, not
the Prefect server's database and logs, not the artifact root.

Three secrets, each in the form it takes in practice: an AWS-style secret key holding
``/`` and ``#`` in an S3 URI's user part, a database password in ``--sql-url`` (the
ingest succeeds: the tests' PostgreSQL trusts loopback and ignores it), and a pre-signed
URL's signature."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.data import GOOD_ROWS, write_csv, write_spec

pytestmark = [pytest.mark.prefect, pytest.mark.postgres, pytest.mark.usefixtures("prefect_server")]

KEY_SECRET = "wJalrPLANTEDone/K7MDENG#bPxR"  # '/' and '#': both ended the user part early
DB_PASSWORD = "PLANTEDtwo-hunter2"
SIGNATURE = "PLANTEDthree0123456789abcdef"
SECRETS = (KEY_SECRET, DB_PASSWORD, SIGNATURE)
# Fragments that identify each secret however it is encoded (quoted, JSON, %-escaped).
MARKERS = (b"PLANTEDone", b"K7MDENG", b"PLANTEDtwo", b"PLANTEDthree")

S3_WITH_KEY = f"s3://AKIAEXAMPLEUSER:{KEY_SECRET}@bucket/loans.csv"
PRESIGNED = f"https://bucket.s3.amazonaws.com/loans.parquet?X-Amz-Expires=60&X-Amz-Signature={SIGNATURE}"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    driftloop = Path(sys.executable).with_name("driftloop")
    return subprocess.run([str(driftloop), *map(str, args)], check=False, capture_output=True, text=True, timeout=300)


def files_holding_a_secret(root: Path) -> list[str]:
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        found += [f"{path}: {marker.decode()}" for marker in MARKERS if marker in data]
    return found


def test_planted_secrets_reach_no_output_record_log_or_artifact(tmp_path: Path, home: Path, postgres, prefect_server,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # never AWS, whatever the code does
    spec = write_spec(tmp_path)
    good = write_csv(tmp_path, GOOD_ROWS)
    source_db = postgres.create_database("no_secrets_source")
    import sqlalchemy as sa

    engine = sa.create_engine(source_db)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE loans (id INT, ts TEXT, amount REAL, ratio REAL, band TEXT, prev_ok INT, "
                             "term INT, repaid INT)")
        conn.exec_driver_sql("INSERT INTO loans VALUES (1,'2024-01-01',1,0.1,'low',1,12,1),(2,'2024-01-02',2,0.2,'mid',0,12,0)")
    engine.dispose()
    with_password = source_db.replace("postgres@", f"postgres:{DB_PASSWORD}@")

    runs = {
        "ingest s3 with key": cli("ingest", "--spec", spec, S3_WITH_KEY, "--json"),
        "train s3 with key": cli("train", "--spec", spec, S3_WITH_KEY, "--trials", "1"),
        "ingest sql, password": cli("ingest", "--spec", spec, "--sql-url", with_password, "--table", "loans", "--json"),
        "ingest sql, no table": cli("ingest", "--spec", spec, "--sql-url", with_password, "--table", "nope"),
        "ingest sql, unreachable": cli("ingest", "--spec", spec, "--sql-url",
                                       f"postgresql+psycopg://scorer:{DB_PASSWORD}@127.0.0.1:1/x", "--query", "SELECT 1"),
        "score pre-signed": cli("score", "--model", "loans", "--input", PRESIGNED, "--json"),
        "score output with key": cli("score", "--model", "loans", "--input", good, "--output",
                                     f"s3://AKIAEXAMPLEUSER:{KEY_SECRET}@bucket/out"),
        "labels pre-signed": cli("labels", "--spec", spec, PRESIGNED),
        "monitor labels pre-signed": cli("monitor", "--model", "loans", "--labels", PRESIGNED),
    }
    assert runs["ingest sql, password"].returncode == 0, runs["ingest sql, password"].stderr
    for name, run in runs.items():
        printed = run.stdout + run.stderr
        assert not [m for m in MARKERS if m.decode() in printed], f"{name} printed a secret: {printed}"
        if name in ("ingest s3 with key", "train s3 with key", "score pre-signed", "score output with key",
                    "labels pre-signed", "monitor labels pre-signed"):
            # refused with the other argument checks, before anything ran: a usage error
            assert run.returncode == 2 and "holds credentials" in run.stderr and "environment" in run.stderr, printed

    # the registry database and the artifact root (under DRIFTLOOP_HOME), the Prefect
    # server's database (its WAL too), its log and anything it stores (under its home)
    assert (home / "registry.db").exists() and (home / "artifacts").is_dir()
    leaks = files_holding_a_secret(home) + files_holding_a_secret(prefect_server.home)
    assert leaks == []


def test_flows_refuse_credentials_in_their_parameters_before_anything_runs(tmp_path: Path, home: Path) -> None:
    """A deployment run with such a parameter (from the UI, the API or an automation):
    Prefect has stored what it was given, but the flow refuses at its start, and neither
    its logs, its state message, the registry nor the artifact root hold the secret."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker
    from pydantic import SecretStr

    from driftloop.errors import CredentialsInUri
    from driftloop.flows.ingest import ingest
    from driftloop.flows.labels import ingest_labels
    from driftloop.flows.monitor import monitor
    from driftloop.flows.score import score
    from driftloop.tasks.ingest import SqlSource

    spec = str(write_spec(tmp_path))
    calls = {
        "ingest": lambda: ingest(spec_path=spec, source=S3_WITH_KEY, return_state=True),
        "ingest sql url": lambda: ingest(spec_path=spec, sql=SqlSource(
            url=SecretStr(f"postgresql+psycopg://scorer:{DB_PASSWORD}@127.0.0.1:1/x"), table="loans"), return_state=True),
        "score input": lambda: score(input_uri=PRESIGNED, model="loans", return_state=True),
        "score output": lambda: score(input_uri=str(tmp_path / "in.csv"), output_uri=S3_WITH_KEY, model="loans",
                                      return_state=True),
        "labels": lambda: ingest_labels(spec_path=spec, source=PRESIGNED, return_state=True),
        "monitor": lambda: monitor(input_uri=S3_WITH_KEY, model="loans", return_state=True),
    }
    states = {name: call() for name, call in calls.items()}
    APILogWorker.drain_all(timeout=60)  # the runs' logs sent to the server
    with get_client(sync_client=True) as client:
        for name, state in states.items():
            assert state.is_failed(), name
            with pytest.raises(CredentialsInUri, match="holds credentials"):
                state.result()
            assert not [m for m in MARKERS if m.decode() in (state.message or "")], (name, state.message)
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
            text = "\n".join(log.message for log in logs)
            assert "holds credentials" in text, (name, text)  # the refusal itself was logged, and arrived
            assert not [m for m in MARKERS if m.decode() in text], (name, text)
    assert files_holding_a_secret(home) == []
