"""Promotion on production evidence: which rows a second model scores in shadow, how two
models compare on the same labelled rows, and what the comparison decides.

Two phases, each with a served model and a shadow model:

- ``shadow``: the champion serves; the ``candidate`` (a retrain that passed the gate,
  under a spec with ``rollout.shadow``) scores the shadow fraction of the same rows.
  Candidate better with confidence: promote; worse with confidence: reject; otherwise
  wait until ``max_days``, then ``on_timeout``.
- ``guard``: for ``guard.days`` after a promotion, the new champion serves and the
  replaced one scores in shadow. New champion worse by more than ``tolerance`` with
  confidence: roll back.

Everything here is a plain function on arrays, frames and registry records; the flow
(:mod:`driftloop.flows.rollout`) wires them and the registry applies a decision as one
compare-and-swap (:meth:`driftloop.registry.RegistryStore.apply_rollout_decision`).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import numpy as np
import polars as pl

from driftloop.errors import DriftloopError
from driftloop.metrics import HIGHER_IS_BETTER
from driftloop.spec import DatasetSpec, RolloutPolicy

Phase = Literal["shadow", "guard", "settled"]
Verdict = Literal["waiting", "promote", "reject", "rollback", "settled"]

# The verdicts that move an alias, and the event each emits.
EVENTS: dict[str, str] = {
    "promote": "driftloop.model.promoted",
    "reject": "driftloop.model.candidate-rejected",
    "rollback": "driftloop.model.rolled-back",
}
DEFAULT_RESAMPLES = 1000
_ROLLBACK_PREFIX = "rollback: "  # the registry's marker of a rollback in the alias history

# --- which rows the shadow model scores ------------------------------------------------

_MASK64 = (1 << 64) - 1


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """A fixed integer mix (SplitMix64's finaliser): the same id gives the same number on
    every run, machine and library version (polars' own hash promises none of that)."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def stable_unit(ids: pl.Series) -> np.ndarray:
    """Each id as a number in [0, 1), stable across runs: integers through SplitMix64,
    anything else through BLAKE2b of its text."""
    if ids.dtype.is_integer():
        hashed = _splitmix64(ids.cast(pl.Int64).fill_null(0).to_numpy().view(np.uint64))
    else:
        hashed = np.fromiter(
            (int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=8).digest(), "little") for v in ids),
            dtype=np.uint64, count=len(ids))
    return (hashed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def shadow_mask(ids: pl.Series, fraction: float) -> np.ndarray:
    """Which rows the shadow model scores: the same ids on every run."""
    if fraction >= 1.0:
        return np.ones(len(ids), dtype=bool)
    return stable_unit(ids) < fraction


# --- comparing two models on the same rows -------------------------------------------------


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC by average ranks (ties count half), in numpy: a bootstrap computes it
    thousands of times."""
    n = len(y)
    positives = int(y.sum())
    negatives = n - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    ordered = s[order]
    starts_mask = np.r_[True, ordered[1:] != ordered[:-1]]
    group = np.cumsum(starts_mask) - 1
    starts = np.flatnonzero(starts_mask)
    ends = np.r_[starts[1:], n]
    ranks = ((starts + ends + 1) / 2.0)[group]
    rank_sum = ranks[y[order] == 1].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def metric_value(metric: str, y: np.ndarray, probability: np.ndarray, prediction: np.ndarray) -> float:
    """The gate metric on rows: ``probability`` (of the positive class, binary) and
    ``prediction`` (the label, or the value for regression)."""
    if metric == "roc_auc":
        return _auc(y, probability)
    if metric == "log_loss":
        p = np.clip(probability, 1e-15, 1 - 1e-15)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    if metric == "accuracy":
        return float(np.mean(prediction == y))
    if metric == "rmse":
        return float(np.sqrt(np.mean((prediction - y) ** 2)))
    if metric == "mae":
        return float(np.mean(np.abs(prediction - y)))
    if metric == "r2":
        total = np.sum((y - y.mean()) ** 2)
        return float(1 - np.sum((prediction - y) ** 2) / total) if total else float("nan")
    from sklearn import metrics as sk

    if metric == "pr_auc":
        return float(sk.average_precision_score(y, probability))
    if metric == "f1":
        return float(sk.f1_score(y, prediction, zero_division=0))
    if metric in ("f1_macro", "f1_weighted"):
        return float(sk.f1_score(y, prediction, average=metric.removeprefix("f1_"), zero_division=0))
    raise DriftloopError(f"metric {metric!r} cannot decide a rollout; set the spec's gate.metric to one of "
                         "roc_auc, pr_auc, log_loss, accuracy, f1, f1_macro, f1_weighted, rmse, mae, r2")


@dataclass(frozen=True)
class PairedRows:
    """Rows scored by both models in the same pass and labelled: the target and each
    model's probability and prediction, aligned row by row."""

    target: np.ndarray
    served_probability: np.ndarray
    served_prediction: np.ndarray
    shadow_probability: np.ndarray
    shadow_prediction: np.ndarray
    scored_by_both: int  # labelled or not

    @property
    def rows(self) -> int:
        return len(self.target)


@dataclass(frozen=True)
class Comparison:
    """Two models' metric on the same rows. ``difference`` and its interval are oriented
    so that positive means the contender (candidate, or the new champion under guard) is
    better than the incumbent; ``lower``/``upper`` are one-sided bounds, each holding
    with ``confidence``."""

    metric: str
    rows: int
    incumbent: float
    contender: float
    difference: float
    lower: float
    upper: float
    confidence: float
    resamples: int


_BLOCK = 50  # resamples drawn at once: a (block x rows) count matrix, ~8 MB at 20,000 rows


def _weighted_auc(counts: np.ndarray, y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """ROC AUC of each resample, given as row counts (resamples x rows): the scores are
    sorted once, each resample only re-weighs the tie groups (linear, no sort per
    resample). A positive outranks the negatives below it and half of those tied."""
    order = np.argsort(s, kind="stable")
    ordered = s[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    c = counts[:, order]
    positive = y[order].astype(np.float64)
    pos = np.add.reduceat(c * positive, starts, axis=1)
    neg = np.add.reduceat(c * (1.0 - positive), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    den = pos.sum(axis=1) * neg.sum(axis=1)
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _weighted_metric(metric: str, counts: np.ndarray, y: np.ndarray, probability: np.ndarray,
                     prediction: np.ndarray) -> np.ndarray | None:
    """The metric of each resample from row counts, vectorised; None where only the
    per-resample loop knows how (F1, PR AUC)."""
    n = counts.shape[1]
    if metric == "roc_auc":
        return _weighted_auc(counts, y, probability)
    if metric == "log_loss":
        p = np.clip(probability, 1e-15, 1 - 1e-15)
        return -(counts @ (y * np.log(p) + (1 - y) * np.log(1 - p))) / n
    if metric == "accuracy":
        return counts @ (prediction == y).astype(np.float64) / n
    if metric in ("rmse", "mae", "r2"):
        error = prediction.astype(np.float64) - y
        if metric == "mae":
            return counts @ np.abs(error) / n
        sse = counts @ (error**2)
        if metric == "rmse":
            return np.sqrt(sse / n)
        sst = counts @ (y.astype(np.float64) ** 2) - (counts @ y.astype(np.float64)) ** 2 / n
        return np.where(sst > 0, 1 - sse / np.where(sst > 0, sst, 1.0), np.nan)
    return None


def paired_bootstrap(metric: str, target: np.ndarray, incumbent: tuple[np.ndarray, np.ndarray],
                     contender: tuple[np.ndarray, np.ndarray], *, confidence: float,
                     resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Comparison:
    """The contender's advantage over the incumbent on the same rows, with a paired
    bootstrap: each resample draws rows with replacement and scores both models on the
    same draw, so what the rows share (their difficulty) cancels out. ``incumbent`` and
    ``contender`` are (probability, prediction). Seeded: the same rows give the same
    decision. Resamples are row counts (how often each row was drawn), so most metrics are
    computed for a block of resamples at once."""
    n = len(target)
    if n == 0:
        raise DriftloopError("no rows scored by both models are labelled yet; nothing to compare")
    sign = 1.0 if HIGHER_IS_BETTER.get(metric, True) else -1.0
    a = metric_value(metric, target, *incumbent)
    b = metric_value(metric, target, *contender)
    rng = np.random.default_rng(seed)
    parts = []
    for start in range(0, resamples, _BLOCK):
        block = min(_BLOCK, resamples - start)
        drawn = rng.integers(0, n, (block, n)) + (np.arange(block) * n)[:, None]
        counts = np.bincount(drawn.ravel(), minlength=block * n).reshape(block, n).astype(np.float64)
        ours = _weighted_metric(metric, counts, target, *contender)
        theirs = _weighted_metric(metric, counts, target, *incumbent)
        if ours is None or theirs is None:  # the per-resample loop
            rows = [np.repeat(np.arange(n), c.astype(np.int64)) for c in counts]
            ours = np.array([metric_value(metric, target[i], contender[0][i], contender[1][i]) for i in rows])
            theirs = np.array([metric_value(metric, target[i], incumbent[0][i], incumbent[1][i]) for i in rows])
        parts.append(sign * (ours - theirs))
    diffs = np.concatenate(parts)
    diffs = diffs[np.isfinite(diffs)]
    if diffs.size == 0:
        lower = upper = float("nan")
    else:
        lower, upper = (float(v) for v in np.quantile(diffs, [1.0 - confidence, confidence]))
    return Comparison(metric=metric, rows=n, incumbent=a, contender=b, difference=sign * (b - a),
                      lower=lower, upper=upper, confidence=confidence, resamples=resamples)


def compare(metric: str, rows: PairedRows, phase: Phase, *, confidence: float,
            resamples: int = DEFAULT_RESAMPLES) -> Comparison:
    """In the shadow phase the served champion is the incumbent and the candidate the
    contender; under guard the served new champion is the contender."""
    served = (rows.served_probability, rows.served_prediction)
    shadow = (rows.shadow_probability, rows.shadow_prediction)
    incumbent, contender = (served, shadow) if phase == "shadow" else (shadow, served)
    return paired_bootstrap(metric, rows.target, incumbent, contender, confidence=confidence, resamples=resamples)


# --- what a comparison decides ---------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str
    timed_out: bool = False


def _fmt(c: Comparison) -> str:
    return (f"{c.metric} contender {c.contender:.4f} vs incumbent {c.incumbent:.4f} on {c.rows:,} rows: "
            f"difference {c.difference:+.4f}, {c.confidence:.0%} bounds [{c.lower:+.4f}, {c.upper:+.4f}]")


def shadow_decision(comparison: Comparison | None, policy: RolloutPolicy, *, min_improvement: float,
                    age: timedelta) -> Decision:
    """Candidate (contender) vs champion (incumbent) on the shadow rows."""
    shadow = policy.shadow
    assert shadow is not None
    enough = comparison is not None and comparison.rows >= shadow.min_labelled_rows
    if enough and comparison is not None:
        if comparison.lower > min_improvement:
            return Decision("promote", f"candidate better: {_fmt(comparison)} (lower bound above min_improvement "
                                       f"{min_improvement:g})")
        if comparison.upper < 0:
            return Decision("reject", f"candidate worse: {_fmt(comparison)} (upper bound below 0)")
    if age >= timedelta(days=shadow.max_days):
        seen = _fmt(comparison) if comparison is not None else "no labelled rows scored by both"
        verdict: Verdict = "promote" if shadow.on_timeout == "promote" else "reject"
        return Decision(verdict, f"timeout after {shadow.max_days:g} days, on_timeout {shadow.on_timeout}: {seen}",
                        timed_out=True)
    if not enough:
        rows = comparison.rows if comparison is not None else 0
        return Decision("waiting", f"{rows:,} of {shadow.min_labelled_rows:,} labelled rows scored by both"
                        + (f"; so far {_fmt(comparison)}" if comparison is not None else ""))
    assert comparison is not None
    return Decision("waiting", f"not decided with {comparison.confidence:.0%} confidence yet: {_fmt(comparison)}")


def guard_decision(comparison: Comparison | None, policy: RolloutPolicy, *, age: timedelta) -> Decision:
    """New champion (contender) vs the one it replaced (incumbent) after a promotion."""
    guard = policy.guard
    assert guard is not None
    enough = comparison is not None and comparison.rows >= policy.guard_rows
    if enough and comparison is not None and comparison.upper < -guard.tolerance:
        return Decision("rollback", f"new champion worse by more than tolerance {guard.tolerance:g}: "
                                    f"{_fmt(comparison)}")
    if age >= timedelta(days=guard.days):
        seen = _fmt(comparison) if comparison is not None else "no labelled rows scored by both"
        return Decision("settled", f"guard over after {guard.days:g} days: {seen}")
    rows = comparison.rows if comparison is not None else 0
    if not enough:
        return Decision("waiting", f"{rows:,} of {policy.guard_rows:,} labelled rows scored by both"
                        + (f"; so far {_fmt(comparison)}" if comparison is not None else ""))
    assert comparison is not None
    return Decision("waiting", f"no rollback: {_fmt(comparison)}")


# --- where a model stands ----------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutState:
    """The model's phase now: who serves, who scores in shadow, since when, under which
    policy (the candidate's in the shadow phase, the new champion's under guard)."""

    model: str
    phase: Phase
    champion: int | None
    shadow: int | None = None  # the candidate (shadow) or the replaced champion (guard)
    since: datetime | None = None
    policy: RolloutPolicy | None = None
    spec: DatasetSpec | None = None  # the spec whose policy applies

    @property
    def active(self) -> bool:
        return self.phase in ("shadow", "guard") and self.shadow is not None


def rollout_state(registry: object, model: str, spec_of: Callable[[object], DatasetSpec], now: datetime) -> RolloutState:
    """Read the model's phase from its aliases and alias history. ``spec_of`` loads a
    version's registered spec (hash-verified). A candidate wins over a guard: a new
    candidate competes with the champion that serves now."""
    from driftloop.registry.store import RegistryStore

    assert isinstance(registry, RegistryStore)
    aliases = registry.aliases(model)
    champion = aliases.get("champion")
    candidate = aliases.get("candidate")
    if candidate is not None:
        record = registry.get_version(model, candidate)
        spec = spec_of(record)
        since = next((e.created_at for e in reversed(registry.alias_history(model))
                      if e.alias == "candidate" and e.to_version == candidate), record.created_at)
        return RolloutState(model, "shadow", champion, candidate, since, spec.rollout, spec)
    if champion is None:
        return RolloutState(model, "settled", None)
    moves = [e for e in registry.alias_history(model) if e.alias == "champion"]
    last = moves[-1] if moves else None
    if last is None or last.to_version != champion or last.from_version is None or \
            last.reason.startswith(_ROLLBACK_PREFIX):
        return RolloutState(model, "settled", champion)
    spec = spec_of(registry.get_version(model, champion))
    policy = spec.rollout
    if policy is None or policy.guard is None or now - last.created_at >= timedelta(days=policy.guard.days):
        return RolloutState(model, "settled", champion, policy=policy, spec=spec)
    if any(d.verdict == "settled" and d.served_version == champion and d.shadow_version == last.from_version
           and d.created_at >= last.created_at for d in registry.list_rollout_decisions(model, limit=20)):
        return RolloutState(model, "settled", champion, policy=policy, spec=spec)
    return RolloutState(model, "guard", champion, last.from_version, last.created_at, policy, spec)


def rollout_pending(registry: object, model: str, spec: DatasetSpec | None, now: datetime) -> bool:
    """Cheap, from the registry alone: could a decision do anything (a candidate in
    shadow, or a promotion within the guard's days of ``spec``)? Lets the labels and
    monitor flows skip the decision without loading any model."""
    from driftloop.registry.store import RegistryStore

    assert isinstance(registry, RegistryStore)
    if "candidate" in registry.aliases(model):
        return True
    if spec is None or spec.rollout is None or spec.rollout.guard is None:
        return False
    moves = [e for e in registry.alias_history(model) if e.alias == "champion"]
    return bool(moves) and moves[-1].from_version is not None and \
        now - moves[-1].created_at < timedelta(days=spec.rollout.guard.days)


def paired_frame(predictions: pl.LazyFrame, labels: pl.LazyFrame | None, spec: DatasetSpec, *, served_version: int,
                 shadow_version: int, since: datetime | None) -> tuple[pl.DataFrame, int]:
    """The rows both versions scored in the same scoring run (one pass: served and shadow
    rows of one run), newest per id, joined to their latest label. Returns (labelled rows
    with ``target``, ``served_probability``, ``served_prediction``, ``shadow_probability``,
    ``shadow_prediction``; how many ids were scored by both)."""
    from driftloop.tables import MODEL_VERSION, ROLE, SCORED_AT, SCORING_RUN, SERVED

    assert spec.id is not None
    rows = predictions
    if since is not None:
        rows = rows.filter(pl.col(SCORED_AT) >= since)
    keep = [pl.col(spec.id), pl.col(SCORING_RUN), pl.col(SCORED_AT), pl.col("probability"), pl.col("prediction"),
            *([pl.col(spec.timestamp)] if spec.timestamp else [])]
    served = rows.filter((pl.col(ROLE) == SERVED) & (pl.col(MODEL_VERSION) == served_version)).select(keep)
    shadow = rows.filter((pl.col(ROLE) == "shadow") & (pl.col(MODEL_VERSION) == shadow_version)).select(
        pl.col(spec.id), pl.col(SCORING_RUN), pl.col("probability").alias("shadow_probability"),
        pl.col("prediction").alias("shadow_prediction"))
    both = (served.join(shadow, on=[spec.id, SCORING_RUN], how="inner")
            .sort(SCORED_AT, maintain_order=True).unique(subset=[spec.id], keep="last", maintain_order=True)
            .rename({"probability": "served_probability", "prediction": "served_prediction"})
            .collect(engine="streaming"))
    if labels is None:
        return both.head(0).with_columns(pl.lit(None).alias("target")), both.height
    id_type = both.schema[spec.id]
    labelled = both.join(labels.select(pl.col(spec.id).cast(id_type), pl.col(spec.target).alias("target"))
                         .collect(engine="streaming"), on=spec.id, how="inner").sort(spec.id)
    return labelled, both.height


def paired_rows(frame: pl.DataFrame, scored_by_both: int, spec: DatasetSpec) -> PairedRows:
    """Arrays for :func:`compare`; multiclass labels compared as text."""
    def values(column: str) -> np.ndarray:
        series = frame[column]
        if spec.task == "multiclass_classification":
            return series.cast(pl.String).to_numpy()
        return series.cast(pl.Float64).to_numpy()

    return PairedRows(target=values("target"), served_probability=frame["served_probability"].cast(pl.Float64).to_numpy(),
                      served_prediction=values("served_prediction"),
                      shadow_probability=frame["shadow_probability"].cast(pl.Float64).to_numpy(),
                      shadow_prediction=values("shadow_prediction"), scored_by_both=scored_by_both)


@dataclass(frozen=True)
class PairedChunk:
    """One chunk of the paired rows (in time order): each model's metric on the same rows."""

    label: str
    rows: int
    served: float
    shadow: float


def paired_chunks(frame: pl.DataFrame, spec: DatasetSpec, *, chunks: int = 6) -> list[PairedChunk]:
    """The paired labelled rows cut into ``chunks`` equal parts by time (by id without a
    timestamp), each model's gate metric per part: what the monitoring and rollout
    artifacts chart."""
    if frame.height == 0:
        return []
    order = spec.timestamp if spec.timestamp and spec.timestamp in frame.columns else spec.id
    rows = paired_rows(frame.sort(order), frame.height, spec)
    bounds = np.linspace(0, frame.height, min(chunks, frame.height) + 1).astype(int)
    keys = frame.sort(order)[order]
    out = []
    for start, end in itertools.pairwise(bounds):
        if end <= start:
            continue
        part = slice(start, end)
        y = rows.target[part]
        out.append(PairedChunk(
            label=f"{str(keys[int(start)])[:10]} .. {str(keys[int(end) - 1])[:10]}", rows=int(end - start),
            served=metric_value(spec.gate_metric, y, rows.served_probability[part], rows.served_prediction[part]),
            shadow=metric_value(spec.gate_metric, y, rows.shadow_probability[part], rows.shadow_prediction[part])))
    return out
