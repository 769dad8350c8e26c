"""``make demo``: the lifecycle on NannyML's synthetic car-loan data, which ships inside
the nannyml package (nothing is downloaded)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from driftloop.demo_data import DEMO_SPEC, demo_data_path
from driftloop.errors import DriftloopError


def run_demo(trials: int = 10) -> dict[str, Any]:
    from driftloop.flows.ingest import ingest
    from driftloop.flows.monitor import monitor
    from driftloop.flows.score import score
    from driftloop.flows.train import train
    from driftloop.settings import get_settings

    spec = str(DEMO_SPEC)
    reference = ingest(spec_path=spec, source=str(demo_data_path("reference")))
    analysis = ingest(spec_path=spec, source=str(demo_data_path("analysis")), labelled=False)
    model = train(spec_path=spec, dataset_id=reference.dataset_id, trials=trials)
    export = get_settings().home_dir / "demo" / "scored-analysis.parquet"
    scored = score(input_uri=str(demo_data_path("analysis")), output_uri=str(export), model="car_loan@champion")
    watched = monitor(scoring_run=scored.run_id, model="car_loan@champion",
                      labels_uri=str(demo_data_path("analysis_targets")))
    return {
        "ingest": {
            "reference (training data)": reference.model_dump(),
            "analysis (to score, labels arrive later)": analysis.model_dump(),
        },
        "train": model.model_dump(),
        "score": scored.model_dump(),
        "monitor": watched.model_dump(),
    }


# The car-loan analysis period runs from 2018-10-30 to 2019-08-29. In the loop demo the
# nightly scoring and the first labels cover its rows up to this date (they drive
# monitoring and the retrain); the rows from this date are the later period, scored by the
# champion with the retrain's candidate in shadow, whose labels then decide the rollout.
FIRST_LABELS_UNTIL = "2019-07-01"


# How long the demo waits for the monitor's event to start a retrain, and then for that
# retrain to end (it trains on CPU in the demo: minutes).
RETRAIN_TRIGGER_TIMEOUT_S = 120
RETRAIN_FINISH_TIMEOUT_S = 3600


def run_loop_demo(trials: int = 5, keep_running: bool = False, yes_this_server: bool = False) -> dict[str, Any]:
    """The loop on a real Prefect server: deploy, start workers, run train -> score ->
    labels -> monitor through the deployments and let the monitor's event start the
    retrain. Its challenger becomes the candidate (the car-loan spec's rollout.shadow):
    the later period is scored by the champion with the candidate in shadow on the same
    rows, and the labels of that period decide.

    With ``PREFECT_API_URL`` set the demo would change that server (pools, blocks,
    deployments with schedules, workers): refused, saying what would change, when the
    server already holds pools or deployments of this project, unless ``yes_this_server``."""
    import os

    from driftloop.local_stack import LocalStack
    from driftloop.settings import get_settings

    settings = get_settings()
    with LocalStack(settings.home_dir, keep_running=keep_running, yes_this_server=yes_this_server) as stack:
        os.environ["PREFECT_API_URL"] = stack.api_url  # before Prefect reads its settings
        from driftloop.registry import open_registry

        has_gpu = _cuda_available()
        stack.deploy(gpu_device="cuda" if has_gpu else "cpu")
        stack.start_workers(("cpu", "gpu"))
        first, later = _write_periods(settings.home_dir / "demo")
        started = datetime.now(UTC)
        steps = {}
        for name, params in (("train/car-loan", {"trials": trials}), ("score/car-loan", {"input_uri": str(first.rows)}),
                             ("labels/car-loan", {"source": str(first.labels)}), ("monitor/car-loan", {})):
            steps[name] = _run_and_wait(name, params)
        retrain = _wait_for_retrain(since=started, timeout_s=RETRAIN_TRIGGER_TIMEOUT_S,
                                    finish_timeout_s=RETRAIN_FINISH_TIMEOUT_S)
        registry = open_registry(settings.registry_database_url())
        # The spec's rollout.shadow made a passing retrain the candidate: the later period
        # is scored by the champion, the candidate scoring the same rows in shadow, and
        # its labels decide (the labels flow runs rollout-decide).
        candidate = registry.find_alias("car_loan", "candidate")
        served = registry.find_alias("car_loan", "champion")
        if candidate is not None:
            steps[f"score/car-loan (from {FIRST_LABELS_UNTIL})"] = _run_and_wait("score/car-loan", {"input_uri": str(later.rows)})
            steps[f"labels/car-loan (from {FIRST_LABELS_UNTIL})"] = _run_and_wait("labels/car-loan", {"source": str(later.labels)})
        versions = [
            {"version": v.version, "trigger": v.trigger, "gate_passed": v.gate["passed"], "reasons": v.gate["reasons"],
             "window": v.window}
            for v in sorted(registry.list_versions("car_loan"), key=lambda v: v.version)
        ]
        ui = stack.api_url.removesuffix("/api")
        from driftloop.tables import history, open_tables

        tables = open_tables(registry.engine, settings.artifact_root_uri())
        memory = {name: history(table) for name, table in (("predictions.car_loan", tables.predictions("car_loan")),
                                                           ("labels.car_loan", tables.labels("car_loan"))) if table}
        return {
            "ui": ui, "kept_running": keep_running, "steps": steps, "monitor": latest_monitoring(registry, "car_loan"),
            "tables": memory,
            "retrain": retrain, "versions": versions, "aliases": registry.aliases("car_loan"),
            "rollout": shadow_rollout(registry, "car_loan", since=started, served=served.version if served else None,
                                      candidate=candidate.version if candidate else None, later_rows=later.count,
                                      ui=ui if keep_running else None),
        }


def _analysis_with_labels() -> Any:
    """The analysis rows as read (text) with their target; ISO timestamps compare as text."""

    from driftloop.tasks.ingest import read_file

    analysis = read_file(str(demo_data_path("analysis"))).frame
    targets = read_file(str(demo_data_path("analysis_targets"))).frame
    return analysis.join(targets.select("id", "repaid"), on="id", how="inner")


@dataclass(frozen=True)
class Period:
    """A part of the analysis period as the demo hands it to the deployments: its rows
    to score (no target) and their labels (id, repaid), which arrive later."""

    rows: Path
    labels: Path
    count: int


def _write_periods(directory: Path) -> tuple[Period, Period]:
    """The analysis rows before FIRST_LABELS_UNTIL (scored nightly, labelled first) and
    from it (the later period), each as rows to score and their labels."""
    import polars as pl

    directory.mkdir(parents=True, exist_ok=True)
    analysis = _analysis_with_labels()
    periods = []
    for name, keep in ((f"until-{FIRST_LABELS_UNTIL}", pl.col("timestamp") < FIRST_LABELS_UNTIL),
                       (f"from-{FIRST_LABELS_UNTIL}", pl.col("timestamp") >= FIRST_LABELS_UNTIL)):
        part = analysis.filter(keep)
        rows, labels = directory / f"analysis-{name}.csv", directory / f"labels-{name}.csv"
        part.drop("repaid").write_csv(rows)
        part.select("id", "repaid").write_csv(labels)
        periods.append(Period(rows, labels, part.height))
    return periods[0], periods[1]


def shadow_rollout(registry: Any, model: str, *, since: datetime, served: int | None, candidate: int | None,
                   later_rows: int, ui: str | None) -> dict[str, Any]:
    """What the shadow rollout decided during the demo: the decisions stored since
    ``since`` (oldest first; each with both models' metric on the same rows, the
    difference and its bounds), the candidate's policy, and the phase now. ``served``
    and ``candidate``: the champion and the candidate when the later period was scored."""
    from driftloop.naming import artifact_key
    from driftloop.tasks.rollout import model_state, version_spec

    policy = None
    if candidate is not None:
        shadow = version_spec(registry.get_version(model, candidate)).rollout
        policy = shadow.shadow.model_dump() if shadow is not None and shadow.shadow is not None else None
    decisions = [d for d in registry.list_rollout_decisions(model, limit=20) if d.created_at and d.created_at >= since]
    state = model_state(registry, model)
    key = artifact_key("rollout", model)
    return {
        "model": model, "served": served, "candidate": candidate, "from": FIRST_LABELS_UNTIL, "later_rows": later_rows, "policy": policy,
        "decisions": [d.model_dump(mode="json") for d in reversed(decisions)],
        "phase": state.phase, "champion": state.champion, "shadow": state.shadow,
        "status_command": f"driftloop rollout status --model {model}",
        "artifact": key, "artifact_url": f"{ui}/artifacts/key/{key}" if ui else None,
    }


def latest_monitoring(registry: Any, model: str) -> dict[str, Any] | None:
    """What the model's latest monitoring run found, read back from the registry, in the
    shape of the monitor flow's result."""
    from driftloop.tasks.monitor_report import Chunk, MonitorReport
    from driftloop.tasks.monitor_summary import chunk_summaries

    runs = registry.list_monitoring_runs(model)
    if not runs:
        return None
    run = runs[0]
    results = registry.monitoring_results(run["id"])
    chunks = {r["chunk_index"]: Chunk(r["chunk_index"], r["chunk_key"], r["chunk_start"], r["chunk_end"]) for r in results}
    report = MonitorReport(sorted(chunks.values(), key=lambda c: c.index), results, None, False)
    return {
        "run_id": run["id"], "model": run["model_name"], "version": run["model_version"],
        "chunks": chunk_summaries(report), "policy": {"fired": run["decision"]["fired"], "reasons": run["decision"]["reasons"]},
        "event": run["event"], "report_uri": run["report_uri"],
    }


def _cuda_available() -> bool:
    try:
        from driftloop.tasks.fit import check_device

        check_device("cuda")
        return True
    except DriftloopError:
        return False


def _run_and_wait(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    from prefect.deployments import run_deployment

    run = run_deployment(name, parameters=parameters, timeout=3600)
    if run.state is None or not run.state.is_completed():
        raise DriftloopError(f"deployment {name} ended {run.state.name if run.state else 'without a state'}; see the Prefect UI")
    return {"flow_run": run.name, "state": run.state.name}


def _wait_for_retrain(since: Any, timeout_s: float, finish_timeout_s: float = RETRAIN_FINISH_TIMEOUT_S) -> dict[str, Any]:
    """The retrain run the automation started after ``since``, once it has ended, with
    the verdict its artifact records (promoted, rejected, or skipped by the cooldown).

    Bounded twice: no run of ``retrain/every-model`` within ``timeout_s`` is "not
    triggered"; a run that has not ended ``finish_timeout_s`` after it was first seen
    (stuck Pending with no worker, Running forever) is returned in the state it was
    last seen in, saying what was waited for and how long."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        DeploymentFilter,
        DeploymentFilterName,
        FlowFilter,
        FlowFilterName,
    )

    started = time.monotonic()
    seen_at: float | None = None
    with get_client(sync_client=True) as client:
        while True:
            runs = [
                run for run in client.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain"])),
                    deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["every-model"])),
                )
                if run.created is not None and run.created >= since
            ]
            now = time.monotonic()
            if runs:
                run = min(runs, key=lambda r: r.created)
                if run.state is not None and run.state.is_final():
                    artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
                    verdicts = [a.description for a in artifacts if a.key and a.key.startswith("retrain-")]
                    return {"flow_run": run.name, "state": run.state.name, "parameters": run.parameters,
                            "verdict": verdicts[0] if verdicts else None}
                seen_at = now if seen_at is None else seen_at
                if now - seen_at > finish_timeout_s:
                    state = run.state.name if run.state is not None else "without a state"
                    return {"flow_run": run.name, "parameters": run.parameters, "verdict": None,
                            "state": f"{state}, not ended after {finish_timeout_s:g} s (waited for retrain/every-model "
                                     f"flow run {run.name} to reach a final state; see it in the UI)"}
            elif now - started > timeout_s:
                return {"flow_run": None, "verdict": None,
                        "state": f"not triggered: no retrain/every-model flow run within {timeout_s:g} s of the "
                                 "monitor (its policy did not fire, or the automation started no run)"}
            time.sleep(2)
