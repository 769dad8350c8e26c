"""The promotion gate, in the manner of TFX's Evaluator: a challenger must meet absolute
thresholds and must not be worse than the champion (scored on the same holdout) by
more than ``max_regression``; a retrain's challenger must also beat it by
``min_improvement`` (the spec's ``retrain`` section). A challenger that predicts exactly
what the champion does (a clone) is never promoted. The first model is judged on thresholds alone."""

from __future__ import annotations

import math
from typing import Any

from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel

from driftloop.metrics import HIGHER_IS_BETTER
from driftloop.spec import GateSpec


class GateDecision(BaseModel):
    passed: bool
    reasons: list[str]
    metric: str
    challenger: float | None
    champion: float | None = None
    champion_version: int | None = None
    # Both models' metrics on the same holdout (the challenger's own are ``challenger_metrics``).
    challenger_metrics: dict[str, float] = {}
    champion_metrics: dict[str, float] | None = None
    min_improvement: float | None = None


def decide_promotion(
    challenger: dict[str, float], policy: GateSpec, metric: str, *,
    champion: dict[str, float] | None = None, champion_version: int | None = None,
    min_improvement: float | None = None, identical_to_champion: bool = False,
) -> GateDecision:
    passed = True
    reasons: list[str] = []
    for name, limit in policy.thresholds.items():
        value = challenger.get(name)
        if value is None or math.isnan(value):
            passed = False
            reasons.append(f"{name} is not available for this model, so its threshold cannot be met")
            continue
        if limit.min is not None:
            ok = value >= limit.min
            passed &= ok
            reasons.append(f"{name} {value:.4f} {'>=' if ok else '<'} min {limit.min:g}")
        if limit.max is not None:
            ok = value <= limit.max
            passed &= ok
            reasons.append(f"{name} {value:.4f} {'<=' if ok else '>'} max {limit.max:g}")
    if not policy.thresholds:
        reasons.append("no absolute thresholds configured")

    ours = challenger.get(metric)
    theirs = champion.get(metric) if champion else None
    if champion is None:
        reasons.append("no champion yet: judged on absolute thresholds alone")
    elif ours is None or theirs is None or math.isnan(ours) or math.isnan(theirs):
        passed = False
        reasons.append(f"{metric} missing for the challenger or champion v{champion_version}; cannot compare")
    else:
        worse_by = (theirs - ours) if HIGHER_IS_BETTER[metric] else (ours - theirs)
        ok = worse_by <= policy.max_regression
        passed &= ok
        if worse_by <= 0:
            reasons.append(f"{metric} {ours:.4f} vs champion v{champion_version} {theirs:.4f}: not worse")
        else:
            verdict = "within" if ok else "exceeds"
            reasons.append(
                f"{metric} {ours:.4f} vs champion v{champion_version} {theirs:.4f}: worse by "
                f"{worse_by:.4f}, {verdict} max_regression {policy.max_regression:g}"
            )
        if min_improvement is not None:
            improved_by = -worse_by
            ok = improved_by >= min_improvement
            passed &= ok
            reasons.append(
                f"improvement {improved_by:+.4f} over champion v{champion_version} "
                f"{'meets' if ok else 'is below'} min_improvement {min_improvement:g}"
            )
    if identical_to_champion:
        passed = False
        reasons.append(f"identical model: the same prediction as champion v{champion_version} for every holdout row")
    return GateDecision(
        passed=passed, reasons=reasons, metric=metric, challenger=ours, champion=theirs,
        champion_version=champion_version, challenger_metrics=challenger, champion_metrics=champion,
        min_improvement=min_improvement,
    )


@task(name="gate", cache_policy=NONE)
def gate_task(challenger: dict[str, Any], policy: GateSpec, metric: str, champion: dict[str, Any] | None,
              champion_version: int | None, min_improvement: float | None = None,
              identical_to_champion: bool = False) -> GateDecision:
    return decide_promotion(challenger, policy, metric, champion=champion, champion_version=champion_version,
                  min_improvement=min_improvement, identical_to_champion=identical_to_champion)
