"""Watching a model: ``monitor``."""

from __future__ import annotations

import argparse
from typing import Any

from driftloop.cli.common import (
    FlowBinding,
    UsageError,
    add_command,
    check_input,
    iso_time,
    model_ref,
)

MONITOR = FlowBinding("driftloop.flows.monitor:monitor", {
    "model": "model", "scoring_run": "scoring_run", "start": "start", "end": "end", "input": "input_uri",
    "labels": "labels_uri",
})


def check_monitor(args: argparse.Namespace) -> None:
    if args.start and args.end and args.start >= args.end:
        raise UsageError(f"--start {args.start.isoformat()} is not before --end {args.end.isoformat()}")
    if args.input and (args.scoring_run or args.start or args.end):
        raise UsageError("--input monitors the rows of a file: drop --scoring-run, --start and --end")
    if args.scoring_run and (args.start or args.end):
        raise UsageError("--scoring-run monitors one run; --start/--end every row served in a time range: give one")
    check_input(args.input, "--input")
    check_input(args.labels, "--labels")


def cmd_monitor(args: argparse.Namespace) -> dict[str, Any]:
    return MONITOR.call(args).model_dump()


def human_monitor(p: dict[str, Any]) -> str:
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


def register(sub: argparse._SubParsersAction) -> None:
    mon = add_command(sub, "monitor", help="drift and performance of a model on scored data", handler=cmd_monitor,
                      human=human_monitor, check=check_monitor, binding=MONITOR, needs_prefect=True)
    mon.add_argument("--model", required=True, type=model_ref, help="NAME or NAME@alias (bare NAME: champion)")
    mon.add_argument("--scoring-run", metavar="ID",
                     help="monitor this scoring run's rows (default: the version's latest run)")
    mon.add_argument("--start", type=iso_time, metavar="TIME",
                     help="monitor every row the version served with a timestamp from TIME (ISO 8601) ...")
    mon.add_argument("--end", type=iso_time, metavar="TIME", help="... until TIME (exclusive)")
    mon.add_argument("--input", help="a Parquet or CSV file of scored rows (e.g. a --output export) instead of the table")
    mon.add_argument("--labels", help="labels file (id, target), parsed and validated by the spec; default: the labels "
                     "registered with `driftloop labels`")
