"""What the end-to-end tests share: the environment of a real server's clients, process
workers on the project's pools, the deployments of prefect.yaml, and reading runs and
verdicts back from the server's API."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from driftloop.naming import artifact_key
from tests.support.prefect_api import api

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def client_env(api_url: str, home: Path) -> dict[str, str]:
    """Environment of the CLI, workers and flow runs against the server at ``api_url``."""
    return {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "DRIFTLOOP_HOME": str(home),
        "DRIFTLOOP_PROJECT_DIR": str(REPO),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
    }


def run(cmd: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, cwd=REPO, env=env, check=False, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def run_deployment(server, env: dict[str, str], name: str, *params: str, timeout: float = 600) -> dict:
    """``prefect deployment run NAME --param ...`` as CI runs it, then wait on the run's
    state through the API and return the finished run, which must have COMPLETED.

    Not ``--watch``: it waits for a terminal-state event on a websocket, and can miss it
    and hang after the run completed (PrefectHQ/prefect#19989; seen here once in a
    fresh-clone suite). The run's state in the API is the truth."""
    cmd = [str(BIN / "prefect"), "deployment", "run", name]
    for param in params:
        cmd += ["--param", param]
    out = run(cmd, env, timeout=120).stdout
    match = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert match, f"no flow run id in the output of {' '.join(cmd)}:\n{out}"
    flow_run_id = match.group(1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done := finished(server, flow_run_id):
            break
        time.sleep(0.5)  # one small GET; a finished run is seen within half a second
    else:
        state = api(server, "GET", f"/flow_runs/{flow_run_id}")
        raise AssertionError(f"{name}: flow run {flow_run_id} still {state['state_type']} after {timeout:.0f} s\n"
                             + run_logs(server, flow_run_id))
    assert done["state_type"] == "COMPLETED", f"{name}: {done['state']}\n" + run_logs(server, flow_run_id)
    return done


def run_logs(server, flow_run_id: str, last: int = 40) -> str:
    """The last log lines of a flow run, for an assertion message."""
    logs = api(server, "POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_DESC", "limit": last})
    return "\n".join(f"{log['timestamp']} {log['message']}" for log in reversed(logs))


def deploy(env: dict[str, str]) -> None:
    """Pools from infra/, the blocks, and every deployment of prefect.yaml."""
    run([str(BIN / "driftloop"), "infra", "apply", "--gpu-device", "cpu"], env)
    run([str(BIN / "prefect"), "block", "register", "-m", "driftloop.blocks.driftloop_blocks"], env)
    run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env)


def start_workers(env: dict[str, str], logs: Path, pools: tuple[str, ...] = ("cpu", "gpu")) -> Iterator[list[subprocess.Popen]]:
    """Process workers on ``pools``, stopped (before the server) when the generator closes."""
    procs = []
    for pool in pools:
        log = (logs / f"worker-{pool}.log").open("wb")
        procs.append(subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--limit", "2"],
                                      cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def flow_runs(server, deployment_id: str, since: datetime | None = None) -> list[dict]:
    """The deployment's runs, those created at or after ``since`` when given: the session's
    server is shared by the test files on one pytest worker, and another end-to-end test
    may have run the same deployment before this one."""
    runs = api(server, "POST", "/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "limit": 200})
    return [r for r in runs if since is None or datetime.fromisoformat(r["created"]) >= since]


def deployment_id(server, flow: str, name: str = "car-loan") -> str:
    return api(server, "GET", f"/deployments/name/{flow}/{name}")["id"]


def finished(server, flow_run_id: str) -> dict | None:
    run_ = api(server, "GET", f"/flow_runs/{flow_run_id}")
    return run_ if run_["state_type"] in FINAL else None


def running_interval(server, flow_run_id: str) -> tuple[datetime, datetime] | None:
    """When a run was RUNNING, from its state history; None when it never ran.

    Not the run's start_time: Prefect sets that to the end time for runs cancelled before
    they started (the concurrency guard's CANCEL_NEW), which would look like an overlap."""
    states = sorted(api(server, "GET", "/flow_run_states/", params={"flow_run_id": flow_run_id}), key=lambda s: s["timestamp"])
    running = [s["timestamp"] for s in states if s["type"] == "RUNNING"]
    if not running:
        return None
    final = [s["timestamp"] for s in states if s["type"] in FINAL]
    end = final[-1] if final else datetime.now(UTC).isoformat()
    return datetime.fromisoformat(running[0]), datetime.fromisoformat(end)


def verdict(server, flow_run_id: str, model: str = "car_loan") -> str:
    """What a retrain run did, from the artifact it leaves."""
    key = artifact_key("retrain", model)
    (artifact,) = api(server, "POST", "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}, "key": {"any_": [key]}}})
    return artifact["description"]
