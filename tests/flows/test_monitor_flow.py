"""Monitoring on the demo's car-loan data against a real Prefect server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from driftloop.demo_data import DEMO_SPEC, demo_data_path
from driftloop.flows.ingest import ingest
from driftloop.flows.monitor import monitor
from driftloop.flows.score import score
from driftloop.registry import open_registry
from driftloop.settings import get_settings
from driftloop.spec import MonitoringPolicy, load_spec
from driftloop.tasks.monitor_policy import PERFORMANCE_EVENT
from driftloop.tasks.monitor_report import MonitoringError
from tests.support.faults import inserts_fail
from tests.support.models import train_fast

pytestmark = [pytest.mark.prefect, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("monitoring")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DRIFTLOOP_HOME", str(root / "home"))
        reference = ingest(spec_path=str(DEMO_SPEC), source=str(demo_data_path("reference")))
        train_fast(spec_path=str(DEMO_SPEC), dataset_id=reference.dataset_id, trials=2, algorithms=["xgboost"], parity_min_rows=5000)
        drifted = score(input_uri=str(demo_data_path("analysis")), model="car_loan")
        # The stationary control: rows the model and its reference never saw, from before the
        # analysis period drifts (its first 20,000 rows; the drift starts in its second half).
        # Split as text, so the rows keep the file's exact formatting.
        header, *rows = demo_data_path("analysis").read_text(encoding="utf-8").splitlines(keepends=True)
        held_out = root / "held-out.csv"
        held_out.write_text(header + "".join(rows[:20_000]), encoding="utf-8")
        stationary = score(input_uri=str(held_out), model="car_loan")
        yield {"root": root, "drifted": drifted.run_id, "stationary": stationary.run_id}


def model_events(prefect_server, since: float) -> list[dict]:
    """driftloop model events the server has stored since ``since`` (epoch seconds)."""
    from datetime import UTC, datetime

    body = {
        "filter": {
            "occurred": {"since": datetime.fromtimestamp(since, UTC).isoformat()},
            "event": {"prefix": ["driftloop.model."]},
            "resource": {"id": ["driftloop.model.car_loan"]},
        },
        "limit": 50,
    }
    response = httpx.post(f"{prefect_server.api_url}/events/filter", json=body, timeout=10)
    response.raise_for_status()
    return response.json()["events"]


def wait_for_events(prefect_server, since: float, count: int, timeout: float = 20) -> list[dict]:
    deadline = time.monotonic() + timeout
    events = model_events(prefect_server, since)
    while len(events) < count and time.monotonic() < deadline:
        time.sleep(0.5)
        events = model_events(prefect_server, since)
    return events


def events_after_a_sentinel(prefect_server, since: float, timeout: float = 60) -> list[dict]:
    """The driftloop model events stored since ``since``, read once a sentinel event
    emitted now (after them, through the same client) is stored: an event the run
    emitted has arrived by then, so "none arrived" is an observation, not a guess."""
    import uuid
    from datetime import UTC, datetime

    from prefect.events import emit_event

    marker = f"driftloop.test.sentinel.{uuid.uuid4().hex}"
    emit_event(event="driftloop.test.sentinel", resource={"prefect.resource.id": marker})
    body = {"filter": {"occurred": {"since": datetime.fromtimestamp(since, UTC).isoformat()},
                       "resource": {"id": [marker]}}, "limit": 1}
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.post(f"{prefect_server.api_url}/events/filter", json=body, timeout=10)
        response.raise_for_status()
        if response.json()["events"]:
            return model_events(prefect_server, since)
        assert time.monotonic() < deadline, "the sentinel event never arrived: the server stores no events"
        time.sleep(0.2)  # polling the server for the sentinel, not standing in for it


def of_run(events: list[dict], flow_run_id) -> list[dict]:
    this_run = f"prefect.flow-run.{flow_run_id}"
    return [e for e in events if this_run in {r["prefect.resource.id"] for r in e.get("related", [])}]


def test_drift_in_the_drifted_period_fires_the_policy_and_one_event(demo, prefect_server, monkeypatch) -> None:
    monkeypatch.setenv("DRIFTLOOP_HOME", str(demo["root"] / "home"))
    since = time.time() - 1
    result = monitor(scoring_run=demo["drifted"], model="car_loan", labels_uri=str(demo_data_path("analysis_targets")))
    assert result.policy.fired and result.event is not None
    # NannyML's car-loan analysis drifts in its second half: alerts concentrate there.
    third = len(result.chunks) // 3
    early, late = result.chunks[:third], result.chunks[-third:]
    drifting = lambda chunks: sum(len(c.drifting_features) for c in chunks)
    assert drifting(late) > 2 * drifting(early)
    # The last chunk holds 500 rows of a 1,500-row chunk size: reported without alerts.
    assert all("repaid_loan_on_prev_car" in c.drifting_features for c in late[:-1])
    assert late[-1].drifting_features == []
    assert all(c.estimated is not None and c.realized is not None for c in result.chunks)

    event = result.event
    # The rule that fired, pinned: the labelled late chunks' realized ROC AUC falls below the
    # gate's bar (the performance rules come before drift); drift is reported beside it.
    assert event.event == PERFORMANCE_EVENT, result.policy.reasons
    assert any(r.startswith("realized roc_auc") for r in result.policy.reasons), result.policy.reasons
    assert event.resource == {"prefect.resource.id": "driftloop.model.car_loan", "driftloop.model.name": "car_loan",
                              "driftloop.model.version": str(result.version)}
    assert set(event.payload) >= {"drifting_features", "estimates", "chunk_span", "analysed"}
    assert event.payload["analysed"].startswith("predictions.car_loan@") and demo["drifted"] in event.payload["analysed"]
    assert "training_source" not in event.payload  # a retrain reads its data from the registry
    # Parsed, not compared as text ("nan" >= "2019" would pass): the window lies in 2019.
    span = event.payload["chunk_span"]
    assert datetime.fromisoformat(span["start"]).year == 2019 and datetime.fromisoformat(span["end"]) > datetime.fromisoformat(span["start"])

    stored = wait_for_events(prefect_server, since, 1)
    assert [e["event"] for e in stored] == [event.event]
    assert stored[0]["payload"]["monitoring_run"] == result.run_id  # stored before it was emitted
    assert stored[0]["payload"]["drifting_features"] == event.payload["drifting_features"]

    registry = open_registry(get_settings().registry_database_url())
    (run,) = [r for r in registry.list_monitoring_runs("car_loan") if r["id"] == result.run_id]
    assert run["decision"]["fired"] and run["event"]["event"] == event.event
    calibration = run["decision"]["calibration"]  # what every drift threshold was set for
    assert calibration["alert_rate"] == 0.01 and calibration["method"] == "bootstrap"
    assert set(calibration["univariate"]) == {f"{f}/jensen_shannon" for f in load_spec(DEMO_SPEC).feature_columns}
    assert calibration["realized"]["roc_auc"]["lower"] is not None  # realized thresholds: the same calibration
    # Calibrated once for this reference, chunk size and policy, and kept for the next runs.
    assert len(stored_calibrations()) == 1
    results = registry.monitoring_results(result.run_id)
    assert {r["kind"] for r in results} == {"univariate", "multivariate", "estimated", "realized"}
    multivariate = sorted((r["chunk_index"], r["alert"]) for r in results if r["kind"] == "multivariate")
    assert not any(alert for _, alert in multivariate[:third])
    late_full = [alert for _, alert in multivariate[-third:-1]]  # the last, partial chunk: no alerts
    assert sum(late_full) >= 0.7 * len(late_full) and not multivariate[-1][1]
    report_dir = Path(result.report_uri).parent
    assert {"univariate_drift.html", "multivariate_drift.html", "estimated_performance.html"} <= {p.name for p in report_dir.iterdir()}

    # What `make demo` prints after the loop, read back from the registry: the run's findings.
    from driftloop.demo import latest_monitoring

    stored_run = latest_monitoring(registry, "car_loan")
    assert stored_run["run_id"] == result.run_id
    assert stored_run["policy"] == result.policy.model_dump() and stored_run["event"] == event.model_dump()
    assert [(c["drifting_features"], c["estimated"], c["realized"]) for c in stored_run["chunks"]] == [
        (c.drifting_features, c.estimated, c.realized) for c in result.chunks
    ]


def stored_calibrations() -> dict[str, int]:
    """The model's stored calibrations: name -> modification time (ns)."""
    root = Path(get_settings().artifact_root_uri().removeprefix("file://")) / "calibrations" / "car_loan"
    return {p.name: p.stat().st_mtime_ns for p in root.glob("*.json")}


def test_stationary_control_raises_no_policy_alert_and_no_event(demo, prefect_server, monkeypatch) -> None:
    monkeypatch.setenv("DRIFTLOOP_HOME", str(demo["root"] / "home"))
    since = time.time() - 1
    calibrations = stored_calibrations()
    state = monitor(scoring_run=demo["stationary"], model="car_loan", return_state=True)
    result = state.result()
    # After the drifted run: the same reference, chunk size and policy, read back, not rewritten.
    after = stored_calibrations()
    assert len(after) == 1 and (not calibrations or after == calibrations)
    assert not result.policy.fired and result.event is None
    assert all(c.realized is None for c in result.chunks)  # no labels given
    # Events of this run only: the previous test's event can land within `since`'s slack.
    assert of_run(events_after_a_sentinel(prefect_server, since), state.state_details.flow_run_id) == []


def test_an_event_is_never_emitted_for_results_that_were_not_stored(demo, prefect_server, monkeypatch) -> None:
    """Stored first, emitted second: the registry refuses the monitoring run's record, so
    the drift the run found is not announced (a retrain would read results that are not
    there); the same run with the registry back emits its event."""
    monkeypatch.setenv("DRIFTLOOP_HOME", str(demo["root"] / "home"))
    registry = open_registry(get_settings().registry_database_url())
    since = time.time() - 1
    before = {r["id"] for r in registry.list_monitoring_runs("car_loan")}
    with inserts_fail(registry.engine, "monitoring_runs") as refused:
        state = monitor(scoring_run=demo["drifted"], model="car_loan", labels_uri=str(demo_data_path("analysis_targets")),
                        return_state=True)
    assert refused and state.is_failed()
    assert {r["id"] for r in registry.list_monitoring_runs("car_loan")} == before
    assert of_run(events_after_a_sentinel(prefect_server, since), state.state_details.flow_run_id) == []
    # The control: the same run, the registry working, does emit (so the check above could fail).
    again = monitor(scoring_run=demo["drifted"], model="car_loan", labels_uri=str(demo_data_path("analysis_targets")),
                    return_state=True)
    emitted = of_run(events_after_a_sentinel(prefect_server, since), again.state_details.flow_run_id)
    assert [e["payload"]["monitoring_run"] for e in emitted] == [again.result().run_id]


def test_too_few_reference_chunks_is_refused(demo, monkeypatch) -> None:
    monkeypatch.setenv("DRIFTLOOP_HOME", str(demo["root"] / "home"))
    with pytest.raises(MonitoringError, match="fewer than min_reference_chunks=4"):
        monitor(scoring_run=demo["drifted"], model="car_loan", policy=MonitoringPolicy(chunk_size=5000))


def test_monitor_cli_json(demo, monkeypatch) -> None:
    monkeypatch.setenv("DRIFTLOOP_HOME", str(demo["root"] / "home"))
    driftloop = str(Path(sys.executable).with_name("driftloop"))
    run = subprocess.run([driftloop, "monitor", "--model", "car_loan@champion", "--scoring-run", demo["stationary"], "--json"],
                         check=False, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    payload = json.loads(run.stdout)
    assert set(payload) >= {"chunks", "policy", "event"}
    assert set(payload["chunks"][0]) == {"start", "end", "drifting_features", "estimated", "realized"}
    assert payload["policy"]["fired"] is False and payload["event"] is None
