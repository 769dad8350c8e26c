"""The ``driftloop`` command line.

Every command takes ``--json`` and then prints exactly one JSON object on stdout. On
failure the exit code is non-zero and stderr carries one line saying what to do.
Flows run through Prefect: against ``PREFECT_API_URL`` when set (runs show in the UI),
else against a temporary local server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from driftloop.errors import DriftloopError
from driftloop.spec import format_validation_error

EXIT_FAILURE = 1
EXIT_USAGE = 2
CLI_SQL_URL_ENV = "DRIFTLOOP_CLI_SQL_URL"  # where --sql-url is handed to the ingest flow
# Options that take a path or URI: one with credentials in it is refused before anything runs.
URI_OPTIONS = {"source": "SOURCE", "input": "--input", "output": "--output", "labels": "--labels",
               "dask_address": "--dask-address"}


def _refuse_credentials(args: argparse.Namespace) -> None:
    from driftloop.redact import refuse_credentials

    for attr, option in URI_OPTIONS.items():
        value = getattr(args, attr, None)
        if isinstance(value, str):
            refuse_credentials(value, option)


def _emit(payload: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], str]) -> None:
    if as_json:
        from driftloop.metrics import json_safe

        # An undefined metric (NaN) prints as null: a bare NaN is not JSON.
        sys.stdout.write(json.dumps(json_safe(payload), default=str, allow_nan=False) + "\n")
    else:
        sys.stdout.write(human(payload) + "\n")


def _configure_environment(*, verbose: bool) -> None:
    """Set before Prefect or NannyML is imported: both read these once."""
    os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
    # A fresh temporary Prefect server migrates its database first; on a small machine
    # that takes longer than Prefect's default 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "driftloop,tasks,flows")
    if "PREFECT_API_URL" not in os.environ:
        # The temporary server is ours alone: no telemetry from it.
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS", "driftloop.logs.CliConsoleHandler")
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")


# --- commands ---------------------------------------------------------------------


def cmd_ingest(args: argparse.Namespace) -> dict[str, Any]:
    from driftloop.flows.ingest import ingest
    from driftloop.tasks.ingest import SqlSource

    sql = None
    if args.sql_url or args.sql_url_env or args.sql_secret:
        if sum(1 for given in (args.sql_url, args.sql_url_env, args.sql_secret) if given) > 1:
            raise DriftloopError("give one of --sql-url, --sql-url-env or --sql-secret")
        url_env = args.sql_url_env
        if args.sql_url:
            # Handed to the flow the way --sql-url-env is: the URL (and its password) never
            # becomes a flow-run parameter, which Prefect stores as given.
            os.environ[CLI_SQL_URL_ENV] = args.sql_url
            url_env = CLI_SQL_URL_ENV
        sql = SqlSource(
            url_env=url_env,
            secret_block=args.sql_secret,
            table=args.table,
            query=args.query,
            params=dict(_parse_param(p) for p in args.param),
        )
    elif args.source is None:
        raise DriftloopError("give a SOURCE path or URI, or --sql-url/--sql-url-env/--sql-secret with --table or --query")
    elif args.table or args.query:
        raise DriftloopError("--table and --query need --sql-url, --sql-url-env or --sql-secret")
    result = ingest(spec_path=args.spec, source=args.source, sql=sql, labelled=not args.unlabelled)
    return result.model_dump()


def _human_ingest(p: dict[str, Any]) -> str:
    lines = [
        f"dataset {p['dataset_id']} ({p['name']}){'' if p['created'] else ' - already registered'}",
        f"  rows in          {p['rows_in']:>10,}",
        f"  rows valid       {p['rows_valid']:>10,}",
        f"  rows quarantined {p['rows_quarantined']:>10,}",
        f"  snapshot         {p['snapshot_uri']}",
    ]
    if p["quarantine_uri"]:
        lines.append(f"  quarantine       {p['quarantine_uri']}")
    if p["ignored_columns"]:
        lines.append(f"  ignored columns  {', '.join(p['ignored_columns'])}")
    return "\n".join(lines)


def _parse_param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise DriftloopError(f"--param {text!r}: expected NAME=VALUE")
    return key, value


def cmd_datasets_list(args: argparse.Namespace) -> dict[str, Any]:
    from driftloop.registry import open_registry
    from driftloop.settings import get_settings

    registry = open_registry(get_settings().registry_database_url())
    records = registry.list_datasets(name=args.name)
    return {"datasets": [r.model_dump(mode="json", exclude={"column_types"}) for r in records]}


def _human_datasets(p: dict[str, Any]) -> str:
    if not p["datasets"]:
        return "no datasets registered yet; run: driftloop ingest --spec SPEC SOURCE"
    header = f"{'id':<20} {'name':<16} {'rows':>9} {'valid':>9} {'quarantined':>11}  created_at            source"
    rows = [
        f"{d['id']:<20} {d['name']:<16} {d['rows_in']:>9} {d['rows_valid']:>9} "
        f"{d['rows_quarantined']:>11}  {d['created_at'][:19]}  {d['source']}"
        for d in p["datasets"]
    ]
    return "\n".join([header, *rows])


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from driftloop.flows.train import train

    if (args.dataset is None) == (args.source is None):
        raise DriftloopError("give a SOURCE path or URI, or --dataset ID (see: driftloop datasets list)")
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = [a for a in algorithms if a not in ("xgboost", "lightgbm")]
    if unknown:
        raise DriftloopError(f"--algorithms: unknown {', '.join(unknown)}; choose from xgboost, lightgbm")
    result = train(
        spec_path=args.spec, dataset_id=args.dataset, source=args.source, trials=args.trials,
        algorithms=algorithms, seed=args.seed, timeout_s=args.timeout, study_name=args.study,
        promote=not args.no_promote, tuning_workers=args.tuning_workers, dask_address=args.dask_address,
    )
    return result.model_dump()


def _metrics_line(metrics: dict[str, Any]) -> str:
    from driftloop.metrics import format_metric

    return ", ".join(format_metric(k, v) for k, v in metrics.items())


def _human_train(p: dict[str, Any]) -> str:
    lines = [
        p["headline"],
        "  metrics  " + _metrics_line(p["metrics"]),
        f"  gate     {'passed' if p['gate']['passed'] else 'FAILED'}: " + "; ".join(p["gate"]["reasons"]),
        f"  parity   max |diff| {p['parity']['max_abs_diff']:.2g}, {p['parity']['label_flips']} label flips, {p['parity']['rows']:,} rows",
        f"  onnx     {p['onnx_uri']} (sha256 {p['onnx_sha256'][:12]}...)",
    ]
    if p.get("card_uri"):
        lines.append(f"  card     {p['card_uri']}")
    return "\n".join(lines)


def _registry() -> Any:
    from driftloop.registry import open_registry
    from driftloop.settings import get_settings

    return open_registry(get_settings().registry_database_url())


def cmd_models_list(args: argparse.Namespace) -> dict[str, Any]:
    from driftloop.metrics import undefined_metrics

    registry = _registry()
    models = []
    for name in registry.list_models():
        aliases = registry.aliases(name)
        versions = registry.list_versions(name)
        models.append({
            "name": name, "aliases": aliases,
            "versions": [
                {"version": v.version, "algorithm": v.algorithm, "metrics": v.metrics,
                 "undefined_metrics": undefined_metrics(v.metrics),
                 "gate_passed": v.gate.get("passed"), "created_at": v.created_at.isoformat(),
                 "aliases": sorted(a for a, n in aliases.items() if n == v.version)}
                for v in versions
            ],
        })
    return {"models": models}


def _human_models(p: dict[str, Any]) -> str:
    if not p["models"]:
        return "no models registered yet; run: driftloop train --spec SPEC SOURCE"
    lines = []
    for m in p["models"]:
        lines.append(f"{m['name']}")
        for v in m["versions"]:
            tags = f" [{', '.join(v['aliases'])}]" if v["aliases"] else ""
            headline = _metrics_line(dict(list(v["metrics"].items())[:3]))
            gate = "gate passed" if v["gate_passed"] else "gate failed"
            lines.append(f"  v{v['version']:<4} {v['algorithm']:<9} {headline}  {gate}  {v['created_at'][:19]}{tags}")
    return "\n".join(lines)


def cmd_models_show(args: argparse.Namespace) -> dict[str, Any]:
    from driftloop.metrics import undefined_metrics

    registry = _registry()
    record = registry.resolve(args.ref)
    return {
        **record.model_dump(mode="json"),
        "undefined_metrics": undefined_metrics(record.metrics),
        "aliases": registry.aliases(record.model_name),
        "alias_history": [e.model_dump(mode="json") for e in registry.alias_history(record.model_name)],
    }


def _human_show(p: dict[str, Any]) -> str:
    lines = [
        f"{p['model_name']} v{p['version']} ({p['algorithm']}, {p['task']}) created {p['created_at'][:19]}",
        "  metrics  " + _metrics_line(p["metrics"]),
        f"  gate     {'passed' if p['gate']['passed'] else 'failed'}: " + "; ".join(p["gate"]["reasons"]),
        f"  parity   max |diff| {p['parity']['max_abs_diff']:.2g}, {p['parity']['label_flips']} flips, {p['parity']['rows']:,} rows",
        f"  dataset  {p['dataset_id']}",
        *([(f"  window   {w['policy']}: {w['rows']:,} rows, {w['start'] or '-'} .. {w['end'] or '-'}, "
           f"{len(w['dataset_ids'])} dataset(s), {len(w['scoring_runs'])} scoring run(s)")] if (w := p.get("window")) else []),
        f"  onnx     {p['onnx_uri']}",
        f"  sha256   {p['onnx_sha256']}",
        f"  card     {p['card_uri']}",
        "  aliases  " + (", ".join(f"{a} -> v{v}" for a, v in p["aliases"].items()) or "(none)"),
        "  history:",
    ]
    for e in p["alias_history"]:
        lines.append(f"    {e['created_at'][:19]} {e['alias']}: v{e['from_version']} -> v{e['to_version']} by {e['actor']}: {e['reason']}")
    return "\n".join(lines)


def _actor(args: argparse.Namespace) -> str:
    return args.actor or f"cli:{os.environ.get('USER', 'unknown')}"


def _expected_champion(registry: Any, args: argparse.Namespace) -> int | None:
    """The champion the user decided against: ``--expect-champion`` (what they reviewed),
    else the one seen now. Promote and rollback are compare-and-swaps on it, as a retrain's
    promotion is: if another promotion or rollback lands first, nothing moves."""
    if args.expect_champion is not None:
        return args.expect_champion
    return registry.aliases(args.name).get("champion")


def cmd_models_promote(args: argparse.Namespace) -> dict[str, Any]:
    registry = _registry()
    before = _expected_champion(registry, args)
    registry.promote(args.name, args.version, actor=_actor(args), reason=args.reason, expected_champion=before)
    return {"model": args.name, "champion": args.version, "previous": before, "aliases": registry.aliases(args.name)}


def cmd_models_rollback(args: argparse.Namespace) -> dict[str, Any]:
    registry = _registry()
    before = _expected_champion(registry, args)
    version = registry.rollback(args.name, actor=_actor(args), reason=args.reason, expected_champion=before)
    return {"model": args.name, "champion": version, "previous": before, "aliases": registry.aliases(args.name)}


def _progress_bar(enabled: bool) -> None:
    """A progress bar on stderr for long steps, when stderr is a terminal."""
    if not enabled or not sys.stderr.isatty():
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from driftloop import progress

    bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), transient=True, console=None)
    tasks: dict[str, Any] = {}

    def listener(step: str, done: int, total: int | None) -> None:
        if step not in tasks:
            bar.start()
            tasks[step] = bar.add_task(f"{step} rows", total=total)
        bar.update(tasks[step], completed=done, total=total)
        if total is not None and done >= total:
            bar.stop()

    progress.add_listener(listener)


def cmd_score(args: argparse.Namespace) -> dict[str, Any]:
    from driftloop.flows.score import score

    _progress_bar(not args.json)
    result = score(input_uri=args.input, output_uri=args.output, model=args.model,
                   batch_size=args.batch_size, threads=args.threads, engine=args.engine, device=args.device,
                   workers=args.workers, dask_address=args.dask_address)
    return result.model_dump()


def _human_score(p: dict[str, Any]) -> str:
    lines = [
        f"scored with {p['model']}:{p['version']}, {p['form_reason']}",
        f"  rows in          {p['rows_in']:>10,}",
        f"  rows scored      {p['rows_scored']:>10,}",
        f"  rows quarantined {p['rows_quarantined']:>10,}",
        f"  table            {p['table']} snapshot {p['snapshot_id']} (scoring run {p['run_id']})",
        f"  input key        {p['input_key']}",
    ]
    if p["output_uri"]:
        lines.append(f"  export           {p['output_uri']}")
    if p["quarantine_uri"]:
        lines.append(f"  quarantine       {p['quarantine_uri']}")
    return "\n".join(lines)


def cmd_retrain(args: argparse.Namespace) -> dict[str, Any]:
    from driftloop.flows.retrain import retrain

    result = retrain(model=args.model, trials=args.trials, cooldown_s=args.cooldown)
    payload = result.model_dump(mode="json", exclude={"score"})
    payload["scored"] = result.score.model_dump(mode="json") if result.score else None
    return payload


def _human_retrain(p: dict[str, Any]) -> str:
    lines = [f"{p['model']}: {'skipped: ' if p['skipped'] else ''}{p['reason']}"]
    if p["window"]:
        w = p["window"]
        lines.append(f"  window      {w['policy']}: {w['rows']:,} rows, {w['start'] or '-'} .. {w['end'] or '-'} "
                     f"({w['new_labels']:,} newer than the champion's data)")
    for role in ("champion", "challenger"):
        side = p.get(role)
        if side:
            shown = _metrics_line(side.get("metrics") or {}) or "-"
            lines.append(f"  {role:<11} v{side['version']}: {shown}")
    if p["labels_unscored"]:
        lines.append(f"  labels      {p['labels_unscored']:,} of {p['labels']:,} match no scored id (not used)")
    lines.append(f"  promoted    {'yes' if p['promoted'] else 'no'}")
    return "\n".join(lines)


def cmd_labels(args: argparse.Namespace) -> dict[str, Any]:
    from driftloop.flows.labels import ingest_labels

    return ingest_labels(spec_path=args.spec, source=args.source).model_dump()


def cmd_monitor(args: argparse.Namespace) -> dict[str, Any]:
    from driftloop.flows.monitor import monitor

    return monitor(model=args.model, scoring_run=args.scoring_run, start=args.start, end=args.end,
                   input_uri=args.input, labels_uri=args.labels).model_dump()


def _human_monitor(p: dict[str, Any]) -> str:
    def fmt(value: float | None) -> str:
        return f"{value:.4f}" if value is not None else "-"

    lines = [f"monitoring {p['model']}:{p['version']}", f"  {'chunk start':<26} {'chunk end':<26} {'estimated':>9} {'realized':>9}  drifting features"]
    for c in p["chunks"]:
        lines.append(f"  {str(c['start'])[:26]:<26} {str(c['end'])[:26]:<26} {fmt(c['estimated']):>9} {fmt(c['realized']):>9}  {', '.join(c['drifting_features']) or '-'}")
    if labels := p.get("labels"):
        lines.append(f"labels: {labels['source']}: {labels['rows_valid']:,} of {labels['rows_in']:,} valid "
                     f"({labels['rows_quarantined']:,} failed validation), {labels['matched']:,} scored rows labelled")
    verdict = "FIRED" if p["policy"]["fired"] else "no retraining"
    lines.append(f"policy: {verdict}: " + "; ".join(p["policy"]["reasons"]))
    event = p.get("event")
    lines.append(f"event: {event['event']} for {event['resource']['prefect.resource.id']}" if event else "event: none")
    lines.append(f"report: {p['report_uri']}")
    return "\n".join(lines)


def cmd_infra_apply(args: argparse.Namespace) -> dict[str, Any]:
    from driftloop.work_pools import apply_pools, plan_pools

    if args.dry_run:
        pools = plan_pools(gpu_device=args.gpu_device, gpus=args.gpus)
        return {"dry_run": True, "pools": [{k: v for k, v in p.items() if k != "template"} for p in pools]}
    return {"dry_run": False, "pools": apply_pools(gpu_device=args.gpu_device, gpus=args.gpus)}


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from driftloop.demo import run_demo, run_loop_demo

    if args.stop:
        from driftloop.local_stack import stop_recorded
        from driftloop.settings import get_settings

        return {"stopped": stop_recorded(get_settings().home_dir)}
    if args.loop:
        return run_loop_demo(trials=args.trials, keep_running=args.keep_running, yes_this_server=args.yes_this_server)
    return run_demo(trials=args.trials)


def _human_demo(p: dict[str, Any]) -> str:
    if "stopped" in p:
        return "\n".join(f"{e['role']} (pid {e['pid']}): {e['why']}" for e in p["stopped"]) or "nothing was running"
    if "retrain" in p:
        lines = [f"Prefect UI: {p['ui']}" + ("" if p["kept_running"] else " (stopped; rerun with --keep-running to browse it)")]
        lines += [f"  {name:<18} {step['state']:<10} flow run {step['flow_run']}" for name, step in p["steps"].items()]
        if p.get("monitor"):
            lines += ["", _human_monitor(p["monitor"]), ""]
        r = p["retrain"]
        lines.append(f"  automation: monitoring event -> retrain/every-model: {r['state']}" + (f" (flow run {r['flow_run']})" if r.get("flow_run") else "")
                     + (f": {r['verdict']}" if r.get("verdict") else ""))
        for v in p["versions"]:
            lines.append(f"  car_loan v{v['version']} ({v['trigger']}): gate {'passed' if v['gate_passed'] else 'failed'}: " + "; ".join(v["reasons"]))
            if v.get("window"):
                w = v["window"]
                lines.append(f"    trained on window {w['policy']}: {w['rows']:,} labelled rows, {w['start'][:10]} .. {w['end'][:10]} "
                             f"({w['new_labels']:,} newer than the previous champion's data, from {len(w['scoring_runs'])} scoring run(s))")
        lines.append("  aliases: " + ", ".join(f"{a} -> v{n}" for a, n in p["aliases"].items()))
        for name, snaps in (p.get("tables") or {}).items():
            lines.append(f"  table {name}, newest snapshots first (the loop's memory; read any of them again with "
                         "pl.scan_iceberg(table, snapshot_id=...)):")
            lines += [f"    {s['snapshot_id']}  {s['committed_at']}  {s['operation']:<9} +{s['added_rows']:,} "
                      f"-{s['deleted_rows']:,} rows = {s['total_rows']:,}" + (f"  ({s['by']})" if s["by"] else "")
                      for s in snaps]
        later = p.get("later_period")
        if later:
            lines.append(f"  later labelled data (analysis rows from {later['from']}, {later['rows']:,} rows, unseen by every model):")
            for m in later["models"]:
                role = "champion" if m["champion"] else "first champion"
                lines.append(f"    v{m['version']} ({role}, {m['trigger']}): realized {later['metric']} {m['roc_auc']:.4f}")
        return "\n".join(lines)
    parts = [f"ingest {stage}:\n" + _human_ingest(result) for stage, result in p["ingest"].items()]
    parts.append("train:\n" + _human_train(p["train"]))
    parts.append("score analysis data:\n" + _human_score(p["score"]))
    parts.append(_human_monitor(p["monitor"]))
    return "\n\n".join(parts)


def cmd_gc(args: argparse.Namespace) -> dict[str, Any]:
    from driftloop.gc import collect
    from driftloop.settings import get_settings
    from driftloop.storage import ArtifactStore

    settings = get_settings()
    keep = args.keep_days if args.keep_days is not None else settings.retention_days
    result = collect(_registry(), ArtifactStore(settings.artifact_root_uri()), keep_days=keep, apply=args.apply)
    return {**result.model_dump(), "keep_days": keep}


def _human_gc(p: dict[str, Any]) -> str:
    verb = "removed" if p["applied"] else "would remove (dry run; --apply to remove)"
    lines = [f"retention {p['keep_days']:g} days: {verb}:",
             f"  monitoring runs  {len(p['monitoring_runs'])}", f"  Optuna studies   {len(p['studies'])}",
             f"  files            {len(p['files'])}"]
    lines += [f"    {f}" for f in p["files"][:20]] + (["    ..."] if len(p["files"]) > 20 else [])
    expire = "expired" if p["applied"] else "would expire"
    for t in p.get("tables", []):
        if t["error"]:
            lines.append(f"  table {t['table']}: skipped ({t['error']})")
            continue
        kept = f", {len(t['kept_named'])} older kept (named by a run or window)" if t["kept_named"] else ""
        lines.append(f"  table {t['table']}: {expire} {len(t['snapshots'])} snapshot(s){kept}; "
                     f"orphan files {len(t['files'])} ({t['bytes']:,} bytes)")
        lines += [f"    {f}" for f in t["files"][:10]] + (["    ..."] if len(t["files"]) > 10 else [])
    return "\n".join(lines)


def cmd_db_upgrade(args: argparse.Namespace) -> dict[str, Any]:
    from driftloop.legacy_outputs import import_legacy_outputs
    from driftloop.registry.migrate import current_revision, head_revision
    from driftloop.registry.store import open_registry
    from driftloop.registry.urls import masked_url
    from driftloop.settings import get_settings
    from driftloop.tables import open_tables

    settings = get_settings()
    url = settings.registry_database_url()
    store = open_registry(url)  # upgrades to head
    # Scoring outputs and label datasets recorded before the tables go into them, once.
    root = settings.artifact_root_uri()
    imported = import_legacy_outputs(store, open_tables(store.engine, root), root)
    return {"registry": masked_url(url), "revision": current_revision(store.engine), "head": head_revision(),
            "imported": imported.model_dump()}


def _human_db_upgrade(p: dict[str, Any]) -> str:
    from driftloop.legacy_outputs import ImportReport

    report = ImportReport.model_validate(p["imported"])
    lines = [f"{p['registry']} at revision {p['revision']}"]
    if report.imported or report.problems:
        lines.append(report.summary(problems=False))
    for run in report.scoring_runs:
        lines.append(f"  {run.output_uri}: {run.rows:,} rows as run {run.run_id} -> {run.table} snapshot "
                     f"{run.snapshot_id}" + (f" ({len(run.superseded)} older run(s) marked)" if run.superseded else ""))
    lines += [f"  labels {x.dataset_id}: {x.rows:,} rows" for x in report.labels]
    lines += [f"  left: {problem}" for problem in report.problems]
    return "\n".join(lines)


# --- parser -----------------------------------------------------------------------


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("driftloop")  # the installed distribution's, wheel or editable
    except PackageNotFoundError:
        from driftloop import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object")
    common.add_argument("--verbose", "-v", action="store_true", help="show Prefect's logs")

    parser = argparse.ArgumentParser(prog="driftloop", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"driftloop {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    ingest = sub.add_parser("ingest", parents=[common], help="ingest and validate a dataset")
    ingest.add_argument("--spec", required=True, help="dataset spec YAML")
    ingest.add_argument("source", nargs="?", help="CSV or Parquet path or fsspec URI (one with credentials in it is "
                        "refused: give them through the environment or fsspec's configuration)")
    ingest.add_argument("--sql-url", help="SQLAlchemy URL of the source database (handed to the flow through the "
                        "environment, never as a parameter; a command line is visible to other users: prefer "
                        "--sql-url-env or --sql-secret when it holds a password)")
    ingest.add_argument("--sql-url-env", help="environment variable holding the SQL URL")
    ingest.add_argument("--sql-secret", help="Prefect Secret block holding the SQL URL")
    group = ingest.add_mutually_exclusive_group()
    group.add_argument("--table", help="table to read (schema.table allowed)")
    group.add_argument("--query", help="SELECT to run; :name parameters come from --param")
    ingest.add_argument("--param", action="append", default=[], help="query parameter NAME=VALUE")
    ingest.add_argument("--unlabelled", action="store_true", help="rows have no target (data to score)")
    ingest.set_defaults(handler=cmd_ingest, human=_human_ingest)

    datasets = sub.add_parser("datasets", help="registered datasets")
    datasets_sub = datasets.add_subparsers(dest="datasets_command", required=True)
    listing = datasets_sub.add_parser("list", parents=[common], help="list datasets, newest first")
    listing.add_argument("--name", help="only datasets of this spec name")
    listing.set_defaults(handler=cmd_datasets_list, human=_human_datasets)

    train = sub.add_parser("train", parents=[common], help="tune, train, export and register a model")
    train.add_argument("--spec", required=True, help="dataset spec YAML")
    train.add_argument("source", nargs="?", help="CSV or Parquet path or URI (ingested first)")
    train.add_argument("--dataset", help="registered dataset id (driftloop datasets list)")
    train.add_argument("--trials", type=int, default=20, help="Optuna trials per algorithm (default 20)")
    train.add_argument("--algorithms", default="xgboost,lightgbm", help="comma-separated (default xgboost,lightgbm)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--timeout", type=float, help="tuning time limit per algorithm, seconds")
    train.add_argument("--study", help="study name suffix shared by workers tuning together")
    train.add_argument("--no-promote", action="store_true", help="register only; never move champion")
    train.add_argument("--tuning-workers", type=int, default=1, metavar="N",
                       help="tune in N processes sharing one Optuna study; N > 1 needs PostgreSQL (the registry's, "
                            "or DRIFTLOOP_OPTUNA_STORAGE); --trials stays the total (default 1)")
    train.add_argument("--dask-address", metavar="ADDRESS",
                       help="run the tuning workers on this Dask scheduler (tcp://host:8786) instead of local processes")
    train.set_defaults(handler=cmd_train, human=_human_train)

    score = sub.add_parser("score", parents=[common], help="batch-score a file with a registered model")
    score.add_argument("--model", required=True, help="NAME, NAME@alias or NAME:VERSION (bare NAME: champion)")
    score.add_argument("--input", required=True, help="Parquet or CSV path or URI")
    score.add_argument("--output", help="also export this run's rows as a plain Parquet file: a .parquet path or URI, or a "
                       "directory or prefix that gets <run id>.parquet (the rows always go to the table "
                       "predictions.<model>)")
    score.add_argument("--batch-size", type=int, default=100_000)
    score.add_argument("--threads", type=int, help="scoring threads (default: all cores)")
    score.add_argument("--engine", choices=["auto", "onnx", "native", "tensor"], default="auto",
                       help="which verified form of the version scores: auto (default) takes the fastest that runs "
                            "here, as timed at registration; onnx (tree kernel, portable), native (the booster; "
                            "needs its library), tensor (standard tensor ops, any ONNX Runtime provider)")
    score.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                       help="cuda: the tensor form on ONNX Runtime's CUDA provider (needs onnxruntime-gpu)")
    score.add_argument("--workers", type=int, metavar="N",
                       help="score the input as partitions on a temporary local Dask cluster of N processes (one "
                            "thread each): a directory or glob (one partition per file), or one Parquet file "
                            "(row-group ranges); needs driftloop[scale]")
    score.add_argument("--dask-address", metavar="ADDRESS",
                       help="score as partitions on this existing Dask scheduler (tcp://host:8786; default: "
                            "DRIFTLOOP_DASK_ADDRESS, if set); with --workers, N only sets the partition count")
    score.set_defaults(handler=cmd_score, human=_human_score)

    retrain = sub.add_parser(
        "retrain", parents=[common],
        help="retrain a model on its training window (labelled data + scored rows with their labels)",
        description="Decide, then train: wait for the spec's retrain.min_new_labels, train on the window, judge "
                    "the challenger against the champion on the window's newest rows, promote if better.",
    )
    retrain.add_argument("--model", required=True, help="model name")
    retrain.add_argument("--trials", type=int, default=10, help="Optuna trials per algorithm (default 10)")
    retrain.add_argument("--cooldown", type=float, default=0, help="skip if the last retrain started within this many seconds (default 0)")
    retrain.set_defaults(handler=cmd_retrain, human=_human_retrain)

    labels = sub.add_parser("labels", parents=[common], help="ingest ground truth that arrived after scoring")
    labels.add_argument("--spec", required=True, help="dataset spec YAML")
    labels.add_argument("source", help="CSV or Parquet with the id, the target and optionally the timestamp")
    labels.set_defaults(handler=cmd_labels, human=_human_ingest)

    mon = sub.add_parser("monitor", parents=[common], help="drift and performance of a model on scored data")
    mon.add_argument("--model", required=True, help="NAME or NAME@alias (bare NAME: champion)")
    mon.add_argument("--scoring-run", metavar="ID",
                     help="monitor this scoring run's rows (default: the version's latest run)")
    mon.add_argument("--start", type=datetime.fromisoformat, metavar="TIME",
                     help="monitor every row the version served with a timestamp from TIME (ISO 8601) ...")
    mon.add_argument("--end", type=datetime.fromisoformat, metavar="TIME", help="... until TIME (exclusive)")
    mon.add_argument("--input", help="a Parquet or CSV file of scored rows (e.g. a --output export) instead of the table")
    mon.add_argument("--labels", help="labels file (id, target), parsed and validated by the spec; default: the labels registered with `driftloop labels`")
    mon.set_defaults(handler=cmd_monitor, human=_human_monitor)

    models = sub.add_parser("models", help="registered models")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    m_list = models_sub.add_parser("list", parents=[common], help="models, versions and aliases")
    m_list.set_defaults(handler=cmd_models_list, human=_human_models)
    m_show = models_sub.add_parser("show", parents=[common], help="one version: NAME, NAME@alias or NAME:VERSION")
    m_show.add_argument("ref")
    m_show.set_defaults(handler=cmd_models_show, human=_human_show)
    for verb, handler in (("promote", cmd_models_promote), ("rollback", cmd_models_rollback)):
        p = models_sub.add_parser(verb, parents=[common], help=f"{verb} the champion alias")
        p.add_argument("name")
        if verb == "promote":
            p.add_argument("version", type=int)
        p.add_argument("--reason", required=True, help="why (kept in the alias history)")
        p.add_argument("--actor", help="who (default cli:$USER)")
        p.add_argument("--expect-champion", type=int, metavar="VERSION",
                       help="only if the champion is still this version (what you reviewed); default: the champion "
                            "seen when the command starts")
        p.set_defaults(handler=handler, human=lambda q: f"{q['model']}: champion is now v{q['champion']} (was v{q['previous']})")

    infra = sub.add_parser("infra", help="Prefect work pools")
    infra_sub = infra.add_subparsers(dest="infra_command", required=True)
    apply = infra_sub.add_parser("apply", parents=[common], help="create or update the cpu, gpu and edge pools")
    apply.add_argument("--gpu-device", choices=["cuda", "cpu"], help="DRIFTLOOP_DEVICE for the gpu pool (cpu where there is no GPU)")
    apply.add_argument("--gpus", type=int, help="gpu pool concurrency (default: GPUs nvidia-smi sees)")
    apply.add_argument("--dry-run", action="store_true",
                       help="print the pools and settings it would send, without contacting a Prefect server")
    apply.set_defaults(handler=cmd_infra_apply, human=lambda p: "\n".join(f"{x['pool']}: {x['action']} (concurrency {x['concurrency_limit']}, env {x['env']})" for x in p["pools"]))

    demo = sub.add_parser("demo", parents=[common], help="run the lifecycle on the bundled car-loan data")
    demo.add_argument("--trials", type=int, default=10, help="Optuna trials per algorithm (default 10)")
    demo.add_argument("--loop", action="store_true", help="on a real Prefect server with workers, through the deployments and the retrain automation")
    demo.add_argument("--keep-running", action="store_true",
                      help="with --loop: leave the server and workers running (stop them with: driftloop demo --stop)")
    demo.add_argument("--yes-this-server", action="store_true",
                      help="with --loop and PREFECT_API_URL set: change that server (pools, blocks, deployments with "
                           "schedules, workers) even though it already holds pools or deployments of driftloop; "
                           "without it the demo refuses and says what would change")
    demo.add_argument("--stop", action="store_true",
                      help="stop the server and workers a --keep-running demo started (their pids are in "
                           "$DRIFTLOOP_HOME/demo-stack.json), and nothing else")
    demo.set_defaults(handler=cmd_demo, human=_human_demo)

    gc = sub.add_parser(
        "gc", parents=[common],
        help="expire old table snapshots, remove orphan table files, old monitoring runs, Optuna studies and crash "
             "leftovers (dry run by default)",
        description="Versions, their artifacts, cards and references, datasets, quarantines and every table snapshot a "
                    "scoring run, monitoring run or training window names are never removed.",
    )
    gc.add_argument("--keep-days", type=float, help="retention in days (default: DRIFTLOOP_RETENTION_DAYS, 90)")
    gc.add_argument("--apply", action="store_true", help="remove (without it: only list what would go)")
    gc.set_defaults(handler=cmd_gc, human=_human_gc)

    db = sub.add_parser("db", help="registry database")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_sub.add_parser("upgrade", parents=[common], help="upgrade the registry schema to this release and import the scoring outputs and labels "
                                   "recorded before the tables into them (once)")
    upgrade.set_defaults(handler=cmd_db_upgrade, human=_human_db_upgrade)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_environment(verbose=getattr(args, "verbose", False))
    try:
        _refuse_credentials(args)
        payload = args.handler(args)
    except DriftloopError as exc:
        print(f"driftloop: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except ValidationError as exc:
        print(f"driftloop: error: {format_validation_error(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("driftloop: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a user error: one line unless asked for more
        if getattr(args, "verbose", False):
            raise
        print(
            f"driftloop: unexpected error: {type(exc).__name__}: {exc} "
            "(rerun with --verbose for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    _emit(payload, args.json, args.human)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
