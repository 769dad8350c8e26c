"""The loop closes by itself on a real Prefect server with real workers: deployments
from prefect.yaml, pools from infra/, blocks registered, a champion trained through the
deployments, labels registered, monitoring that emits an event, and the automation's
retrain, which learns from the labelled analysis period; the same retrain deployment
serves a second model."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from driftloop.naming import artifact_key
from tests.support.prefect_api import api, wait_for

pytestmark = [pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(cmd: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, cwd=REPO, env=env, check=False, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def flow_runs(server, deployment_id: str) -> list[dict]:
    return api(server, "POST", "/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "limit": 200})


def running_interval(server, flow_run_id: str) -> tuple[datetime, datetime] | None:
    """When a run was RUNNING, from its state history; None when it never ran.

    Not the run's start_time: Prefect sets that to the end time for runs cancelled before
    they started (the concurrency guard's CANCEL_NEW), which would look like an overlap."""
    states = sorted(api(server, "GET", "/flow_run_states/", params={"flow_run_id": flow_run_id}), key=lambda s: s["timestamp"])
    running = [s["timestamp"] for s in states if s["type"] == "RUNNING"]
    if not running:
        return None
    final = [s["timestamp"] for s in states if s["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")]
    end = final[-1] if final else datetime.now(UTC).isoformat()
    return datetime.fromisoformat(running[0]), datetime.fromisoformat(end)


def verdict(server, flow_run_id: str, model: str = "car_loan") -> str:
    """What a retrain run did, from the artifact it leaves."""
    key = artifact_key("retrain", model)
    (artifact,) = api(server, "POST", "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}, "key": {"any_": [key]}}})
    return artifact["description"]


def finished(server, flow_run_id: str) -> dict | None:
    run = api(server, "GET", f"/flow_runs/{flow_run_id}")
    return run if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None


def deployment_id(server, flow: str, name: str = "car-loan") -> str:
    return api(server, "GET", f"/deployments/name/{flow}/{name}")["id"]


@pytest.fixture()
def env(prefect_server, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PREFECT_API_URL": prefect_server.api_url,
        "DRIFTLOOP_HOME": str(tmp_path / "home"),
        "DRIFTLOOP_PROJECT_DIR": str(REPO),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
    }


@pytest.fixture()
def workers(env: dict[str, str], tmp_path: Path):
    procs = []
    for pool in ("cpu", "gpu"):
        log = (tmp_path / f"worker-{pool}.log").open("wb")
        procs.append(subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--limit", "2"],
                                      cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    yield procs
    for proc in procs:  # workers stop before the (session) server
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_drift_event_triggers_one_retrain_at_a_time(prefect_server, env, workers, tmp_path: Path) -> None:
    started = time.monotonic()
    run([str(BIN / "driftloop"), "infra", "apply", "--gpu-device", "cpu"], env)
    run([str(BIN / "prefect"), "block", "register", "-f", "blocks/driftloop_blocks.py"], env)
    run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env)
    pools = {p["name"]: p for p in api(prefect_server, "POST", "/work_pools/filter", json={})}
    assert {"cpu", "gpu", "edge"} <= set(pools)

    prefect = str(BIN / "prefect")
    run([prefect, "deployment", "run", "train/car-loan", "--param", "trials=2", "--watch", "--watch-timeout", "900"], env, timeout=960)
    run([prefect, "deployment", "run", "score/car-loan", "--watch", "--watch-timeout", "600"], env, timeout=660)
    # The labels of the scored analysis period arrive.
    run([prefect, "deployment", "run", "labels/car-loan", "--watch", "--watch-timeout", "600"], env, timeout=660)

    from driftloop.registry import open_registry

    registry_url = f"sqlite:///{tmp_path / 'home' / 'registry.db'}"
    champion = open_registry(registry_url).resolve("car_loan@champion")
    assert champion.version == 1

    retrain_id = deployment_id(prefect_server, "retrain", "every-model")
    assert flow_runs(prefect_server, retrain_id) == []
    # As a user would in the UI: fewer tuning trials for the automation's retrains here.
    retrain = api(prefect_server, "GET", f"/deployments/{retrain_id}")
    api(prefect_server, "PATCH", f"/deployments/{retrain_id}", json={"parameters": {**retrain["parameters"], "trials": 2}})
    run([prefect, "deployment", "run", "monitor/car-loan", "--watch", "--watch-timeout", "600"], env, timeout=660)
    monitored_at = time.monotonic()

    triggered = wait_for(lambda: flow_runs(prefect_server, retrain_id), timeout=60)
    assert triggered, "the automation did not create a retrain flow run within 60 s"
    drift_to_run_s = time.monotonic() - monitored_at
    (first,) = triggered
    assert first["parameters"]["model"] == "car_loan"
    assert not {"source", "spec_path", "training_source"} & set(first["parameters"])  # only the name crosses

    done = wait_for(lambda: finished(prefect_server, first["id"]), timeout=900, interval=3)
    assert done["state_type"] == "COMPLETED", done["state"]
    versions = open_registry(registry_url).list_versions("car_loan")
    retrained = [v for v in versions if v.trigger == "retrain"]
    assert len(retrained) == 1 and retrained[0].version == 2
    assert retrained[0].gate["reasons"] and any("vs champion v1" in r for r in retrained[0].gate["reasons"])
    # It learned from the labelled analysis period: its window ends after v1's data.
    window = retrained[0].window
    assert window is not None and window["scoring_runs"] and window["new_labels"] >= 1000
    end = datetime.fromisoformat(window["end"])
    assert end > datetime.fromisoformat(champion.split["holdout"][1]) and end >= datetime(2019, 8, 1)
    # After the drift, v1 is wrong about the new period: a model that learned from that
    # period's labels must beat it on the newest rows, and take over.
    gate = retrained[0].gate
    assert gate["champion_version"] == 1 and gate["champion"] is not None
    assert gate["challenger"] > gate["champion"], f"the retrain did not beat the stale champion: {gate['reasons']}"
    assert gate["passed"], gate["reasons"]
    assert open_registry(registry_url).aliases("car_loan")["champion"] == 2
    assert verdict(prefect_server, first["id"]).startswith("v2 promoted: ")

    # A second model, trained before the storm: the same deployment's trigger serves it.
    from tests.support.data import make_loans, write_spec

    loans = tmp_path / "loans.parquet"
    make_loans(2000, seed=3).write_parquet(loans)
    spec = write_spec(tmp_path, {"gate": {"thresholds": {"roc_auc": {"min": 0.6}}}})
    run([str(BIN / "driftloop"), "train", "--spec", str(spec), str(loans), "--trials", "1", "--algorithms", "lightgbm"], env)

    # A storm: 100 drift events for car_loan inside a second, whose payloads name a
    # training source of their own, and in the same second one event for loans. The
    # trigger debounces per model (at most one run per model per `within`), so car_loan
    # gets one run, which the cooldown skips; loans' run is not cancelled and reaches its
    # own verdict; nothing trains on the payload.
    from prefect.events import emit_event

    within = next(t for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
                  if d["entrypoint"] == "flows/retrain.py:retrain" for t in d["triggers"])["within"]
    time.sleep(max(0.0, within + 2 - (time.monotonic() - monitored_at)))  # past the first event's debounce window
    poison = tmp_path / "poison.csv"
    poison.write_text("id,repaid\n1,0\n")
    before_storm = {r["id"] for r in flow_runs(prefect_server, retrain_id)}
    emitted_at = time.monotonic()
    for i in range(100):
        emit_event(
            event="driftloop.model.drift-detected",
            resource={"prefect.resource.id": "driftloop.model.car_loan", "driftloop.model.name": "car_loan", "driftloop.model.version": "2"},
            payload={"training_source": str(poison), "source": str(poison), "burst": i},
        )
        if i == 50:
            emit_event(event="driftloop.model.performance-degraded",
                       resource={"prefect.resource.id": "driftloop.model.loans", "driftloop.model.name": "loans",
                                 "driftloop.model.version": "1"})
    assert time.monotonic() - emitted_at < 1.0, "the storm took more than a second to emit"
    new_runs = lambda: [r for r in flow_runs(prefect_server, retrain_id) if r["id"] not in before_storm]
    wait_for(lambda: {r["parameters"]["model"] for r in new_runs()} == {"car_loan", "loans"}, timeout=120, interval=2)
    settled = wait_for(
        lambda: all(r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in new_runs()),
        timeout=900, interval=3,
    )
    assert settled
    time.sleep(5)  # a late, undebounced run would show up here
    storm = new_runs()
    by_model = {m: [r for r in storm if r["parameters"]["model"] == m] for m in ("car_loan", "loans")}
    assert len(by_model["car_loan"]) == 1 and len(by_model["loans"]) == 1, [r["parameters"] for r in storm]
    assert all(r["state_type"] == "COMPLETED" for r in storm), [(r["parameters"], r["state"]) for r in storm]
    runs = flow_runs(prefect_server, retrain_id)
    intervals = sorted(filter(None, (running_interval(prefect_server, r["id"]) for r in runs
                                     if r["parameters"]["model"] == "car_loan")))
    for (_, end), (start, _) in itertools.pairwise(intervals):
        assert start >= end, f"two retrains of car_loan overlapped: {intervals}"
    assert len(open_registry(registry_url).list_versions("car_loan")) == 2  # the cooldown stopped the storm
    assert verdict(prefect_server, by_model["car_loan"][0]["id"]).startswith("skipped: cooldown: the last retrain of car_loan")
    assert verdict(prefect_server, by_model["loans"][0]["id"], "loans") == (
        "skipped: waiting for labels: 0 of 1000 labelled rows newer than champion v1's training data")
    assert all(set(r["parameters"]) & {"source", "training_source"} == set() for r in runs)
    print("\nstorm of 100 events for car_loan + 1 for loans in one second: 1 car_loan run (cooldown), 1 loans run "
          "(its own verdict), none cancelled")
    assert not (REPO / ".driftloop").exists()  # runs wrote under DRIFTLOOP_HOME, not into the checkout
    print(f"\ne2e: {time.monotonic() - started:.0f} s in all; drift event -> retrain run created in {drift_to_run_s:.1f} s")
