"""The bundled walk-through: ``demo``."""

from __future__ import annotations

import argparse
from typing import Any

from driftloop.cli.common import FlowBinding, UsageError, add_command, int_at_least
from driftloop.cli.data import human_ingest
from driftloop.cli.monitor import human_monitor
from driftloop.cli.score import human_score
from driftloop.cli.training import human_train

# --trials unset leaves each function's own default (10 in process, 5 with --loop).
DEMO = FlowBinding("driftloop.demo:run_demo", {"trials": "trials"}, omit_none=frozenset({"trials"}))
LOOP_DEMO = FlowBinding("driftloop.demo:run_loop_demo", {"trials": "trials", "keep_running": "keep_running",
                                                          "yes_this_server": "yes_this_server"},
                        omit_none=frozenset({"trials"}))


def check_demo(args: argparse.Namespace) -> None:
    if args.stop and (args.loop or args.keep_running or args.yes_this_server or args.trials is not None):
        raise UsageError("--stop only stops what a --keep-running demo started: give it alone")
    if not args.loop and (args.keep_running or args.yes_this_server):
        raise UsageError("--keep-running and --yes-this-server go with --loop")


def _needs_temporary_server(args: argparse.Namespace) -> bool:
    return not (args.stop or args.loop)  # --loop starts a real server itself


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    if args.stop:
        from driftloop.local_stack import stop_recorded
        from driftloop.settings import get_settings

        return {"stopped": stop_recorded(get_settings().home_dir)}
    return (LOOP_DEMO if args.loop else DEMO).call(args)


def human_demo(p: dict[str, Any]) -> str:
    if "stopped" in p:
        return "\n".join(f"{e['role']} (pid {e['pid']}): {e['why']}" for e in p["stopped"]) or "nothing was running"
    if "retrain" in p:
        lines = [f"Prefect UI: {p['ui']}" + ("" if p["kept_running"] else " (stopped; rerun with --keep-running to browse it)")]
        lines += [f"  {name:<34} {step['state']:<10} flow run {step['flow_run']}" for name, step in p["steps"].items()]
        if p.get("monitor"):
            lines += ["", human_monitor(p["monitor"]), ""]
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
        if p.get("rollout"):
            lines += human_shadow_rollout(p["rollout"])
        return "\n".join(lines)
    parts = [f"ingest {stage}:\n" + human_ingest(result) for stage, result in p["ingest"].items()]
    parts.append("train:\n" + human_train(p["train"]))
    parts.append("score analysis data:\n" + human_score(p["score"]))
    parts.append(human_monitor(p["monitor"]))
    return "\n\n".join(parts)


def human_shadow_rollout(r: dict[str, Any]) -> list[str]:
    """The shadow rollout's decisions: both models' metric on the same rows, the
    difference and its bounds, and where to see them again."""
    lines = []
    if r["candidate"] is None:
        lines.append("  shadow rollout: no candidate after the retrain (its verdict above says why); "
                     "the later period was not scored")
    else:
        lines.append(f"  shadow rollout: champion v{r['served']} scored the later period ({r['later_rows']:,} rows "
                     f"from {r['from']}), candidate v{r['candidate']} the same rows in shadow; then their labels arrived")
        if r["policy"]:
            lines.append(f"    policy (the spec's rollout.shadow): decide on >= {r['policy']['min_labelled_rows']:,} "
                         f"labelled rows scored by both, paired bootstrap, {r['policy']['confidence']:.0%} confidence")
        if not r["decisions"]:
            lines.append("    no decision was stored: see the labels run's log")
    for d in r["decisions"]:
        if d["phase"] == "shadow":
            served, shadow = f"champion v{d['served_version']}", f"candidate v{d['shadow_version']}"
        else:
            served, shadow = f"new champion v{d['served_version']}", f"replaced champion v{d['shadow_version']}"
        applied = " (applied)" if d["applied"] else ""
        lines.append(f"    decision by {d['actor']}: {d['verdict'].upper()}{applied}: {d['reason'].split(': ', 1)[0]}")
        if d["served_metric"] is not None:
            contender = shadow if d["phase"] == "shadow" else served
            lines.append(f"      {d['metric']} on the same {d['rows_labelled']:,} labelled rows: {served} "
                         f"{d['served_metric']:.4f}, {shadow} {d['shadow_metric']:.4f}")
            lines.append(f"      difference {d['difference']:+.4f} ({contender} better when positive), "
                         f"{d['confidence']:.0%} bounds [{d['lower']:+.4f}, {d['upper']:+.4f}]")
    now = f"    now: champion v{r['champion']}, phase {r['phase']}"
    if r["phase"] == "guard":
        now += f": v{r['shadow']}, the champion it replaced, scores in shadow until the guard's days end"
    elif r["phase"] == "shadow":
        now += f": candidate v{r['shadow']} keeps scoring in shadow"
    ui = r["artifact_url"] or f"{r['artifact']} (make demo KEEP=1 keeps the UI up)"
    return [*lines, now, f"    see it again: {r['status_command']}; in the Prefect UI, artifact {ui}"]


def register(sub: argparse._SubParsersAction) -> None:
    demo = add_command(sub, "demo", help="run the lifecycle on the bundled car-loan data", handler=cmd_demo,
                       human=human_demo, check=check_demo, binding=DEMO, needs_prefect=_needs_temporary_server)
    demo.add_argument("--trials", type=int_at_least(1),
                      help="Optuna trials per algorithm (default 10; with --loop 5)")
    demo.add_argument("--loop", action="store_true", help="on a real Prefect server with workers, through the "
                      "deployments and the retrain automation")
    demo.add_argument("--keep-running", action="store_true",
                      help="with --loop: leave the server and workers running (stop them with: driftloop demo --stop)")
    demo.add_argument("--yes-this-server", action="store_true",
                      help="with --loop and PREFECT_API_URL set: change that server (pools, blocks, deployments with "
                           "schedules, workers) even though it already holds pools or deployments of driftloop; "
                           "without it the demo refuses and says what would change")
    demo.add_argument("--stop", action="store_true",
                      help="stop the server and workers a --keep-running demo started (their pids are in "
                           "$DRIFTLOOP_HOME/demo-stack.json), and nothing else")
