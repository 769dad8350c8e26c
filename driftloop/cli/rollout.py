"""Promotion on production evidence: ``rollout status`` and ``rollout decide``."""

from __future__ import annotations

import argparse
from typing import Any

from driftloop.cli.common import FlowBinding, add_command, add_group, registry

DECIDE = FlowBinding("driftloop.flows.rollout:rollout_decide", {"model": "model"})


def _check_model(name: str) -> str:
    from driftloop.cli.common import UsageError
    from driftloop.errors import DriftloopError
    from driftloop.spec import check_model_name

    try:
        return check_model_name(name)
    except DriftloopError as exc:
        raise UsageError(str(exc)) from None


def check_rollout(args: argparse.Namespace) -> None:
    _check_model(args.model)  # before a temporary Prefect server is started


def cmd_status(args: argparse.Namespace) -> dict[str, Any]:
    """Read only: the phase, the comparison on the rows labelled so far (not stored), and
    the stored decisions."""
    from driftloop.registry import ModelNotFound
    from driftloop.settings import get_settings
    from driftloop.tables import open_tables
    from driftloop.tasks.rollout import evaluate, model_state

    name = _check_model(args.model)
    store = registry()
    if name not in store.list_models():
        raise ModelNotFound(f"model {name!r} is not registered (driftloop models list shows the models)")
    state = model_state(store, name)
    decisions = store.list_rollout_decisions(name, limit=20)
    out: dict[str, Any] = {
        "model": name, "phase": state.phase, "champion": state.champion,
        "candidate": state.shadow if state.phase == "shadow" else None,
        "replaced_champion": state.shadow if state.phase == "guard" else None,
        "since": state.since.isoformat() if state.since else None,
        "rows_scored_by_both": 0, "rows_labelled": 0, "metric": None, "champion_metric": None,
        "shadow_metric": None, "difference": None, "lower": None, "upper": None, "confidence": None,
        "verdict": None, "verdict_since": None, "reason": "settled: no candidate in shadow and no guard",
        "decisions": [d.model_dump(mode="json") for d in decisions],
        "edge": _edge_section(name),
    }
    if state.active:
        tables = open_tables(store.engine, get_settings().artifact_root_uri())
        decision, comparison, both, labelled = evaluate(tables, state)
        out.update(rows_scored_by_both=both, rows_labelled=labelled, verdict=decision.verdict, reason=decision.reason)
        assert state.spec is not None
        out["metric"] = state.spec.gate_metric
        if comparison is not None:
            served, shadow = ((comparison.incumbent, comparison.contender) if state.phase == "shadow"
                              else (comparison.contender, comparison.incumbent))
            out.update(champion_metric=served, shadow_metric=shadow, difference=comparison.difference,
                       lower=comparison.lower, upper=comparison.upper, confidence=comparison.confidence)
        # Since when the stored verdict has been what it is now (decisions are newest first).
        same = [d for d in decisions if d.served_version == state.champion and d.shadow_version == state.shadow]
        run = []
        for d in same:
            if d.verdict != (same[0].verdict if same else None):
                break
            run.append(d)
        if run and run[-1].created_at:
            out["verdict_since"] = run[-1].created_at.isoformat()
    return out


def _edge_section(name: str) -> dict[str, Any] | None:
    """The edge fleet's rollout (``driftloop edge status``), or None without a channel."""
    from driftloop.settings import get_settings
    from driftloop.storage import ArtifactStore
    from driftloop.tasks.edge_rollout import fleet_status

    fleet = fleet_status(ArtifactStore(get_settings().artifact_root_uri()), name)
    return fleet if fleet["channel"] is not None else None


def human_status(p: dict[str, Any]) -> str:
    def num(value: Any, sign: str = "") -> str:
        return "-" if value is None else format(value, f"{sign}.4f")

    lines = [f"{p['model']}: {p['phase']}" + (f" since {p['since'][:19]}" if p["since"] else "")]
    lines.append(f"  champion   v{p['champion']}" if p["champion"] else "  champion   (none)")
    if p["candidate"]:
        lines.append(f"  candidate  v{p['candidate']} (scoring in shadow)")
    if p["replaced_champion"]:
        lines.append(f"  guard      v{p['replaced_champion']} (the replaced champion, scoring in shadow)")
    if p["phase"] in ("shadow", "guard"):
        shadow = p["candidate"] or p["replaced_champion"]
        lines.append(f"  rows       {p['rows_scored_by_both']:,} scored by both, {p['rows_labelled']:,} labelled")
        if p["metric"] and p["champion_metric"] is not None:
            lines.append(f"  {p['metric']:<10} champion v{p['champion']} {num(p['champion_metric'])}, v{shadow} "
                         f"{num(p['shadow_metric'])}; difference {num(p['difference'], '+')} "
                         f"({p['confidence']:.0%} bounds {num(p['lower'], '+')} .. {num(p['upper'], '+')})")
        verdict = p["verdict"] + (f" (stored since {p['verdict_since'][:19]})" if p["verdict_since"] else "")
        lines.append(f"  verdict    {verdict}: {p['reason']}")
    else:
        lines.append(f"  {p['reason']}")
    applied = [d for d in p["decisions"] if d["applied"]][:3]
    for d in applied:
        figures = (f" {d['metric']} {num(d['served_metric'])} vs {num(d['shadow_metric'])}, difference "
                   f"{num(d['difference'], '+')} [{num(d['lower'], '+')}, {num(d['upper'], '+')}]"
                   if d["served_metric"] is not None else "")
        lines.append(f"  decided    {d['created_at'][:19]} {d['phase']}: {d['verdict']} (served v{d['served_version']}, "
                     f"shadow v{d['shadow_version']}, {d['rows_labelled']:,} rows{figures and ':' + figures})")
    if p.get("edge"):
        from driftloop.cli.edge import human_edge_status

        lines += ["  edge       " + line.strip() for line in human_edge_status(p["edge"]).splitlines()]
    return "\n".join(lines)


def cmd_decide(args: argparse.Namespace) -> dict[str, Any]:
    _check_model(args.model)
    return DECIDE.call(args).model_dump(mode="json")


def human_decide(p: dict[str, Any]) -> str:
    d = p.get("decision")
    if d is None:
        return f"{p['model']}: {p['phase']}: {p['reason']}"
    figures = ""
    if d["served_metric"] is not None:
        figures = (f"\n  {d['metric']} served v{d['served_version']} {d['served_metric']:.4f}, shadow "
                   f"v{d['shadow_version']} {d['shadow_metric']:.4f} on the same {d['rows_labelled']:,} rows; "
                   f"difference {d['difference']:+.4f} ({d['confidence']:.0%} bounds {d['lower']:+.4f} .. "
                   f"{d['upper']:+.4f})")
    event = f"\n  event {p['event']}" if p.get("event") and d["applied"] else ""
    return f"{p['model']}: {p['phase']}: {d['verdict']}: {p['reason']}{figures}{event}"


def register(sub: argparse._SubParsersAction) -> None:
    rollout = add_group(sub, "rollout", help="a candidate in shadow and the guard after a promotion")
    status = add_command(rollout, "status", help="phase, rows scored by both, each model's metric and the verdict so "
                         "far; the edge fleet's waves when a channel is published",
                         handler=cmd_status, human=human_status, check=check_rollout)
    status.add_argument("--model", required=True, help="model name")
    decide = add_command(rollout, "decide", help="decide now on the labelled rows both models scored (promote, reject, "
                         "roll back or keep waiting)", handler=cmd_decide, human=human_decide, binding=DECIDE,
                         check=check_rollout, needs_prefect=True)
    decide.add_argument("--model", required=True, help="model name")
