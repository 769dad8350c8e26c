"""The registry database under faults: a SQLite file held locked by another process, and
the registry's PostgreSQL stopped and started while a training flow runs. Each ends in
a wait that succeeds or one clear error, never a half-written version."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from driftloop.errors import RegistryError
from driftloop.registry import open_registry
from driftloop.registry.store import DatasetRecord
from tests.support.data import make_loans, write_spec

# Another process that takes SQLite's exclusive lock, says so, and holds it.
_LOCK_HOLDER = """
import pathlib, sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
pathlib.Path(sys.argv[2]).touch()
time.sleep(float(sys.argv[3]))
conn.execute("COMMIT")
"""


def _hold_lock(db: Path, seconds: float, tmp_path: Path) -> subprocess.Popen[bytes]:
    ready = tmp_path / f"locked-{time.monotonic_ns()}"
    holder = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(db), str(ready), str(seconds)])
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert holder.poll() is None and time.monotonic() < deadline, "the lock holder did not start"
        time.sleep(0.05)
    return holder


def _dataset(name: str) -> DatasetRecord:
    return DatasetRecord(id=f"{name}-1", name=name, content_hash="0" * 64, spec_hash="1" * 64, source="test",
                         labelled=True, rows_in=1, rows_valid=1, rows_quarantined=0, snapshot_uri="file:///x",
                         quarantine_uri=None, column_types={}, created_at=datetime.now(UTC))


def test_a_briefly_locked_sqlite_registry_is_waited_for(tmp_path: Path) -> None:
    db = tmp_path / "registry.db"
    registry = open_registry(f"sqlite:///{db}")
    holder = _hold_lock(db, 2.0, tmp_path)
    registry.add_dataset(_dataset("waited"))  # queues on the lock, then writes
    assert holder.wait(timeout=30) == 0
    assert [d.name for d in registry.list_datasets()] == ["waited"]


def test_a_sqlite_registry_locked_too_long_is_one_clear_error_and_nothing_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIFTLOOP_REGISTRY_LOCK_TIMEOUT_S", "1")
    db = tmp_path / "registry.db"
    registry = open_registry(f"sqlite:///{db}")
    holder = _hold_lock(db, 20.0, tmp_path)
    try:
        with pytest.raises(RegistryError, match=r"locked by another process.*nothing was written.*fuser") as caught:
            registry.add_dataset(_dataset("refused"))
        assert str(db) in str(caught.value)
        # The CLI says the same in one line, and opening the registry is refused the same way.
        driftloop = Path(sys.executable).with_name("driftloop")
        done = subprocess.run([str(driftloop), "models", "list"], capture_output=True, text=True, timeout=120,
                              check=False, env={**os.environ, "DRIFTLOOP_HOME": str(tmp_path),
                                                "DRIFTLOOP_REGISTRY_LOCK_TIMEOUT_S": "1"})
        assert done.returncode != 0
        assert done.stderr.startswith("driftloop: error: the registry database") and "locked" in done.stderr
        assert "Traceback" not in done.stderr
    finally:
        holder.kill()
        holder.wait()
    assert registry.list_datasets() == []


# A training run that pauses just before it registers its version (the fault harness:
# the test stops PostgreSQL meanwhile), then goes on as the real CLI would.
_PAUSED_TRAINER = """
import pathlib, sys, time
import driftloop.flows.train as train_flow
paused, resume = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
original = train_flow.register_task
def pause_then_register(*args, **kwargs):
    paused.touch()
    while not resume.exists():
        time.sleep(0.1)
    return original(*args, **kwargs)
train_flow.register_task = pause_then_register
from driftloop.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _paused_training(tmp_path: Path, env: dict[str, str], tag: str) -> tuple[subprocess.Popen[str], Path, Path]:
    spec = write_spec(tmp_path, {"gate": {"thresholds": {"roc_auc": {"min": 0.6}}}})
    data = tmp_path / "loans.parquet"
    if not data.exists():
        make_loans(2000, seed=7).write_parquet(data)
    paused, resume = tmp_path / f"paused-{tag}", tmp_path / f"resume-{tag}"
    child = subprocess.Popen(
        [sys.executable, "-c", _PAUSED_TRAINER, str(paused), str(resume),
         "train", "--spec", str(spec), str(data), "--trials", "1", "--algorithms", "lightgbm"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    deadline = time.monotonic() + 300
    while not paused.exists():
        assert child.poll() is None, child.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training never reached registration"
        time.sleep(0.2)
    return child, paused, resume


@pytest.mark.postgres
@pytest.mark.prefect
@pytest.mark.usefixtures("prefect_server")
def test_the_registry_postgres_restarted_under_a_training_flow(postgres, tmp_path: Path) -> None:
    url = postgres.create_database("outage")
    env = {**os.environ, "DRIFTLOOP_REGISTRY_URL": url, "DRIFTLOOP_HOME": str(tmp_path / "home")}

    # Down and back up before the flow's next registry call: the flow recovers (the pool
    # pings and reconnects) and registers a whole version.
    child, _, resume = _paused_training(tmp_path, env, "restart")
    postgres.stop()
    postgres.resume()
    resume.touch()
    _, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-3000:]
    registry = open_registry(url)
    (v1,) = registry.list_versions("loans")
    assert registry.aliases("loans") == {"champion": 1} and v1.reference_uri and v1.card_uri

    # Still down when the flow writes: it fails with one clear error and leaves no version.
    child, _, resume = _paused_training(tmp_path, env, "down")
    postgres.stop()
    try:
        resume.touch()
        _, err = child.communicate(timeout=300)
    finally:
        postgres.resume()
    assert child.returncode != 0
    errors = [line for line in err.splitlines() if line.startswith("driftloop: ")]
    assert len(errors) == 1 and "registry database" in errors[0] and "run again" in errors[0], err[-3000:]
    registry = open_registry(url)
    assert [v.version for v in registry.list_versions("loans")] == [1]
    assert registry.aliases("loans") == {"champion": 1}
