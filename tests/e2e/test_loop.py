"""The loop closes by itself on a real Prefect server with real workers: deployments
from prefect.yaml, pools from infra/, blocks registered, a champion trained through the
deployments, labels registered, monitoring that emits an event, and the automation's
retrain, which learns from the labelled analysis period. (A storm of events against the
same deployments: tests/e2e/test_storm.py.)"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from tests.support.e2e import (
    REPO,
    client_env,
    deploy,
    deployment_id,
    finished,
    flow_runs,
    run_deployment,
    start_workers,
    verdict,
)
from tests.support.prefect_api import api, wait_for

pytestmark = [pytest.mark.e2e]


@pytest.fixture()
def env(prefect_server, tmp_path: Path) -> dict[str, str]:
    return client_env(prefect_server.api_url, tmp_path / "home")


@pytest.fixture()
def workers(env: dict[str, str], tmp_path: Path):
    yield from start_workers(env, tmp_path)


def test_a_drift_event_retrains_on_the_labelled_period_and_promotes(prefect_server, env, workers, tmp_path: Path) -> None:
    started = time.monotonic()
    test_started = datetime.now(UTC)
    deploy(env)
    pools = {p["name"]: p for p in api(prefect_server, "POST", "/work_pools/filter", json={})}
    assert {"cpu", "gpu", "edge"} <= set(pools)

    # The car-loan spec without its rollout section: a passing retrain becomes champion at
    # once (the shadow rollout on the same deployments: `make demo`).
    spec = yaml.safe_load((REPO / "deployments" / "specs" / "car_loan.yaml").read_text())
    spec.pop("rollout")
    (tmp_path / "car_loan.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False))
    run_deployment(prefect_server, env, "train/car-loan", "trials=2", f"spec_path={tmp_path / 'car_loan.yaml'}", timeout=900)
    run_deployment(prefect_server, env, "score/car-loan")
    # The labels of the scored analysis period arrive.
    run_deployment(prefect_server, env, "labels/car-loan")

    from driftloop.registry import open_registry

    registry_url = f"sqlite:///{tmp_path / 'home' / 'registry.db'}"
    champion = open_registry(registry_url).resolve("car_loan@champion")
    assert champion.version == 1

    retrain_id = deployment_id(prefect_server, "retrain", "every-model")
    assert flow_runs(prefect_server, retrain_id, since=test_started) == []
    # As a user would in the UI: fewer tuning trials for the automation's retrains here.
    retrain = api(prefect_server, "GET", f"/deployments/{retrain_id}")
    api(prefect_server, "PATCH", f"/deployments/{retrain_id}", json={"parameters": {**retrain["parameters"], "trials": 2}})
    run_deployment(prefect_server, env, "monitor/car-loan")
    monitored_at = time.monotonic()

    triggered = wait_for(lambda: flow_runs(prefect_server, retrain_id, since=test_started), timeout=60)
    assert triggered, "the automation did not create a retrain flow run within 60 s"
    drift_to_run_s = time.monotonic() - monitored_at
    (first,) = triggered
    assert first["parameters"]["model"] == "car_loan"
    assert not {"source", "spec_path", "training_source"} & set(first["parameters"])  # only the name crosses

    done = wait_for(lambda: finished(prefect_server, first["id"]), timeout=900, interval=1)
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

    assert not (REPO / ".driftloop").exists()  # runs wrote under DRIFTLOOP_HOME, not into the checkout
    print(f"\ne2e: {time.monotonic() - started:.0f} s in all; drift event -> retrain run created in {drift_to_run_s:.1f} s")
