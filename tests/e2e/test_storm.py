"""A storm of drift events against the real automation: 100 events for one model inside a
second, whose payloads name a training source of their own, and in the same second one
event for a second model. The retrain deployment's trigger debounces per model (at most one
run per model per `within`), so each model gets exactly one run, each run reaches its own
verdict, the two models do not cancel each other, every event is stored on the server, and
nothing trains on a payload. Every event carries a poisoned payload (a training source of
its own) and the cooldown is 0, so the poison meets a run that reads data: the second model
has new labels and trains, on a window whose sources are registry records only. Deterministic:
the first model waits for labels, the second trains exactly once."""

from __future__ import annotations

import itertools
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
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

    test_started = datetime.now(UTC)
    deploy(env)
    driftloop = str(BIN / "driftloop")
    data = tmp_path / "loans.parquet"
    make_loans(2000, seed=3).write_parquet(data)  # two weeks from 2024-01-01
    specs = {}
    for name in (STORMY, CALM):
        specs[name] = write_spec(tmp_path, {"name": name, "gate": {"thresholds": {"roc_auc": {"min": 0.6}}},
                                            "retrain": {"window": {"last": "90d"}, "min_new_labels": 500}},
                                 name=f"{name}.yaml")
        run([driftloop, "train", "--spec", str(specs[name]), str(data), "--trials", "1", "--algorithms", "lightgbm"], env)
    registry = open_registry(f"sqlite:///{tmp_path / 'home' / 'registry.db'}")
    assert {name: registry.aliases(name).get("champion") for name in (STORMY, CALM)} == {STORMY: 1, CALM: 1}
    # CALM's champion scored a later period, whose labels arrived: its retrain has data to read.
    later = make_loans(1000, seed=4, start="2024-02-01").with_columns(pl.col("id") + 100_000)
    later.drop("repaid").write_parquet(tmp_path / "later.parquet")
    later.select("id", "repaid").write_csv(tmp_path / "later-labels.csv")
    run([driftloop, "score", "--model", f"{CALM}@champion", "--input", str(tmp_path / "later.parquet")], env)
    run([driftloop, "labels", "--spec", str(specs[CALM]), str(tmp_path / "later-labels.csv")], env)
    (scored,) = registry.list_scoring_runs(CALM)

    retrain_id = deployment_id(prefect_server, "retrain", "every-model")
    assert flow_runs(prefect_server, retrain_id, since=test_started) == []
    # As a user would in the UI: one quick trial, and no cooldown for the poison to hide behind.
    retrain = api(prefect_server, "GET", f"/deployments/{retrain_id}")
    api(prefect_server, "PATCH", f"/deployments/{retrain_id}", json={"parameters": {
        **retrain["parameters"], "trials": 1, "algorithms": ["lightgbm"], "cooldown_s": 0}})
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
                                 "driftloop.model.version": "1"},
                       payload={"training_source": str(poison), "source": str(poison), "window": {"last": "1d"}})
    assert time.monotonic() - emitted_at < 1.0, "the storm took more than a second to emit"

    # Every event reached the server: none lost, none merged away before the trigger saw it.
    def stored() -> tuple[int, int]:
        return _stored_events(prefect_server, STORMY, since), _stored_events(prefect_server, CALM, since)

    wait_for(lambda: stored() == (100, 1), timeout=60, interval=1)
    assert stored() == (100, 1)

    runs = lambda: flow_runs(prefect_server, retrain_id, since=test_started)
    wait_for(lambda: {r["parameters"]["model"] for r in runs()} == {STORMY, CALM}, timeout=120, interval=1)
    settled = wait_for(lambda: runs() and all(r["state_type"] in FINAL for r in runs()), timeout=600, interval=1)
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
    assert verdict(prefect_server, by_model[STORMY][0]["id"], STORMY) == (
        "skipped: waiting for labels: 0 of 500 labelled rows newer than champion v1's training data")
    assert [v.version for v in registry.list_versions(STORMY)] == [1]
    # CALM's run read data and trained: on the registry's records, not on the payload.
    assert verdict(prefect_server, by_model[CALM][0]["id"], CALM).startswith("v2 ")
    versions = {v.version: v for v in registry.list_versions(CALM)}
    assert sorted(versions) == [1, 2]
    v2 = versions[2]
    window = v2.window
    assert window["scoring_runs"] == [scored.id] and window["new_labels"] == 1000
    assert set(window["dataset_ids"]) <= {d.id for d in registry.list_datasets(CALM)}
    assert window["rows"] == 3000 and window["policy"] == "last 90d"  # v1's 2,000 rows and the 1,000 labelled
    assert str(poison) not in json.dumps(window) and str(poison) not in json.dumps(v2.model_dump(mode="json"))
    print(f"\nstorm of 100 events for {STORMY} + 1 for {CALM} in one second: all 101 stored, "
          "1 run per model, each with its own verdict, none cancelled; the one that trained read registry records only")
