"""prefect.yaml: every entrypoint imports, every deployment's parameters validate
against its flow, and the retrain trigger listens for the monitoring events."""

from __future__ import annotations

import asyncio
import importlib
import json
import uuid
from pathlib import Path

import pytest
import yaml

from driftloop.tasks.monitor_policy import DRIFT_EVENT, PERFORMANCE_EVENT

REPO = Path(__file__).resolve().parents[2]
PREFECT_YAML = yaml.safe_load((REPO / "prefect.yaml").read_text())
DEPLOYMENTS = PREFECT_YAML["deployments"]
EXPECTED = {"ingest", "labels", "train", "score", "score-edge", "monitor", "lifecycle", "retrain", "edge-rollout"}


def load_flow(entrypoint: str):
    path, name = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


def test_every_stage_has_a_deployment() -> None:
    assert {load_flow(d["entrypoint"]).name for d in DEPLOYMENTS} == EXPECTED


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["entrypoint"])
def test_entrypoint_imports_and_parameters_validate(deployment: dict) -> None:
    flow = load_flow(deployment["entrypoint"])
    assert deployment["entrypoint"].startswith("flows/")
    # The retrain deployment serves every model: its trigger (or the caller) names one.
    named = {"model": "car_loan"} if flow.name == "retrain" else {}
    flow.validate_parameters({**deployment.get("parameters", {}), **named})
    assert deployment["work_pool"]["name"] in {"cpu", "gpu", "edge"}


def test_pools_match_the_design() -> None:
    pool = {load_flow(d["entrypoint"]).name: d["work_pool"]["name"] for d in DEPLOYMENTS}
    assert pool["train"] == pool["retrain"] == "gpu"
    assert pool["score"] == pool["monitor"] == "cpu"
    assert pool["score-edge"] == "edge"
    for name in ("cpu", "gpu", "edge"):
        template = json.loads((REPO / "infra" / "pools" / f"{name}.json").read_text())
        env = template["variables"]["properties"]["env"]["default"]
        assert env["DRIFTLOOP_DEVICE"] == ("cuda" if name == "gpu" else "cpu")


def test_one_retrain_deployment_serves_every_model_and_takes_only_its_name_from_the_event() -> None:
    (retrain,) = [d for d in DEPLOYMENTS if d["entrypoint"] == "flows/retrain.py:retrain"]
    (trigger,) = retrain["triggers"]
    assert set(trigger["expect"]) == {DRIFT_EVENT, PERFORMANCE_EVENT}
    assert trigger["match"]["prefect.resource.id"] == "driftloop.model.*"
    # The payload is untrusted: nothing from it reaches the flow, only the resource's name.
    assert trigger["parameters"] == {"model": "{{ event.resource['driftloop.model.name'] }}"}
    assert "payload" not in json.dumps(trigger)
    # Fan-in: no deployment-wide limit (it would cancel model B's retrain while A's runs);
    # debounced per model instead, serialised per model by the flow's lease.
    assert "concurrency_limit" not in retrain
    assert trigger["for_each"] == ["driftloop.model.name"] and trigger["posture"] == "Reactive"
    assert trigger["threshold"] == 1 and trigger["within"] > 0
    flow = load_flow(retrain["entrypoint"])
    flow.validate_parameters({**retrain["parameters"], "model": "car_loan"})
    # The flow has no parameter through which a source or dataset could be chosen.
    with pytest.raises(Exception, match="source"):
        flow.validate_parameters({**retrain["parameters"], "model": "car_loan", "source": "s3://evil/poison.csv"})


def _retrain_trigger() -> dict:
    (retrain,) = [d for d in DEPLOYMENTS if d["entrypoint"] == "flows/retrain.py:retrain"]
    (trigger,) = retrain["triggers"]
    return trigger


def _received(event: str, resource: dict[str, str], payload: dict):
    from prefect.server.events.schemas.events import ReceivedEvent
    from prefect.types._datetime import now

    return ReceivedEvent(event=event, resource=resource, payload=payload, occurred=now("UTC"), id=uuid.uuid4())


def _render(trigger: dict, event) -> dict:
    """The trigger's parameters as Prefect's server renders them when the event fires it."""
    from prefect.server.events.actions import RunDeployment
    from prefect.server.events.schemas.automations import Automation, EventTrigger, TriggeredAction
    from prefect.types._datetime import now

    server_trigger = EventTrigger(match=trigger["match"], expect=set(trigger["expect"]), posture="Reactive", threshold=1)
    action = RunDeployment(source="selected", deployment_id=uuid.uuid4(), parameters=trigger["parameters"])
    automation = Automation(id=uuid.uuid4(), name="retrain", trigger=server_trigger, actions=[action])
    assert server_trigger.covers(event), f"the trigger does not match {event.event} on {event.resource.id}"
    triggered = TriggeredAction(automation=automation, triggered=now("UTC"), triggering_labels={},
                                triggering_event=event, action=action)
    return asyncio.run(action.render_parameters(triggered))


@pytest.mark.parametrize("event_name", [DRIFT_EVENT, PERFORMANCE_EVENT])
def test_the_monitor_event_fires_the_trigger_and_renders_only_the_model_name(event_name: str) -> None:
    from driftloop.flows.monitor import model_resource

    hostile = {"model": "other_model", "source": "s3://evil/poison.csv", "version": 99}
    event = _received(event_name, model_resource("car_loan", 3), hostile)
    parameters = _render(_retrain_trigger(), event)
    assert parameters == {"model": "car_loan"}
    flow = load_flow("flows/retrain.py:retrain")
    flow.validate_parameters(parameters)


def test_an_event_for_another_resource_does_not_fire_the_retrain() -> None:
    from prefect.server.events.schemas.automations import EventTrigger

    trigger = _retrain_trigger()
    server_trigger = EventTrigger(match=trigger["match"], expect=set(trigger["expect"]), posture="Reactive", threshold=1)
    stray = _received(DRIFT_EVENT, {"prefect.resource.id": "prefect.flow-run.123"}, {})
    assert not server_trigger.covers(stray)
    other_kind = _received("driftloop.model.registered", {"prefect.resource.id": "driftloop.model.car_loan"}, {})
    assert not server_trigger.covers(other_kind)


def test_nightly_scoring_runs_in_one_process_and_its_commented_dask_options_validate() -> None:
    """The score deployment runs in one process unless a platform team uncomments one of
    its Dask lines (dask_block, dask_address, workers): each of those validates as it is."""
    (deployment,) = [d for d in DEPLOYMENTS if d["entrypoint"] == "flows/score.py:score"]
    assert not {"workers", "dask_address", "dask_block"} & set(deployment["parameters"])
    text = (REPO / "prefect.yaml").read_text()
    block = text[text.index("entrypoint: flows/score.py:score"):].split("\n\n", 1)[0]
    commented = [line.strip().removeprefix("# ") for line in block.splitlines()
                 if line.strip().startswith(("# workers:", "# dask_address:", "# dask_block:"))]
    assert {line.split(":", 1)[0] for line in commented} == {"workers", "dask_address", "dask_block"}
    flow = load_flow(deployment["entrypoint"])
    for line in commented:
        parameters = {**deployment["parameters"], **yaml.safe_load(line)}
        flow.validate_parameters(parameters)
        if "dask_address" in parameters:
            from driftloop.blocks.driftloop_blocks import check_dask_address

            check_dask_address(parameters["dask_address"])


# Knobs that weaken a promise or write lineage: the flow that trains decides them, never a
# parameter someone can set in the UI or with `prefect deployment run --param`.
_NOT_PARAMETERS = {"parity_min_rows", "trigger"}


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["entrypoint"])
def test_no_deployment_can_lower_the_parity_gate_or_set_its_lineage(deployment: dict) -> None:
    flow = load_flow(deployment["entrypoint"])
    assert not _NOT_PARAMETERS & set(flow.parameters.properties), flow.name
    with pytest.raises(Exception, match="parity_min_rows"):
        flow.validate_parameters({**deployment.get("parameters", {}), "model": "car_loan", "parity_min_rows": 10}
                                 if flow.name == "retrain" else {**deployment.get("parameters", {}), "parity_min_rows": 10})


def test_the_parity_rows_are_the_workers_setting_and_the_promised_100k_by_default(monkeypatch) -> None:
    from driftloop.flows.train import TrainOptions
    from driftloop.settings import get_settings

    monkeypatch.delenv("DRIFTLOOP_PARITY_MIN_ROWS", raising=False)
    assert get_settings().parity_min_rows == 100_000
    assert "parity_min_rows" not in TrainOptions.model_fields
    assert TrainOptions(trigger="retrain").trigger == "retrain"
    with pytest.raises(Exception, match="trigger"):
        TrainOptions(trigger="from an event payload")
