"""Flow ``rollout-decide``: the rows both models scored (champion and candidate in
shadow, or new and replaced champion under guard) joined to their labels -> paired
bootstrap on the gate metric -> promote, reject, roll back or keep waiting, stored and
applied in one compare-and-swap -> event.

Run by the ``labels`` flow and the ``monitor`` flow when a rollout is in progress, and
by ``driftloop rollout decide``. The only input from outside is the model's name.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from driftloop.flows.config import run_settings
from driftloop.flows.monitor import model_resource
from driftloop.naming import artifact_key
from driftloop.registry import open_registry
from driftloop.registry.store import RolloutDecisionRecord
from driftloop.rollout import DEFAULT_RESAMPLES
from driftloop.spec import check_model_name
from driftloop.tables import open_tables
from driftloop.tasks.rollout import RolloutOutcome, decide_task, paired_markdown


@flow(name="rollout-decide")
def rollout_decide(model: str, registry_block: str | None = None, resamples: int = DEFAULT_RESAMPLES) -> RolloutOutcome:
    """Decide ``model``'s rollout on the labelled rows both of its models scored."""
    logger = get_run_logger()
    model = check_model_name(model)
    settings = run_settings(registry_block)
    registry = open_registry(settings.registry_database_url())
    tables = open_tables(registry.engine, settings.artifact_root_uri())
    actor = f"flow rollout-decide/{runtime.flow_run.name or 'local'}"
    outcome = decide_task(registry, tables, model, actor, resamples)
    logger.info("rollout of %s (%s): %s", model, outcome.phase, outcome.reason)
    decision = outcome.decision
    if decision is not None:
        if outcome.event and decision.applied:
            resource = model_resource(model, decision.shadow_version if decision.verdict != "rollback"
                                      else decision.served_version)
            emit_event(event=outcome.event, resource=resource, payload={
                "model": model, **decision.model_dump(mode="json", exclude={"model_name", "actor"})})
        create_markdown_artifact(key=artifact_key("rollout", model), markdown=render(outcome),
                                 description=f"{outcome.phase}: {decision.verdict}")
    return outcome


def render(outcome: RolloutOutcome) -> str:
    d = outcome.decision
    assert d is not None
    phase = (f"- phase at the decision: {outcome.phase} since {outcome.since:%Y-%m-%d %H:%M} UTC" if outcome.since
             else f"- phase at the decision: {outcome.phase}")
    header = (f"| {d.metric} (same rows) | served v{d.served_version} | shadow v{d.shadow_version} | difference | "
              f"{d.confidence:.0%} bounds |")
    figures = (f"| | {_num(d.served_metric)} | {_num(d.shadow_metric)} | {_num(d.difference, '+')} | "
               f"[{_num(d.lower, '+')}, {_num(d.upper, '+')}] |")
    now = after_decision(d)
    lines = [f"# Rollout of {outcome.model}: {d.verdict}", "", d.reason, "", phase, *([now] if now else []),
             (f"- served v{d.served_version}, shadow v{d.shadow_version}; {d.rows_scored_by_both:,} rows scored by "
              f"both, {d.rows_labelled:,} labelled"), "", header, "|---|---:|---:|---:|---|", figures, "",
             "The difference is the contender's advantage (candidate in shadow, new champion under guard)."]
    if outcome.event and d.applied:
        lines.append(f"\nEvent emitted: `{outcome.event}`")
    chart = paired_markdown(outcome.model, outcome.phase, d.served_version, d.shadow_version, d.metric, outcome.chunks)
    return "\n".join(lines) + (f"\n\n{chart}" if chart else "")


def after_decision(d: RolloutDecisionRecord) -> str | None:
    """Who serves once an applied decision moved the aliases (the phase line above is the
    one the decision was made in)."""
    if not d.applied:
        return None
    if d.verdict == "promote":
        return f"- now: v{d.shadow_version} is champion (v{d.served_version}, the champion it replaced, no longer serves)"
    if d.verdict == "rollback":
        return f"- now: v{d.shadow_version} is champion again (v{d.served_version} rolled back)"
    if d.verdict == "reject":
        return f"- now: v{d.served_version} stays champion (candidate v{d.shadow_version} rejected)"
    return None


def _num(value: float | None, sign: str = "") -> str:
    return "-" if value is None else format(value, f"{sign}.4f")
