"""Models made: ``train`` and ``retrain``."""

from __future__ import annotations

import argparse
from typing import Any

from driftloop.cli.common import (
    FlowBinding,
    UsageError,
    add_command,
    check_input,
    check_spec,
    int_at_least,
    metrics_line,
    non_negative_float,
    positive_float,
)

# Kept here (not imported from driftloop.tasks.search_space) so --help needs no training
# libraries; tests/unit/test_cli.py checks they equal search_space.ALGORITHMS.
ALGORITHMS = ("xgboost", "lightgbm")

TRAIN = FlowBinding("driftloop.flows.train:train", {
    "spec": "spec_path", "dataset": "dataset_id", "source": "source", "trials": "trials",
    "algorithms": "algorithms", "seed": "seed", "timeout": "timeout_s", "study": "study_name",
    "no_promote": "promote", "tuning_workers": "tuning_workers", "dask_address": "dask_address",
}, negated=frozenset({"no_promote"}))
RETRAIN = FlowBinding("driftloop.flows.retrain:retrain",
                      {"model": "model", "trials": "trials", "cooldown": "cooldown_s"})


def algorithm_list(text: str) -> list[str]:
    algorithms = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown or not algorithms:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown) or repr(text)}; choose from "
                                         f"{', '.join(ALGORITHMS)} (comma-separated)")
    return algorithms


def check_train(args: argparse.Namespace) -> None:
    if args.dataset is not None and args.source is not None:
        raise UsageError(f"give a SOURCE ({args.source}) or --dataset {args.dataset}, not both")
    if args.dataset is None and args.source is None:
        raise UsageError("give a SOURCE path or URI, or --dataset ID (see: driftloop datasets list)")
    if args.dask_address and args.tuning_workers < 2:
        raise UsageError(f"--dask-address {args.dask_address} is where tuning workers run, but --tuning-workers is "
                         f"{args.tuning_workers}: set --tuning-workers 2 or more, or drop --dask-address")
    check_spec(args.spec)
    check_input(args.source, "SOURCE")


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    return TRAIN.call(args).model_dump()


def human_train(p: dict[str, Any]) -> str:
    lines = [
        p["headline"],
        "  metrics  " + metrics_line(p["metrics"]),
        f"  gate     {'passed' if p['gate']['passed'] else 'FAILED'}: " + "; ".join(p["gate"]["reasons"]),
        f"  parity   max |diff| {p['parity']['max_abs_diff']:.2g}, {p['parity']['label_flips']} label flips, {p['parity']['rows']:,} rows",
        f"  onnx     {p['onnx_uri']} (sha256 {p['onnx_sha256'][:12]}...)",
    ]
    if p.get("card_uri"):
        lines.append(f"  card     {p['card_uri']}")
    return "\n".join(lines)


def cmd_retrain(args: argparse.Namespace) -> dict[str, Any]:
    result = RETRAIN.call(args)
    payload = result.model_dump(mode="json", exclude={"score"})
    payload["scored"] = result.score.model_dump(mode="json") if result.score else None
    return payload


def human_retrain(p: dict[str, Any]) -> str:
    lines = [f"{p['model']}: {'skipped: ' if p['skipped'] else ''}{p['reason']}"]
    if p["window"]:
        w = p["window"]
        lines.append(f"  window      {w['policy']}: {w['rows']:,} rows, {w['start'] or '-'} .. {w['end'] or '-'} "
                     f"({w['new_labels']:,} newer than the champion's data)")
        if c := w.get("choice"):
            costs = ", ".join(f"{f['window']} {f['cost']:.3f}" if f["cost"] is not None else f"{f['window']} -"
                              for f in c["windows"])
            lines.append(f"  chosen      {c['chosen']} ({c['reason']}); cost at alpha {c['alpha']:g}: {costs}")
    for role in ("champion", "challenger"):
        side = p.get(role)
        if side:
            shown = metrics_line(side.get("metrics") or {}) or "-"
            lines.append(f"  {role:<11} v{side['version']}: {shown}")
    if p["labels_unscored"]:
        lines.append(f"  labels      {p['labels_unscored']:,} of {p['labels']:,} match no scored id (not used)")
    lines.append(f"  promoted    {'yes' if p['promoted'] else 'no'}")
    if p.get("candidate"):
        lines.append(f"  candidate   v{p['candidate']} scores in shadow (driftloop rollout status --model {p['model']})")
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    train = add_command(sub, "train", help="tune, train, export and register a model", handler=cmd_train,
                        human=human_train, check=check_train, binding=TRAIN, needs_prefect=True)
    train.add_argument("--spec", required=True, help="dataset spec YAML (parsed before anything runs)")
    train.add_argument("source", nargs="?", help="CSV or Parquet path or URI (ingested first)")
    train.add_argument("--dataset", metavar="ID", help="registered dataset id (driftloop datasets list)")
    train.add_argument("--trials", type=int_at_least(1), default=20,
                       help="Optuna trials per algorithm (default %(default)s)")
    train.add_argument("--algorithms", type=algorithm_list, default=",".join(ALGORITHMS),
                       help="comma-separated, from " + ", ".join(ALGORITHMS) + " (default %(default)s)")
    train.add_argument("--seed", type=int, default=0, help="random seed of the split and the search "
                       "(default %(default)s)")
    train.add_argument("--timeout", type=positive_float, metavar="SECONDS",
                       help="tuning time limit per algorithm (default: none)")
    train.add_argument("--study", help="study name suffix shared by workers tuning together")
    train.add_argument("--no-promote", action="store_true", help="register only; never move champion")
    train.add_argument("--tuning-workers", type=int_at_least(1), default=1, metavar="N",
                       help="tune in N processes sharing one Optuna study; N > 1 needs PostgreSQL (the registry's, "
                            "or DRIFTLOOP_OPTUNA_STORAGE); --trials stays the total (default %(default)s)")
    train.add_argument("--dask-address", metavar="ADDRESS",
                       help="run the tuning workers on this Dask scheduler (tcp://host:8786) instead of local "
                            "processes; needs --tuning-workers 2 or more")

    retrain = add_command(
        sub, "retrain", handler=cmd_retrain, human=human_retrain, binding=RETRAIN, needs_prefect=True,
        help="retrain a model on its training window (labelled data + scored rows with their labels)",
        description="Decide, then train: wait for the spec's retrain.min_new_labels, train on the window, judge "
                    "the challenger against the champion on the window's newest rows, promote if better.",
    )
    retrain.add_argument("--model", required=True, help="model name")
    retrain.add_argument("--trials", type=int_at_least(1), default=10,
                         help="Optuna trials per algorithm (default %(default)s)")
    retrain.add_argument("--cooldown", type=non_negative_float, default=600, metavar="SECONDS",
                         help="skip if the last retrain of this model started within this many seconds "
                              "(default %(default)s)")
