"""Data in: ``ingest``, ``labels`` and ``datasets list``."""

from __future__ import annotations

import argparse
import os
from typing import Any

from driftloop.cli.common import (
    FlowBinding,
    UsageError,
    add_command,
    add_group,
    check_input,
    check_spec,
    registry,
)

CLI_SQL_URL_ENV = "DRIFTLOOP_CLI_SQL_URL"  # where --sql-url is handed to the ingest flow

INGEST = FlowBinding("driftloop.flows.ingest:ingest", {"spec": "spec_path", "source": "source",
                                                        "unlabelled": "labelled"}, negated=frozenset({"unlabelled"}))
LABELS = FlowBinding("driftloop.flows.labels:ingest_labels", {"spec": "spec_path", "source": "source"})


def _parse_param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return key, value


def check_ingest(args: argparse.Namespace) -> None:
    sql_given = [opt for opt, value in (("--sql-url", args.sql_url), ("--sql-url-env", args.sql_url_env),
                                        ("--sql-secret", args.sql_secret)) if value]
    if len(sql_given) > 1:
        raise UsageError(f"give one of --sql-url, --sql-url-env or --sql-secret, not {' and '.join(sql_given)}")
    if sql_given and args.source is not None:
        raise UsageError(f"give a SOURCE ({args.source}) or {sql_given[0]}, not both")
    if sql_given and not (args.table or args.query):
        raise UsageError(f"{sql_given[0]} needs --table or --query")
    if not sql_given and (args.table or args.query or args.param):
        raise UsageError("--table, --query and --param need --sql-url, --sql-url-env or --sql-secret")
    if not sql_given and args.source is None:
        raise UsageError("give a SOURCE path or URI, or --sql-url/--sql-url-env/--sql-secret with --table or --query")
    if args.sql_url_env and args.sql_url_env not in os.environ:
        raise UsageError(f"--sql-url-env {args.sql_url_env}: no such environment variable is set")
    check_spec(args.spec)
    check_input(args.source, "SOURCE")


def cmd_ingest(args: argparse.Namespace) -> dict[str, Any]:
    from driftloop.tasks.ingest import SqlSource

    sql = None
    if args.sql_url or args.sql_url_env or args.sql_secret:
        url_env = args.sql_url_env
        if args.sql_url:
            # Handed to the flow the way --sql-url-env is: the URL (and its password) never
            # becomes a flow-run parameter, which Prefect stores as given.
            os.environ[CLI_SQL_URL_ENV] = args.sql_url
            url_env = CLI_SQL_URL_ENV
        sql = SqlSource(url_env=url_env, secret_block=args.sql_secret, table=args.table, query=args.query,
                        params=dict(args.param))
    return INGEST.call(args, sql=sql).model_dump()


def human_ingest(p: dict[str, Any]) -> str:
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


def check_labels(args: argparse.Namespace) -> None:
    check_spec(args.spec)
    check_input(args.source, "SOURCE")


def cmd_labels(args: argparse.Namespace) -> dict[str, Any]:
    return LABELS.call(args).model_dump()


def cmd_datasets_list(args: argparse.Namespace) -> dict[str, Any]:
    records = registry().list_datasets(name=args.name)
    return {"datasets": [r.model_dump(mode="json", exclude={"column_types"}) for r in records]}


def human_datasets(p: dict[str, Any]) -> str:
    if not p["datasets"]:
        return "no datasets registered yet; run: driftloop ingest --spec SPEC SOURCE"
    header = f"{'id':<20} {'name':<16} {'rows':>9} {'valid':>9} {'quarantined':>11}  created_at            source"
    rows = [
        f"{d['id']:<20} {d['name']:<16} {d['rows_in']:>9} {d['rows_valid']:>9} "
        f"{d['rows_quarantined']:>11}  {d['created_at'][:19]}  {d['source']}"
        for d in p["datasets"]
    ]
    return "\n".join([header, *rows])


def register(sub: argparse._SubParsersAction) -> None:
    ingest = add_command(sub, "ingest", help="ingest and validate a dataset", handler=cmd_ingest,
                         human=human_ingest, check=check_ingest, binding=INGEST, needs_prefect=True)
    ingest.add_argument("--spec", required=True, help="dataset spec YAML (parsed before anything runs)")
    ingest.add_argument("source", nargs="?", help="CSV or Parquet path, directory, glob or fsspec URI (one with "
                        "credentials in it is refused: give them through the environment or fsspec's configuration)")
    ingest.add_argument("--sql-url", help="SQLAlchemy URL of the source database (handed to the flow through the "
                        "environment, never as a parameter; a command line is visible to other users: prefer "
                        "--sql-url-env or --sql-secret when it holds a password)")
    ingest.add_argument("--sql-url-env", metavar="VAR", help="environment variable holding the SQL URL")
    ingest.add_argument("--sql-secret", metavar="BLOCK", help="Prefect Secret block holding the SQL URL")
    group = ingest.add_mutually_exclusive_group()
    group.add_argument("--table", help="table to read (schema.table allowed)")
    group.add_argument("--query", help="SELECT to run; :name parameters come from --param")
    ingest.add_argument("--param", action="append", default=[], type=_parse_param, metavar="NAME=VALUE",
                        help="query parameter (repeat for several)")
    ingest.add_argument("--unlabelled", action="store_true", help="rows have no target (data to score)")

    labels = add_command(sub, "labels", help="ingest ground truth that arrived after scoring", handler=cmd_labels,
                         human=human_ingest, check=check_labels, binding=LABELS, needs_prefect=True)
    labels.add_argument("--spec", required=True, help="dataset spec YAML (parsed before anything runs)")
    labels.add_argument("source", help="CSV or Parquet path or URI with the id, the target and optionally the "
                        "timestamp; or sql-block:NAME")

    datasets = add_group(sub, "datasets", help="registered datasets")
    listing = add_command(datasets, "list", help="list datasets, newest first", handler=cmd_datasets_list,
                          human=human_datasets)
    listing.add_argument("--name", help="only datasets of this spec name")
