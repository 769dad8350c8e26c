"""Which retraining window suits a model's own history: ``backtest``."""

from __future__ import annotations

import argparse
from typing import Any

from driftloop.cli.common import UsageError, add_command, int_at_least, model_ref, registry

DEFAULT_WINDOWS = "31d,92d,all"


def windows_arg(text: str) -> list[str]:
    """``31d,92d,all``: each a window the spec's ``retrain.window`` could name."""
    from driftloop.spec import parse_duration

    names = [w.strip() for w in text.split(",") if w.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no window in {text!r}; e.g. 31d,92d,all")
    for name in names:
        if name != "all":
            try:
                parse_duration(name)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{name!r} is not a window: give spans like 31d or 12w, or all "
                                                 "(e.g. 31d,92d,all)") from None
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a window is listed twice in {text!r}")
    return names


def check_backtest(args: argparse.Namespace) -> None:
    if args.period not in ("1w", "2w", "1mo", "1q"):
        raise UsageError(f"--period {args.period!r}: give 1w, 2w, 1mo or 1q")


def cmd_backtest(args: argparse.Namespace) -> dict[str, Any]:
    from driftloop.errors import DriftloopError
    from driftloop.feedback import collect_labelled_data, training_columns
    from driftloop.settings import get_settings
    from driftloop.tables import open_tables
    from driftloop.tasks.backtest import parse_window, window_backtest
    from driftloop.tasks.retrain import champion_spec

    store = registry()
    record = store.resolve(args.model)
    spec = champion_spec(record)
    if not spec.timestamp:
        raise DriftloopError(f"model {record.model_name}: its spec has no timestamp, so its labelled history cannot be "
                             "cut into periods to replay; backtest needs the spec's timestamp column")
    tables = open_tables(store.engine, get_settings().artifact_root_uri())
    data = collect_labelled_data(store, tables, spec)
    if data.frame.height == 0:
        raise DriftloopError(f"model {record.model_name} has no labelled rows yet: register labels for its scored rows "
                             "(driftloop labels) or ingest a labelled dataset, then backtest")
    windows = args.windows or (spec.retrain.window.choose or DEFAULT_WINDOWS.split(","))
    choice = window_backtest(spec, data.frame.select(training_columns(spec)), [parse_window(w) for w in windows],
                             alpha=spec.retrain.alpha, trials=args.trials, algorithms=[record.algorithm],
                             period=args.period, max_periods=args.last_periods, model=record.model_name,
                             version=record.version)
    return choice.model_dump(mode="json")


def human_backtest(p: dict[str, Any]) -> str:
    def fmt(value: float | None) -> str:
        return f"{value:.4f}" if value is not None else "-"

    lines = [(f"{p['model']} v{p['version']}: {len(p['periods'])} labelled period(s) from {p['periods'][0][:10]}; "
             f"each retrain judged on the next period's {p['metric']}; cost = sum(1 - {p['metric']}) + "
             f"alpha {p['alpha']:g} per retrain"),
             f"  {'window':<8} {'retrains':>8} {'mean':>7} {'cost':>8}  realized per period"]
    for w in p["windows"]:
        lines.append(f"  {w['window']:<8} {w['retrains']:>8} {fmt(w['mean']):>7} {fmt(w['cost']):>8}  "
                     + " ".join(fmt(v) for v in w["realized"]))
    lines.append(f"chosen: {p['chosen']} ({p['reason']})")
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    cmd = add_command(
        sub, "backtest", help="replay a model's labelled history under candidate retraining windows",
        description=("Replay retraining on MODEL's own labelled history (its labelled datasets and scored rows "
                     "joined to their labels): at the end of each labelled period a retrain on each candidate "
                     "window, judged on the next period. Per window: each retrain's realized gate metric, and the "
                     "total cost sum(1 - metric) + alpha per retrain at the spec's retrain.alpha. The spec's "
                     "retrain: {window: {choose: [...]}} makes every retrain run this choice itself."),
        handler=cmd_backtest, human=human_backtest, check=check_backtest)
    cmd.add_argument("--model", required=True, type=model_ref, help="NAME or NAME@alias (bare NAME: champion); its "
                     "spec, algorithm and labelled rows are used")
    cmd.add_argument("--windows", type=windows_arg, metavar="W,W,...",
                     help=f"candidate windows: spans (31d, 12w) or all (default: the spec's choose list, else "
                          f"{DEFAULT_WINDOWS})")
    cmd.add_argument("--trials", type=int_at_least(1), default=5, help="Optuna trials per replayed retrain (default 5)")
    cmd.add_argument("--last-periods", type=int_at_least(2), default=12, metavar="N",
                     help="replay only the newest N labelled periods (default 12; each costs one training per window)")
    cmd.add_argument("--period", default="1mo", help="length of a replayed period: 1w, 2w, 1mo or 1q (default 1mo)")
