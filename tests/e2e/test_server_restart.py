"""The Prefect server restarted while a scoring flow runs on a worker: the run must end
Completed or Crashed (never stuck Running), and a drift event sent after the restart must
still start the retrain. Its own server (the session's is shared): real server, real
worker, real deployments from prefect.yaml."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.prefect_api import api, wait_for
from tests.support.services import PrefectServer, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")

_EMIT_DRIFT = """
from prefect.events import emit_event
emit_event(event="driftloop.model.drift-detected",
           resource={"prefect.resource.id": "driftloop.model.car_loan", "driftloop.model.name": "car_loan",
                     "driftloop.model.version": "1"})
"""


def _run(cmd: list[str], env: dict[str, str], timeout: float = 900) -> str:
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _runs_of(server: PrefectServer, flow: str, name: str) -> list[dict]:
    deployment = api(server, "GET", f"/deployments/name/{flow}/{name}")
    return api(server, "POST", "/flow_runs/filter",
                json={"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}, "limit": 50})


def _wait(predicate, timeout: float, what: str, interval: float = 1.0):
    value = wait_for(predicate, timeout, interval)
    assert value, f"{what}: not within {timeout:.0f} s"
    return value


@pytest.fixture()
def own_server(tmp_path: Path):
    server = PrefectServer(port=free_port(), home=tmp_path / "prefect-server")
    server.start()
    yield server
    server.stop()


def _assert_whole(model: str) -> None:
    """What scoring left is whole: every run the predictions table holds a commit of is
    recorded (a run committed and then crashed is recorded from its snapshot by the next
    run), and each recorded run's snapshot holds exactly the rows it recorded."""
    from driftloop.registry import open_registry
    from driftloop.settings import get_settings
    from tests.support import tables as memory

    runs = {r.id: r for r in open_registry(get_settings().registry_database_url()).list_scoring_runs(model)}
    table = memory.predictions(model).refresh()
    committed = {s.summary.additional_properties.get("driftloop.run-id") for s in table.table.snapshots() if s.summary}
    assert committed - {None} <= set(runs), "a committed scoring run is not recorded"
    for run in runs.values():
        assert run.rows_in == run.rows_scored + run.rows_quarantined > 0
        if run.snapshot_id is not None:
            assert memory.rows(model, run.snapshot_id, run=run.id).height == run.rows_scored, run


def test_a_server_restart_under_a_scoring_run_leaves_no_run_stuck_and_keeps_the_automation(
        own_server: PrefectServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        **os.environ,
        "PREFECT_API_URL": own_server.api_url,
        "DRIFTLOOP_HOME": str(tmp_path / "home"),
        "DRIFTLOOP_PROJECT_DIR": str(REPO),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
    }
    _run([str(BIN / "driftloop"), "infra", "apply", "--gpu-device", "cpu"], env)
    _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env)
    _run([str(BIN / "driftloop"), "train", "--spec", "deployments/specs/car_loan.yaml", "demo:reference",
          "--trials", "1", "--algorithms", "lightgbm"], env)

    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "cpu"], cwd=REPO, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        created = _run([str(BIN / "prefect"), "deployment", "run", "score/car-loan"], env)
        # The deployment's nightly schedule has runs of its own: take the one just created.
        (scoring_id,) = set(re.findall(r"UUID: ([0-9a-f-]{36})", created))
        scoring = api(own_server, "GET", f"/flow_runs/{scoring_id}")

        def running() -> bool:
            state = api(own_server, "GET", f"/flow_runs/{scoring['id']}")["state_type"]
            assert state not in FINAL, f"the scoring run ended ({state}) before the restart could hit it"
            return state == "RUNNING"

        _wait(running, 300, "the scoring run never started running", interval=0.5)
        own_server.stop()  # the outage: the run goes on without its API
        time.sleep(3)
        own_server.start()

        def finished() -> dict | None:
            run = api(own_server, "GET", f"/flow_runs/{scoring['id']}")
            return run if run["state_type"] in FINAL else None

        ended = _wait(finished, 600, "the scoring run is stuck after the restart", interval=1)
        assert ended["state_type"] in ("COMPLETED", "CRASHED"), ended["state"]
        # However it ended, it left nothing half-done: what it committed is recorded with its
        # rows, and the same input scored again completes, replacing its rows (no duplicates).
        monkeypatch.setenv("DRIFTLOOP_HOME", env["DRIFTLOOP_HOME"])
        rerun = json.loads(_run([str(BIN / "driftloop"), "score", "--model", "car_loan@champion", "--input",
                                 "demo:analysis", "--json"], env))
        assert rerun["rows_in"] == rerun["rows_scored"] + rerun["rows_quarantined"] > 0
        _assert_whole("car_loan")
        import polars as pl

        from tests.support import tables as memory

        current = memory.rows("car_loan").filter(pl.col("input_key") == rerun["input_key"])
        assert current.height == rerun["rows_scored"] and current["scoring_run_id"].unique().to_list() == [rerun["run_id"]]

        # After the restart the automation still listens: a drift event starts the retrain.
        assert _runs_of(own_server, "retrain", "every-model") == []
        _run([sys.executable, "-c", _EMIT_DRIFT], env, timeout=120)
        (retrain,) = _wait(lambda: _runs_of(own_server, "retrain", "every-model"), 120,
                           "no retrain run after a drift event sent after the restart")
        assert retrain["parameters"]["model"] == "car_loan"
        print(f"\nscoring run across the restart: {ended['state_type']} ({ended['state']['message']})")
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
