"""Drift thresholds with a known false-alarm rate, calibrated on the reference.

NannyML's default thresholds are the reference chunks' mean ± 3 standard deviations,
estimated from the handful of chunks a holdout makes (4 or 5): they fire by chance on a
stationary stream. Here each statistic's distribution under no drift is estimated by
resampling: ``draws`` chunks of the analysis chunk size are drawn with replacement from
the reference and run through the same fitted NannyML calculators. The thresholds are
set so that a chunk from the reference's distribution raises any univariate alert with
probability ``alert_rate`` (family-wise over the features × methods, Bonferroni) and the
multivariate alert with probability ``alert_rate``.

- Univariate statistics (distances between a chunk's and the reference's distribution):
  a gamma distribution is fitted to the squared distances (see ``_gamma_quantile``). A
  chunk drawn from the reference is compared with that same reference, so its distance
  lacks the reference's own sampling noise; distances shrink like 1/sqrt(n), so they are
  scaled by sqrt(1 + chunk / reference rows) to stand for an independent chunk.
- The multivariate statistic is a chunk's mean reconstruction error: a mean of many
  rows, fitted with a normal distribution. Rows the reconstruction was fitted on
  reconstruct better than new ones, so it is fitted on one half of the reference and
  the chunks are drawn from the other, both ways round, for several random halvings;
  how much the fold means differ measures how much the fitted reconstruction itself
  varies (see ``multivariate_threshold``).

A chunk smaller than the chunk size (the last one, typically) is reported without
alerts: its statistics are noisier than the thresholds were set for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist, fmean, median, pstdev
from typing import Any

# Distances that shrink like 1/sqrt(rows) under no drift (chi2 is a test statistic whose
# null distribution does not depend on the chunk size).
_DISTANCES = {"jensen_shannon", "hellinger", "kolmogorov_smirnov", "wasserstein", "l_infinity"}


@dataclass
class Calibration:
    alert_rate: float
    draws: int
    chunk_rows: int
    reference_rows: int
    checks: int  # univariate features x methods sharing the family-wise rate
    univariate: dict[tuple[str, str], float] = field(default_factory=dict)  # (feature, method) -> upper threshold
    multivariate: float | None = None

    def describe(self) -> str:
        return (
            f"alert thresholds calibrated on {self.draws} chunks of {self.chunk_rows:,} rows resampled from the "
            f"reference ({self.reference_rows:,} rows): a chunk without drift raises a univariate alert (any of "
            f"{self.checks} feature checks) with probability {self.alert_rate:g}, and the multivariate alert with "
            f"probability {self.alert_rate:g}"
        )

    def as_record(self) -> dict[str, Any]:
        return {
            "method": "bootstrap", "alert_rate": self.alert_rate, "draws": self.draws, "chunk_rows": self.chunk_rows,
            "reference_rows": self.reference_rows, "checks": self.checks,
            "univariate": {f"{name}/{method}": t for (name, method), t in self.univariate.items()},
            "multivariate": self.multivariate,
        }


def resample(reference: Any, *, chunk_rows: int, draws: int, seed: int) -> Any:
    """``draws`` chunks of ``chunk_rows`` reference rows, drawn with replacement, in one
    frame for NannyML's size-based chunker."""
    return reference.sample(n=chunk_rows * draws, replace=True, random_state=seed).reset_index(drop=True)


MULTIVARIATE_SPLITS = 4  # random halvings of the reference for the multivariate calibration


def cross_halves(reference: Any, *, splits: int) -> list[tuple[Any, Any]]:
    """``splits`` random halvings of the reference, each as (fit, held out) both ways round."""
    folds = []
    for seed in range(splits):
        shuffled = reference.sample(frac=1.0, random_state=seed)
        half = len(shuffled) // 2
        first, second = shuffled.iloc[:half].reset_index(drop=True), shuffled.iloc[half:].reset_index(drop=True)
        folds += [(first, second), (second, first)]
    return folds


def univariate_thresholds(null_rows: list[dict[str, Any]], *, alert_rate: float, chunk_rows: int,
                          reference_rows: int) -> dict[tuple[str, str], float]:
    """Per (feature, method): the upper threshold for a family-wise ``alert_rate``."""
    samples: dict[tuple[str, str], list[float]] = {}
    for row in null_rows:
        if row["value"] is not None:
            samples.setdefault((row["name"], row["method"]), []).append(row["value"])
    if not samples:
        return {}
    quantile = 1 - alert_rate / len(samples)
    out = {}
    for (name, method), values in samples.items():
        if method in _DISTANCES:
            scale = math.sqrt(1 + chunk_rows / reference_rows)
            out[(name, method)] = math.sqrt(_gamma_quantile([v * v for v in values], quantile)) * scale
        else:
            out[(name, method)] = _gamma_quantile(values, quantile)
    return out


def _gamma_quantile(values: list[float], quantile: float) -> float:
    """The ``quantile`` of a gamma distribution with the values' mean and variance. A
    squared distance between a chunk's and the reference's distribution is close to a
    scaled chi-square under no drift (a gamma), whatever its degrees of freedom: two
    levels of a flag give shape 1/2, many histogram bins a large shape. Its far tail is
    what the draws alone cannot resolve (1 - 0.01 / 7 needs thousands of them)."""
    from scipy.stats import gamma

    mean, var = fmean(values), pstdev(values) ** 2
    if var <= 0 or mean <= 0:
        return max(values) * (1 + 1e-9)  # no spread: anything above what was seen
    return float(gamma.ppf(quantile, mean * mean / var, scale=var / mean))


def multivariate_threshold(folds: list[list[float]], *, alert_rate: float, chunk_rows: int,
                           reference_rows: int) -> float | None:
    """The chunk-mean reconstruction error a chunk without drift exceeds with probability
    ``alert_rate``: a prediction bound around the folds' mean. Its spread adds to the chunk
    means' own variance (within a fold) the uncertainty of the centre: the reference's
    rows are a sample (chunk / reference rows of the chunk variance) and the fitted
    reconstruction varies with them (the fold means' variance, halved for a fit on the
    whole reference)."""
    folds = [f for f in folds if len(f) >= 2]
    if len(folds) < 2:
        return None
    # Medians: one unlucky halving (a reconstruction that kept one component fewer) must
    # not move the threshold for everyone.
    means = [fmean(f) for f in folds]
    centre = median(means)
    within = median([pstdev(f) ** 2 for f in folds])
    between = (1.4826 * median([abs(m - centre) for m in means])) ** 2
    spread = math.sqrt(within * (1 + chunk_rows / reference_rows) + between / 2)
    return centre + NormalDist().inv_cdf(1 - alert_rate) * spread


def apply_thresholds(results: list[dict[str, Any]], calibration: Calibration, partial: set[int]) -> list[dict[str, Any]]:
    """The results with the calibrated thresholds and alerts (drift rows), and no alert in
    a partial chunk (any row)."""
    out = []
    for row in results:
        row = dict(row)
        threshold = None
        if row["kind"] == "univariate":
            threshold = calibration.univariate.get((row["name"], row["method"]))
        elif row["kind"] == "multivariate":
            threshold = calibration.multivariate
        if threshold is not None:
            row["lower_threshold"], row["upper_threshold"] = None, threshold
            row["alert"] = row["value"] is not None and row["value"] > threshold
        if row["chunk_index"] in partial:
            row["alert"] = False
        out.append(row)
    return out


def partial_chunks(sizes: dict[int, int], chunk_rows: int | None) -> dict[int, int]:
    """Chunks smaller than the chunk size (period chunks: smaller than half the median
    chunk), with their rows."""
    if not sizes:
        return {}
    if chunk_rows is None:
        ordered = sorted(sizes.values())
        floor = ordered[len(ordered) // 2] / 2
        return {i: n for i, n in sizes.items() if n < floor}
    return {i: n for i, n in sizes.items() if n < chunk_rows}
