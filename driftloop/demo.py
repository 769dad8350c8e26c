"""``make demo``: the lifecycle on NannyML's synthetic car-loan data, which ships inside
the nannyml package (nothing is downloaded)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from driftloop.errors import DriftloopError

DEMO_SPEC = Path(__file__).resolve().parent.parent / "deployments" / "specs" / "car_loan.yaml"
_FILES = {
    "reference": "synthetic_car_loan_reference.csv",
    "analysis": "synthetic_car_loan_analysis.csv",
    "analysis_targets": "synthetic_car_loan_analysis_target.csv",
}


def demo_data_path(part: str) -> Path:
    """Path of a car-loan CSV inside the installed nannyml package (found without
    importing nannyml, which is slow to import)."""
    found = importlib.util.find_spec("nannyml")
    if found is None or not found.submodule_search_locations:
        raise DriftloopError(
            "the demo data ships with nannyml, which is not installed; "
            "install driftloop with the monitor extra: pip install 'driftloop[monitor]'"
        )
    path = Path(next(iter(found.submodule_search_locations))) / "datasets" / "data" / _FILES[part]
    if not path.exists():
        raise DriftloopError(f"demo file {path} is missing from the nannyml package; reinstall nannyml")
    return path


def resolve_demo_uri(uri: str) -> str:
    """``demo:reference``, ``demo:analysis`` and ``demo:analysis_targets`` name the
    car-loan files inside the installed nannyml package (so deployments carry no
    machine paths); any other URI is returned as it is."""
    if uri.startswith("demo:"):
        part = uri.removeprefix("demo:")
        if part not in _FILES:
            raise DriftloopError(f"unknown demo data {uri!r}; use one of " + ", ".join(f"demo:{p}" for p in _FILES))
        return str(demo_data_path(part))
    return uri


def run_demo(trials: int = 10) -> dict[str, Any]:
    from driftloop.settings import get_settings
    from flows.ingest import ingest
    from flows.monitor import monitor
    from flows.score import score
    from flows.train import train

    spec = str(DEMO_SPEC)
    reference = ingest(spec_path=spec, source=str(demo_data_path("reference")))
    analysis = ingest(spec_path=spec, source=str(demo_data_path("analysis")), labelled=False)
    model = train(spec_path=spec, dataset_id=reference.dataset_id, trials=trials)
    scored_dir = get_settings().home_dir / "demo" / "scored-analysis"
    scored = score(input_uri=str(demo_data_path("analysis")), output_uri=str(scored_dir), model="car_loan@champion")
    watched = monitor(input_uri=scored.output_uri, model="car_loan@champion",
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


def run_loop_demo(trials: int = 5, keep_running: bool = False) -> dict[str, Any]:
    """The loop on a real Prefect server: deploy, start workers, run train -> score ->
    monitor through the deployments, and let the drift event start the retrain."""
    import os

    from driftloop.local_stack import LocalStack
    from driftloop.settings import get_settings

    settings = get_settings()
    with LocalStack(settings.home_dir, keep_running=keep_running) as stack:
        os.environ["PREFECT_API_URL"] = stack.api_url  # before Prefect reads its settings
        from driftloop.registry import open_registry

        has_gpu = _cuda_available()
        stack.deploy(gpu_device="cuda" if has_gpu else "cpu")
        stack.start_workers(("cpu", "gpu"))
        from datetime import UTC, datetime

        started = datetime.now(UTC)
        steps = {}
        for name, params in (("train/car-loan", {"trials": trials}), ("score/car-loan", {}), ("monitor/car-loan", {})):
            steps[name] = _run_and_wait(name, params)
        retrain = _wait_for_retrain(since=started, timeout_s=120)
        registry = open_registry(settings.registry_database_url())
        versions = [
            {"version": v.version, "trigger": v.trigger, "gate_passed": v.gate["passed"], "reasons": v.gate["reasons"]}
            for v in sorted(registry.list_versions("car_loan"), key=lambda v: v.version)
        ]
        ui = stack.api_url.removesuffix("/api")
        return {
            "ui": ui, "kept_running": keep_running, "steps": steps, "monitor": latest_monitoring(registry, "car_loan"),
            "retrain": retrain, "versions": versions, "aliases": registry.aliases("car_loan"),
        }


def latest_monitoring(registry: Any, model: str) -> dict[str, Any] | None:
    """What the model's latest monitoring run found, read back from the registry, in the
    shape of the monitor flow's result."""
    from tasks.monitor import Chunk, MonitorReport, chunk_summaries

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
        from tasks.tune import check_device

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


def _wait_for_retrain(since: Any, timeout_s: float) -> dict[str, Any]:
    """The retrain run the automation started after ``since``, once it has ended, with
    the verdict its artifact records (promoted, rejected, or skipped by the cooldown)."""
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
    with get_client(sync_client=True) as client:
        while True:
            runs = [
                run for run in client.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain"])),
                    deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["car-loan"])),
                )
                if run.created is not None and run.created >= since
            ]
            if runs:
                run = min(runs, key=lambda r: r.created)
                if run.state is not None and run.state.is_final():
                    artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
                    verdicts = [a.description for a in artifacts if a.key and a.key.startswith("retrain-")]
                    return {"flow_run": run.name, "state": run.state.name, "parameters": run.parameters,
                            "verdict": verdicts[0] if verdicts else None}
            elif time.monotonic() - started > timeout_s:
                return {"flow_run": None, "state": "not triggered (the monitor's policy did not fire)", "verdict": None}
            time.sleep(2)
