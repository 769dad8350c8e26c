"""Keeping the stores tidy: ``gc`` and ``db upgrade``."""

from __future__ import annotations

import argparse
from typing import Any

from driftloop.cli.common import add_command, add_group, positive_float, registry


def cmd_gc(args: argparse.Namespace) -> dict[str, Any]:
    from driftloop.gc import collect
    from driftloop.settings import get_settings
    from driftloop.storage import ArtifactStore

    settings = get_settings()
    keep = args.keep_days if args.keep_days is not None else settings.retention_days
    result = collect(registry(), ArtifactStore(settings.artifact_root_uri()), keep_days=keep, apply=args.apply)
    return {**result.model_dump(), "keep_days": keep}


def human_gc(p: dict[str, Any]) -> str:
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


def human_db_upgrade(p: dict[str, Any]) -> str:
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


def register(sub: argparse._SubParsersAction) -> None:
    gc = add_command(
        sub, "gc", handler=cmd_gc, human=human_gc,
        help="expire old table snapshots, remove orphan table files, old monitoring runs, Optuna studies and crash "
             "leftovers (dry run by default)",
        description="Versions, their artifacts, cards and references, datasets, quarantines and every table snapshot a "
                    "scoring run, monitoring run or training window names are never removed.",
    )
    gc.add_argument("--keep-days", type=positive_float, metavar="DAYS",
                    help="retention in days, more than 0 (default: DRIFTLOOP_RETENTION_DAYS, 90)")
    gc.add_argument("--apply", action="store_true", help="remove (without it: only list what would go)")

    db = add_group(sub, "db", help="registry database")
    add_command(db, "upgrade", handler=cmd_db_upgrade, human=human_db_upgrade,
                help="upgrade the registry schema to this release and import the scoring outputs and labels "
                     "recorded before the tables into them (once)")
