"""The registry's models: ``models list``, ``show``, ``promote`` and ``rollback``."""

from __future__ import annotations

import argparse
import os
from typing import Any

from driftloop.cli.common import (
    add_command,
    add_group,
    int_at_least,
    metrics_line,
    model_ref,
    registry,
)


def cmd_models_list(args: argparse.Namespace) -> dict[str, Any]:
    from driftloop.metrics import undefined_metrics

    store = registry()
    models = []
    for name in store.list_models():
        aliases = store.aliases(name)
        versions = store.list_versions(name)
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


def human_models(p: dict[str, Any]) -> str:
    if not p["models"]:
        return "no models registered yet; run: driftloop train --spec SPEC SOURCE"
    lines = []
    for m in p["models"]:
        lines.append(f"{m['name']}")
        for v in m["versions"]:
            tags = f" [{', '.join(v['aliases'])}]" if v["aliases"] else ""
            headline = metrics_line(dict(list(v["metrics"].items())[:3]))
            gate = "gate passed" if v["gate_passed"] else "gate failed"
            lines.append(f"  v{v['version']:<4} {v['algorithm']:<9} {headline}  {gate}  {v['created_at'][:19]}{tags}")
    return "\n".join(lines)


def cmd_models_show(args: argparse.Namespace) -> dict[str, Any]:
    from driftloop.metrics import undefined_metrics

    store = registry()
    record = store.resolve(args.ref)
    return {
        **record.model_dump(mode="json"),
        "undefined_metrics": undefined_metrics(record.metrics),
        "aliases": store.aliases(record.model_name),
        "alias_history": [e.model_dump(mode="json") for e in store.alias_history(record.model_name)],
    }


def human_show(p: dict[str, Any]) -> str:
    lines = [
        f"{p['model_name']} v{p['version']} ({p['algorithm']}, {p['task']}) created {p['created_at'][:19]}",
        "  metrics  " + metrics_line(p["metrics"]),
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


def _expected_champion(store: Any, args: argparse.Namespace) -> int | None:
    """The champion the user decided against: ``--expect-champion`` (what they reviewed),
    else the one seen now. Promote and rollback are compare-and-swaps on it, as a retrain's
    promotion is: if another promotion or rollback lands first, nothing moves."""
    if args.expect_champion is not None:
        return args.expect_champion
    return store.aliases(args.name).get("champion")


def cmd_models_promote(args: argparse.Namespace) -> dict[str, Any]:
    store = registry()
    before = _expected_champion(store, args)
    store.promote(args.name, args.version, actor=_actor(args), reason=args.reason, expected_champion=before)
    return {"model": args.name, "champion": args.version, "previous": before, "aliases": store.aliases(args.name)}


def cmd_models_rollback(args: argparse.Namespace) -> dict[str, Any]:
    store = registry()
    before = _expected_champion(store, args)
    version = store.rollback(args.name, actor=_actor(args), reason=args.reason, expected_champion=before)
    return {"model": args.name, "champion": version, "previous": before, "aliases": store.aliases(args.name)}


def human_alias_move(p: dict[str, Any]) -> str:
    return f"{p['model']}: champion is now v{p['champion']} (was v{p['previous']})"


def register(sub: argparse._SubParsersAction) -> None:
    models = add_group(sub, "models", help="registered models")
    add_command(models, "list", help="models, versions and aliases", handler=cmd_models_list, human=human_models)
    show = add_command(models, "show", help="one version with its metrics, artifacts and alias history",
                       handler=cmd_models_show, human=human_show)
    show.add_argument("ref", type=model_ref, help="NAME, NAME@alias or NAME:VERSION (bare NAME: the champion)")
    for verb, handler, what in (("promote", cmd_models_promote, "make VERSION the champion"),
                                ("rollback", cmd_models_rollback, "move the champion back to the one before it")):
        p = add_command(models, verb, help=what, handler=handler, human=human_alias_move)
        p.add_argument("name", help="model name")
        if verb == "promote":
            p.add_argument("version", type=int_at_least(1), help="version number (driftloop models list)")
        p.add_argument("--reason", required=True, help="why (kept in the alias history)")
        p.add_argument("--actor", help="who (default cli:$USER)")
        p.add_argument("--expect-champion", type=int_at_least(1), metavar="VERSION",
                       help="only if the champion is still this version (what you reviewed); default: the champion "
                            "seen when the command starts")
