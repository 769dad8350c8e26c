"""Total cost of a retraining schedule, and the best schedule in hindsight (the oracle).

A world of ``T`` periods is described by a matrix ``auc[s, t]``: the realized metric
(ROC AUC) in period ``t`` of the model a retrain at period ``s`` would produce (row 0:
the first model, trained before period 1). A retrain is deterministic given the period
it runs at and its window, so the matrix holds every model any schedule can serve.

The cost of a schedule (Regol et al., ICML 2025; CARA): performance lost plus a price
per retrain,

    cost = sum over served periods t of (1 - auc[serving model, t]) + alpha * retrains

where a retrain at ``s`` serves from period ``s`` on. :func:`oracle_schedule` finds the
cheapest schedule exactly by dynamic programming in O(T^2);
:func:`brute_force_schedule` tries all of them (for tests on small matrices).

Plain functions on numbers: the replay of the loop's own decisions, which needs the
monitoring, gate and window code, lives in ``driftloop.tasks.backtest``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, Field

ALPHAS = (0.005, 0.02, 0.05)  # the price of one retrain, in units of one period's AUC


@dataclass(frozen=True)
class Schedule:
    """Periods at which a retrain deployed its model, and what that cost."""

    retrains: tuple[int, ...]
    cost: float
    trainings: int = field(default=-1)  # retrains paid for (default: len(retrains))

    def __post_init__(self) -> None:
        if self.trainings < 0:
            object.__setattr__(self, "trainings", len(self.retrains))


def serving(retrains: Iterable[int], periods: Sequence[int]) -> list[int]:
    """The model (its retrain period; 0: the first model) that serves each period."""
    deployed = sorted(set(retrains))
    out, current, i = [], 0, 0
    for t in periods:
        while i < len(deployed) and deployed[i] <= t:
            current = deployed[i]
            i += 1
        out.append(current)
    return out


def performance_loss(auc: np.ndarray, serving_models: Sequence[int], periods: Sequence[int]) -> float:
    """sum over periods of (1 - the serving model's metric)."""
    losses = [1.0 - float(auc[s, t]) for s, t in zip(serving_models, periods, strict=True)]
    if any(math.isnan(v) for v in losses):
        raise ValueError("the matrix has no value for a model that serves a period (a retrain not in the matrix?)")
    return float(sum(losses))


def schedule_cost(auc: np.ndarray, retrains: Iterable[int], alpha: float, periods: Sequence[int], *,
                  trainings: int | None = None) -> float:
    """Cost of deploying a retrain at each period in ``retrains``. ``trainings``: retrains
    paid for when some did not deploy (rejected by the gate); default: one per deployment."""
    deployed = sorted(set(retrains))
    paid = len(deployed) if trainings is None else trainings
    return performance_loss(auc, serving(deployed, periods), periods) + alpha * paid


def oracle_schedule(auc: np.ndarray, alpha: float, periods: Sequence[int], candidates: Iterable[int]) -> Schedule:
    """The cheapest schedule, exactly: ``best[s]`` is the least cost of periods ``s``..end
    given that the model of retrain ``s`` serves from ``s`` (its retrain paid); the next
    retrain ``r`` (or none) is chosen for each ``s``. ``candidates``: periods where a
    retrain may run (labels one period late: not before period 2)."""
    periods = list(periods)
    n = len(periods)
    index = {t: i for i, t in enumerate(periods)}
    unknown = sorted(c for c in set(candidates) if c not in index or c <= 0)
    if unknown:
        raise ValueError(f"retrain candidates {unknown} are not served periods {periods[0]}..{periods[-1]}")
    options = sorted(set(candidates))
    starts = [0, *options]
    # cumulative[s][i]: model s's loss over periods[0..i) (periods before s count 0: never summed)
    cumulative = {s: np.concatenate([[0.0], np.cumsum([1.0 - float(auc[s, t]) if t >= s else 0.0
                                                       for t in periods])]) for s in starts}
    best: dict[int, float] = {}
    following: dict[int, int | None] = {}
    for s in reversed(starts):
        begin = index.get(s, 0)
        top = cumulative[s]
        # no further retrain: s serves to the end
        choice, value = None, top[n] - top[begin]
        for r in options:
            if r <= s:
                continue
            candidate = top[index[r]] - top[begin] + best[r]
            if candidate < value - 1e-12:
                choice, value = r, candidate
        best[s] = value + (alpha if s != 0 else 0.0)
        following[s] = choice
    chosen, s = [], following[0]
    while s is not None:
        chosen.append(s)
        s = following[s]
    return Schedule(tuple(chosen), float(best[0]))


def brute_force_schedule(auc: np.ndarray, alpha: float, periods: Sequence[int],
                         candidates: Iterable[int]) -> Schedule:
    """Every subset of ``candidates`` tried (2^k schedules): the check on the oracle."""
    options = sorted(set(candidates))
    best: Schedule | None = None
    for k in range(len(options) + 1):
        for chosen in itertools.combinations(options, k):
            cost = schedule_cost(auc, chosen, alpha, periods)
            if best is None or cost < best.cost - 1e-12:
                best = Schedule(chosen, cost)
    assert best is not None
    return best


def regret(cost: float, oracle_cost: float) -> float:
    """What a strategy paid above the best schedule in hindsight."""
    return cost - oracle_cost


def meets_target(driftloop: float, never: float, every: float, oracle: float, share: float = 0.3) -> bool:
    """The issue's target: below both simple strategies, and a regret at most ``share`` of
    the better simple strategy's."""
    return driftloop < never and driftloop < every and regret(driftloop, oracle) <= share * regret(min(never, every), oracle)


# --- a model's own history: which window to retrain on (driftloop backtest) -------------


class WindowFigures(BaseModel):
    """One candidate window replayed over a model's labelled history."""

    window: str = Field(description="The window, as in the spec (31d, 92d, all).")
    retrains: int = Field(description="Retrains replayed: one per labelled period after the first.")
    metric: str
    realized: list[float | None] = Field(description="Each retrain's realized metric on the next labelled period.")
    mean: float | None = Field(description="Mean of the realized metrics.")
    cost: float | None = Field(description="Sum of (1 - metric) over the periods plus alpha per retrain.")


class WindowChoice(BaseModel):
    """What ``driftloop backtest`` reports and ``window: {choose: [...]}`` records."""

    model: str
    version: int | None = None
    alpha: float
    metric: str
    periods: list[str] = Field(description="The labelled periods, oldest first (start dates).")
    windows: list[WindowFigures]
    chosen: str = Field(description="The window with the least cost (too short a history: the first candidate).")
    reason: str = Field(description="Why this window.")
