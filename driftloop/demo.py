"""``make demo``: the lifecycle on NannyML's synthetic car-loan data, which ships inside
the nannyml package (nothing is downloaded)."""

from __future__ import annotations

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
# labels of its rows up to this date arrive first (and drive monitoring and the retrain);
# the rest are the "later labelled data" on which old and new champion are compared.
FIRST_LABELS_UNTIL = "2019-07-01"


# How long the demo waits for the monitor's event to start a retrain, and then for that
# retrain to end (it trains on CPU in the demo: minutes).
RETRAIN_TRIGGER_TIMEOUT_S = 120
RETRAIN_FINISH_TIMEOUT_S = 3600


def run_loop_demo(trials: int = 5, keep_running: bool = False, yes_this_server: bool = False) -> dict[str, Any]:
    """The loop on a real Prefect server: deploy, start workers, run train -> score ->
    labels -> monitor through the deployments, let the monitor's event start the retrain,
    then compare the old and the new champion on labelled data neither has seen.

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
        from datetime import UTC, datetime

        first_labels = _write_first_labels(settings.home_dir / "demo")
        started = datetime.now(UTC)
        steps = {}
        for name, params in (("train/car-loan", {"trials": trials}), ("score/car-loan", {}),
                             ("labels/car-loan", {"source": str(first_labels)}), ("monitor/car-loan", {})):
            steps[name] = _run_and_wait(name, params)
        retrain = _wait_for_retrain(since=started, timeout_s=RETRAIN_TRIGGER_TIMEOUT_S,
                                    finish_timeout_s=RETRAIN_FINISH_TIMEOUT_S)
        registry = open_registry(settings.registry_database_url())
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
            "later_period": compare_on_later_labels(registry),
        }


def _analysis_with_labels() -> Any:
    """The analysis rows as read (text) with their target; ISO timestamps compare as text."""

    from driftloop.tasks.ingest import read_file

    analysis = read_file(str(demo_data_path("analysis"))).frame
    targets = read_file(str(demo_data_path("analysis_targets"))).frame
    return analysis.join(targets.select("id", "repaid"), on="id", how="inner")


def _write_first_labels(directory: Any) -> Any:
    """The labels that have arrived: ids of the analysis rows scored before
    FIRST_LABELS_UNTIL, with their targets."""
    import polars as pl

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"labels-until-{FIRST_LABELS_UNTIL}.csv"
    first = _analysis_with_labels().filter(pl.col("timestamp") < FIRST_LABELS_UNTIL)
    first.select("id", "repaid").write_csv(path)
    return path


def compare_on_later_labels(registry: Any) -> dict[str, Any] | None:
    """The realized ROC AUC of the first champion and of the current one on the analysis
    rows whose labels arrive later (from FIRST_LABELS_UNTIL): data neither model has
    seen. An honest number, whatever it is."""
    import polars as pl
    from sklearn.metrics import roc_auc_score

    from driftloop.onnx_model import load_model, predict_scores
    from driftloop.spec import load_spec
    from driftloop.tasks.score import fetch_verified
    from driftloop.tasks.validate import validate_rows

    champion = registry.find_alias("car_loan", "champion")
    if champion is None:
        return None
    spec = load_spec(DEMO_SPEC)
    later = _analysis_with_labels().filter(pl.col("timestamp") >= FIRST_LABELS_UNTIL)
    rows = validate_rows(later, spec, source="later labels", warn_ignored=False).valid
    out: dict[str, Any] = {"from": FIRST_LABELS_UNTIL, "rows": rows.height, "metric": "roc_auc", "models": []}
    for version in sorted({1, champion.version}):
        record = registry.get_version("car_loan", version)
        scores = predict_scores(load_model(fetch_verified(record.onnx_uri, record.onnx_sha256)), rows)
        out["models"].append({"version": version, "trigger": record.trigger, "champion": version == champion.version,
                              "roc_auc": float(roc_auc_score(rows["repaid"].to_numpy(), scores))})
    return out


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
