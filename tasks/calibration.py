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

- Realized performance (where labels arrived): the same resampled chunks go through
  NannyML's PerformanceCalculator; a normal fitted to each metric's chunk values, widened
  for the reference's own sampling noise like the multivariate statistic, gives the bad
  side's threshold (lower where higher is better) that a chunk without degradation
  crosses with probability ``alert_rate`` (per metric). NannyML's own realized thresholds
  are the reference chunks' mean ± 3 sd from 4-5 chunks.

A chunk smaller than the chunk size (the last one, typically) is reported without
alerts: its statistics are noisier than the thresholds were set for.

The draws are made chunk by chunk (the same random stream as one large draw, so the same
rows) and run through the calculators a few chunks at a time: memory holds a few chunks,
not ``draws`` of them. The thresholds depend only on the reference, the chunk size and the
policy, so they are computed once and stored (:class:`CalibrationStore`): a JSON document
in the artifact store under ``calibrations/<model>/``, named by the reference's sha256,
the chunk size and a hash of what else they depend on, and checked against its own
sha256 before it is trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from statistics import NormalDist, fmean, median, pstdev
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import polars as pl

    from driftloop.storage import ArtifactStore

logger = logging.getLogger(__name__)

# Part of every stored calibration's key: bump it when the method or its constants change,
# so calibrations made the old way are recomputed rather than trusted.
CALIBRATION_VERSION = 2

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
    # Our realized metric name -> (lower, upper) threshold: only the bad side is set.
    realized: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)

    def describe(self) -> str:
        return (
            f"alert thresholds calibrated on {self.draws} chunks of {self.chunk_rows:,} rows resampled from the "
            f"reference ({self.reference_rows:,} rows): a chunk without drift raises a univariate alert (any of "
            f"{self.checks} feature checks) with probability {self.alert_rate:g}, and the multivariate alert with "
            f"probability {self.alert_rate:g}"
            + (f"; realized {', '.join(sorted(self.realized))} below (above, where lower is better) its threshold "
               f"with probability {self.alert_rate:g} each" if self.realized else "")
        )

    def as_record(self) -> dict[str, Any]:
        return {
            "method": "bootstrap", "alert_rate": self.alert_rate, "draws": self.draws, "chunk_rows": self.chunk_rows,
            "reference_rows": self.reference_rows, "checks": self.checks,
            "univariate": {f"{name}/{method}": t for (name, method), t in self.univariate.items()},
            "multivariate": self.multivariate,
            "realized": {name: {"lower": lower, "upper": upper} for name, (lower, upper) in self.realized.items()},
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Calibration:
        """The calibration :meth:`as_record` wrote (feature names may hold "/": the method is
        after the last one)."""
        return cls(
            alert_rate=float(record["alert_rate"]), draws=int(record["draws"]), chunk_rows=int(record["chunk_rows"]),
            reference_rows=int(record["reference_rows"]), checks=int(record["checks"]),
            univariate={tuple(key.rsplit("/", 1)): float(t) for key, t in record["univariate"].items()},  # type: ignore[misc]
            multivariate=None if record["multivariate"] is None else float(record["multivariate"]),
            realized={name: (_opt(b.get("lower")), _opt(b.get("upper"))) for name, b in record.get("realized", {}).items()},
        )


def _opt(value: Any) -> float | None:
    return None if value is None else float(value)


def resample(reference: Any, *, chunk_rows: int, draws: int, seed: int) -> Any:
    """``draws`` chunks of ``chunk_rows`` reference rows, drawn with replacement, in one
    frame for NannyML's size-based chunker."""
    return reference.sample(n=chunk_rows * draws, replace=True, random_state=seed).reset_index(drop=True)


def resample_batches(reference: Any, *, chunk_rows: int, draws: int, seed: int, batch: int) -> Iterator[Any]:
    """The rows of :func:`resample`, ``batch`` chunks at a time: pandas draws positions
    with ``RandomState(seed).randint`` (``DataFrame.sample``), one stream however it is
    cut, so the batches hold exactly the same rows in the same order while memory holds
    ``batch`` chunks instead of ``draws``."""
    import numpy as np

    rng = np.random.RandomState(seed)
    done = 0
    while done < draws:
        count = min(batch, draws - done)
        positions = rng.randint(0, len(reference), size=chunk_rows * count)
        yield reference.take(positions).reset_index(drop=True)
        done += count


MULTIVARIATE_SPLITS = 4  # random halvings of the reference for the multivariate calibration


def cross_halves(reference: Any, *, splits: int) -> Iterator[tuple[Any, Any]]:
    """``splits`` random halvings of the reference, each as (fit, held out) both ways round,
    one halving at a time."""
    for seed in range(splits):
        shuffled = reference.sample(frac=1.0, random_state=seed)
        half = len(shuffled) // 2
        first, second = shuffled.iloc[:half].reset_index(drop=True), shuffled.iloc[half:].reset_index(drop=True)
        del shuffled
        yield first, second
        yield second, first


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


def realized_thresholds(null_rows: list[dict[str, Any]], *, alert_rate: float, chunk_rows: int, reference_rows: int,
                        higher_is_better: dict[str, bool]) -> dict[str, tuple[float | None, float | None]]:
    """Per realized metric (our name): the bad side's threshold a chunk without degradation
    crosses with probability ``alert_rate``. The chunks' values around their mean, widened
    like the multivariate statistic's for the reference's own sampling noise (its value is
    an estimate from ``reference_rows`` rows)."""
    samples: dict[str, list[float]] = {}
    for row in null_rows:
        if row["value"] is not None:
            samples.setdefault(row["name"], []).append(row["value"])
    out: dict[str, tuple[float | None, float | None]] = {}
    z = NormalDist().inv_cdf(1 - alert_rate)
    for name, values in samples.items():
        if len(values) < 2:
            continue
        spread = pstdev(values) * math.sqrt(1 + chunk_rows / reference_rows)
        centre = fmean(values)
        out[name] = (centre - z * spread, None) if higher_is_better.get(name, True) else (None, centre + z * spread)
    return out


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
        elif row["kind"] == "realized" and row["name"] in calibration.realized:
            lower, upper = calibration.realized[row["name"]]
            row["lower_threshold"], row["upper_threshold"] = lower, upper
            value = row["value"]
            row["alert"] = value is not None and (
                (lower is not None and value < lower) or (upper is not None and value > upper))
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


class _HashSink:
    """A write-only file that only hashes what is written (Arrow IPC without the bytes)."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.closed = False

    def write(self, data: Any) -> int:
        self.digest.update(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def frame_sha256(frame: pl.DataFrame) -> str:
    """sha256 of a frame's content (columns, dtypes, rows in order) as an Arrow IPC stream,
    hashed as it is written: nothing the size of the frame is held."""
    import polars as pl
    import pyarrow as pa

    sink = _HashSink()
    # Canonical bytes: one chunk, strings as plain offsets + data (polars' string views
    # lay their buffers out as the strings were built, so equal frames could hash apart).
    strings = [c for c, t in frame.schema.items() if t in (pl.String, pl.Categorical, pl.Enum)]
    frame = frame.with_columns(pl.col(strings).cast(pl.String)).rechunk()
    table = frame.to_arrow(compat_level=pl.CompatLevel.oldest())
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=65_536)
    return sink.digest.hexdigest()


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class CalibrationKey:
    """What a calibration depends on: the reference's content, the chunk size, and the
    policy fields, spec columns and method version that change the thresholds."""

    reference_sha256: str
    chunk_rows: int
    settings: dict[str, Any]  # JSON-able: alert rate, draws, methods, features, metrics, versions

    @property
    def settings_sha256(self) -> str:
        return hashlib.sha256(_canonical(self.settings)).hexdigest()

    @property
    def name(self) -> str:
        return f"{self.reference_sha256[:16]}-c{self.chunk_rows}-p{self.settings_sha256[:12]}"


class CalibrationStore:
    """Calibrations of one model's references in the artifact store:
    ``calibrations/<model>/<reference sha256[:16]>-c<chunk rows>-p<settings sha256[:12]>.json``.
    Each document carries its full key and the sha256 of its body; one that does not parse,
    does not match its sha256 or is for another key is not trusted (recomputed, with a
    warning). ``loaded`` and ``saved`` count what this instance did."""

    def __init__(self, store: ArtifactStore, model_name: str) -> None:
        self.store = store
        self.model_name = model_name
        self.loaded = 0
        self.saved = 0

    def relpath(self, key: CalibrationKey) -> str:
        return f"calibrations/{self.model_name}/{key.name}.json"

    def load(self, key: CalibrationKey) -> Calibration | None:
        relpath = self.relpath(key)
        if not self.store.exists(relpath):
            return None
        try:
            with self.store.fs.open(self.store.path(relpath), "rb") as fh:
                document = json.loads(fh.read())
            body = document["body"]
            if hashlib.sha256(_canonical(body)).hexdigest() != document["sha256"]:
                raise ValueError("its sha256 does not match its content")
            expected = {"reference_sha256": key.reference_sha256, "chunk_rows": key.chunk_rows,
                        "settings_sha256": key.settings_sha256}
            found = {k: body.get(k) for k in expected}
            if found != expected:
                raise ValueError(f"it is for {found}, not {expected}")
            calibration = Calibration.from_record(body["calibration"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # json errors are ValueErrors
            logger.warning("stored calibration %s is not usable (%s): recalibrating and replacing it",
                           self.store.uri(relpath), exc)
            return None
        self.loaded += 1
        return calibration

    def save(self, key: CalibrationKey, calibration: Calibration) -> str:
        body = {"reference_sha256": key.reference_sha256, "chunk_rows": key.chunk_rows,
                "settings_sha256": key.settings_sha256, "settings": key.settings,
                "calibration": calibration.as_record()}
        document = {"sha256": hashlib.sha256(_canonical(body)).hexdigest(), "body": body}
        uri = self.store.write_bytes(self.relpath(key), json.dumps(document, indent=1, sort_keys=True).encode())
        self.saved += 1
        return uri
