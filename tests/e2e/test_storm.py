"""A storm of drift events against the real automation: 100 events for one model inside a
second, whose payloads name a training source of their own, and in the same second one
event for a second model. The retrain deployment's trigger debounces per model (at most one
run per model per `within`), so each model gets exactly one run, each run reaches its own
verdict, the two models do not cancel each other, every event is stored on the server, and
nothing trains on a payload. Deterministic: both models wait for labels, so no run trains."""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from driftloop.registry import open_registry
from tests.support.data import make_loans, write_spec
from tests.support.e2e import (
    BIN,
    FINAL,
    client_env,
    deploy,
    deployment_id,
    flow_runs,
    run,
    running_interval,
    start_workers,
    verdict,
)
from tests.support.prefect_api import api, wait_for

pytestmark = [pytest.mark.e2e]

STORMY, CALM = "loans", "loans_b"


@pytest.fixture()
def env(prefect_server, tmp_path: Path) -> dict[str, str]:
    return client_env(prefect_server.api_url, tmp_path / "home")


@pytest.fixture()
def gpu_worker(env: dict[str, str], tmp_path: Path):
    yield from start_workers(env, tmp_path, ("gpu",))  # the retrain deployment's pool


def _stored_events(server, model: str, since: str) -> int:
    found = api(server, "POST", "/events/filter", json={
        "filter": {"occurred": {"since": since},
                   "event": {"prefix": ["driftloop.model."]},
                   "any_resource": {"id": [f"driftloop.model.{model}"]}},
        "limit": 1,
    })
    return int(found["total"])


def test_a_storm_of_drift_events_starts_one_retrain_per_model_and_none_trains_on_the_payload(
        prefect_server, env, gpu_worker, tmp_path: Path) -> None:
    from prefect.events import emit_event

    deploy(env)
    data = tmp_path / "loans.parquet"
    make_loans(2000, seed=3).write_parquet(data)
    for name in (STORMY, CALM):
        spec = write_spec(tmp_path, {"name": name, "gate": {"thresholds": {"roc_auc": {"min": 0.6}}}}, name=f"{name}.yaml")
        run([str(BIN / "driftloop"), "train", "--spec", str(spec), str(data), "--trials", "1", "--algorithms", "lightgbm"], env)
    registry = open_registry(f"sqlite:///{tmp_path / 'home' / 'registry.db'}")
    assert {name: registry.aliases(name).get("champion") for name in (STORMY, CALM)} == {STORMY: 1, CALM: 1}

    retrain_id = deployment_id(prefect_server, "retrain", "every-model")
    assert flow_runs(prefect_server, retrain_id) == []
    since = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    poison = tmp_path / "poison.csv"
    poison.write_text("id,repaid\n1,0\n")
    emitted_at = time.monotonic()
    for i in range(100):
        emit_event(
            event="driftloop.model.drift-detected",
            resource={"prefect.resource.id": f"driftloop.model.{STORMY}", "driftloop.model.name": STORMY,
                      "driftloop.model.version": "1"},
            payload={"training_source": str(poison), "source": str(poison), "burst": i},
        )
        if i == 50:
            emit_event(event="driftloop.model.performance-degraded",
                       resource={"prefect.resource.id": f"driftloop.model.{CALM}", "driftloop.model.name": CALM,
                                 "driftloop.model.version": "1"})
    assert time.monotonic() - emitted_at < 1.0, "the storm took more than a second to emit"

    # Every event reached the server: none lost, none merged away before the trigger saw it.
    def stored() -> tuple[int, int]:
        return _stored_events(prefect_server, STORMY, since), _stored_events(prefect_server, CALM, since)

    wait_for(lambda: stored() == (100, 1), timeout=60, interval=1)
    assert stored() == (100, 1)

    runs = lambda: flow_runs(prefect_server, retrain_id)
    wait_for(lambda: {r["parameters"]["model"] for r in runs()} == {STORMY, CALM}, timeout=120, interval=1)
    settled = wait_for(lambda: runs() and all(r["state_type"] in FINAL for r in runs()), timeout=600, interval=2)
    assert settled
    time.sleep(5)  # a late, undebounced run would show up here
    storm = runs()
    by_model = {m: [r for r in storm if r["parameters"]["model"] == m] for m in (STORMY, CALM)}
    assert len(by_model[STORMY]) == 1 and len(by_model[CALM]) == 1, [r["parameters"] for r in storm]
    assert all(r["state_type"] == "COMPLETED" for r in storm), [(r["parameters"], r["state"]) for r in storm]
    # Only the model's name crosses the trust boundary; the rest are the deployment's own.
    assert all(not set(r["parameters"]) & {"source", "training_source", "burst"} for r in storm), storm
    intervals = sorted(filter(None, (running_interval(prefect_server, r["id"]) for r in by_model[STORMY])))
    for (_, end), (start, _) in itertools.pairwise(intervals):
        assert start >= end, f"two retrains of {STORMY} overlapped: {intervals}"
    for name in (STORMY, CALM):
        assert verdict(prefect_server, by_model[name][0]["id"], name) == (
            "skipped: waiting for labels: 0 of 1000 labelled rows newer than champion v1's training data")
        assert [v.version for v in registry.list_versions(name)] == [1]  # nothing trained on the poison
    print(f"\nstorm of 100 events for {STORMY} + 1 for {CALM} in one second: all 101 stored, "
          "1 run per model, each with its own verdict, none cancelled")
