"""Replay of the loop's retraining decisions, in process, with the code the flows run.

A retrain is deterministic given the period it runs at and its window: the training
window comes from :func:`driftloop.feedback.select_window` on the labelled rows known
then, and the model from the training steps of ``flows/train.py`` (split, encoding,
Optuna tuning with a fixed seed, fit, ONNX export). So each period's model is trained
once (:class:`Models`) and every strategy is replayed on top of it (:func:`replay`):

- **never**: the first model serves every period;
- **every**: the ``retrain`` flow's steps every period (window, ``min_new_labels``, gate);
- **driftloop**: the ``monitor`` flow's steps on the last period's scored rows joined to
  their labels (:func:`driftloop.tasks.monitor.monitor_analysis` and
  :func:`driftloop.tasks.monitor_policy.decide_retraining`, calibrations stored like the
  flow stores them), and the retrain's steps when the policy fires.

The gate is :func:`driftloop.tasks.gate.decide_promotion` on the challenger's holdout
with the champion scored by its ONNX artifact, as ``train_and_register`` does. Nothing
here re-implements a decision; ``tests/flows/test_backtest_replay.py`` checks that the
replay's decisions equal the flows' on a shortened world.

:func:`window_backtest` is the same machinery on a model's own registered history
(``driftloop backtest``, and ``retrain: {window: {choose: [...]}}``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import polars as pl
from prefect import task
from prefect.cache_policies import NONE

from driftloop.backtest import WindowChoice, WindowFigures, schedule_cost, serving
from driftloop.feedback import (
    REGISTERED_AT,
    SOURCE,
    LabelledData,
    LabelledWindow,
    champion_data_end,
    join_labels,
    select_window,
    training_columns,
    window_reach,
)
from driftloop.schema import POLARS_DTYPES
from driftloop.spec import DatasetSpec, RetrainPolicy, TrainingWindow

logger = logging.getLogger(__name__)

MAX_PERIODS = 12  # a window backtest replays at most this many labelled periods
Strategy = Literal["never", "every", "driftloop"]
STRATEGIES: tuple[Strategy, ...] = ("never", "every", "driftloop")


@dataclass
class TrainedModel:
    """What a (re)train at ``period`` produced: the ONNX artifact, its metrics and
    holdout, and the monitoring reference registration would store."""

    period: int
    onnx: bytes
    metrics: dict[str, float]
    holdout: pl.DataFrame
    reference: pl.DataFrame
    classes: tuple[str, ...] | None
    data_end: datetime | None
    content_hash: str | None = None  # the window's rows (None: the first model's dataset)
    window: dict[str, Any] | None = None
    _loaded: Any = None
    _monitor_fit: tuple[DatasetSpec, Any] | None = None

    def monitor_fit(self, spec: DatasetSpec) -> Any:
        """NannyML's calculators fitted on this model's reference with ``spec.monitoring``,
        fitted once per spec and reused for every period this model is monitored on (the
        flow fits them per run; the results are the same)."""
        from driftloop.tasks.monitor import fit_monitoring

        if self._monitor_fit is None or self._monitor_fit[0] != spec:
            self._monitor_fit = (spec, fit_monitoring(self.reference, spec, spec.monitoring))
        return self._monitor_fit[1]

    def loaded(self) -> Any:
        from driftloop.onnx_model import load_model

        if self._loaded is None:
            self._loaded = load_model(self.onnx)
        return self._loaded

    def scores(self, frame: pl.DataFrame) -> np.ndarray:
        from driftloop.onnx_model import predict_scores

        return predict_scores(self.loaded(), frame)


def train_model(spec: DatasetSpec, frame: pl.DataFrame, *, period: int, trials: int,
                algorithms: Sequence[str] = ("lightgbm",), seed: int = 0,
                window: LabelledWindow | None = None) -> TrainedModel:
    """``train_and_register``'s training steps without the registry: split -> encoding ->
    tune (Optuna, in memory, seeded like the flow's study) -> fit -> holdout metrics ->
    ONNX export -> the reference (the holdout scored by the artifact, with its target)."""
    import optuna

    from driftloop.tasks.evaluate import evaluate_scores
    from driftloop.tasks.export import build_onnx, native_scores
    from driftloop.tasks.fit import fit_model, prepare_training_data
    from driftloop.tasks.ingest import frame_content_hash
    from driftloop.tasks.score import prediction_frame
    from driftloop.tasks.split import split_dataset
    from driftloop.tasks.tune import tune

    split = split_dataset(frame, spec, seed=seed)
    data, encoding, classes = prepare_training_data(spec, split.train, split.valid)
    fitted = []
    for algorithm in dict.fromkeys(algorithms):
        tuned = tune(algorithm, data, study_name=f"{spec.name}-{algorithm}-replay-{period}",  # type: ignore[arg-type]
                     storage=optuna.storages.InMemoryStorage(), n_trials=trials, seed=seed)
        fitted.append(fit_model(algorithm, tuned.best_params, data, seed=seed))  # type: ignore[arg-type]
    best = min(fitted, key=lambda f: f.valid_loss)
    holdout_scores = native_scores(best, encoding.matrix(split.holdout), spec.task)
    if spec.task == "binary_classification" and holdout_scores.ndim == 2:
        holdout_scores = holdout_scores[:, 1]
    metrics, _ = evaluate_scores(spec, split.holdout, holdout_scores, classes)
    onnx = build_onnx(best, encoding, spec, {"model": spec.name, "spec": spec.model_dump(mode="json"),
                                             "spec_hash": spec.fingerprint(), "dataset_id": f"replay-{period}",
                                             "classes": list(classes) if classes else None})
    model = TrainedModel(period, onnx, metrics, split.holdout, pl.DataFrame(), classes,
                         champion_data_end(split.boundaries, window.record.model_dump() if window else None),
                         frame_content_hash(window.frame) if window else None,
                         window.record.model_dump() if window else None)
    reference = prediction_frame(model.loaded(), spec, split.holdout, model.scores(split.holdout),
                                 model_name=spec.name, model_version=period + 1, scored_at=datetime.now(UTC))
    model.reference = reference.with_columns(split.holdout[spec.target])
    return model


def labelled_data(spec: DatasetSpec, periods: Sequence[pl.DataFrame], policy: RetrainPolicy | None = None) -> LabelledData:
    """The labelled rows a retrain finds in the registry when ``periods`` have been
    labelled: the first as a labelled dataset, the others as scored rows joined to their
    labels (the same columns and types as :func:`driftloop.feedback.collect_labelled_data`,
    which with a ``last`` window ``policy`` does not read scored rows older than
    :func:`driftloop.feedback.window_reach`)."""
    columns = training_columns(spec)
    frames = []
    for i, frame in enumerate(periods):
        frames.append(frame.select(pl.col(c).cast(POLARS_DTYPES[spec.column_spec(c).dtype]) for c in columns)
                      .with_columns(pl.lit(f"period-{i}").alias(SOURCE),
                                    pl.lit(datetime(2000 + i, 1, 1)).dt.cast_time_unit("us").alias(REGISTERED_AT)))
    if spec.timestamp and len(frames) > 1:
        since = window_reach(max(f[spec.timestamp].max() for f in frames), policy)  # type: ignore[type-var]
        if since is not None:
            frames = [frames[0], *(f.filter(pl.col(spec.timestamp) >= since) for f in frames[1:])]
    return LabelledData(frame=pl.concat(frames), datasets=["period-0"],
                        scoring_runs=[f"period-{i}" for i in range(1, len(periods))])


class Models:
    """Each period's model, trained once: the first on period 0, the retrain at ``s`` on
    the spec's window of the periods labelled before ``s`` (labels one period late)."""

    def __init__(self, spec: DatasetSpec, periods: Sequence[pl.DataFrame], *, trials: int,
                 algorithms: Sequence[str] = ("lightgbm",), seed: int = 0, label_delay: int = 1) -> None:
        self.spec, self.periods, self.trials = spec, list(periods), trials
        self.algorithms, self.seed, self.label_delay = tuple(algorithms), seed, label_delay
        self._models: dict[int, TrainedModel] = {}
        self._scores: dict[tuple[int, int], np.ndarray] = {}
        self._registered: DatasetSpec | None = None

    @property
    def horizon(self) -> int:
        return len(self.periods)

    @property
    def registered(self) -> DatasetSpec:
        """The spec as a retrain and monitoring read it: from the first model's artifact
        (its column order, hence the feature order a retrain encodes, is the artifact's)."""
        if self._registered is None:
            self._registered = self.at(0).loaded().spec()
        return self._registered

    def window_at(self, s: int, champion: TrainedModel | None = None) -> LabelledWindow:
        """The retrain window at period ``s`` (``select_window`` on what is labelled by then)."""
        spec = self.registered
        labelled = labelled_data(spec, self.periods[: s - self.label_delay + 1], spec.retrain)
        end = champion.data_end if champion is not None else None
        return select_window(labelled, spec, spec.retrain, champion_end=end)

    def at(self, s: int) -> TrainedModel:
        if s not in self._models:
            if s == 0:
                data = labelled_data(self.spec, self.periods[:1]).frame.select(training_columns(self.spec))
                self._models[0] = train_model(self.spec, data, period=0, trials=self.trials,
                                              algorithms=self.algorithms, seed=self.seed)
            else:
                window = self.window_at(s)
                self._models[s] = train_model(self.registered, window.frame, period=s, trials=self.trials,
                                              algorithms=self.algorithms, seed=self.seed, window=window)
        return self._models[s]

    def scores(self, s: int, t: int) -> np.ndarray:
        if (s, t) not in self._scores:
            self._scores[(s, t)] = self.at(s).scores(self.periods[t])
        return self._scores[(s, t)]

    def auc(self, s: int, t: int) -> float:
        from sklearn.metrics import roc_auc_score

        y = self.periods[t][self.spec.target].to_numpy()
        return float(roc_auc_score(y, self.scores(s, t)))

    def retrain_periods(self) -> list[int]:
        """Periods a retrain may run at: once a labelled period beyond the first exists."""
        return list(range(1 + self.label_delay, self.horizon))

    def matrix(self) -> np.ndarray:
        """``auc[s, t]`` for the first model and every retrain, on every period from theirs."""
        out = np.full((self.horizon, self.horizon), np.nan)
        for s in [0, *self.retrain_periods()]:
            for t in range(max(s, 1), self.horizon):
                out[s, t] = self.auc(s, t)
        return out


@dataclass
class PeriodDecision:
    """What a strategy did before serving ``period``."""

    period: int
    fired: bool = False  # the policy fired (every: always; never: never)
    trained: bool = False  # a challenger was trained (a paid retrain)
    promoted: bool = False
    reason: str = ""
    serving: int = 0  # the retrain period of the model serving this period (0: the first)


@dataclass
class StrategyRun:
    strategy: str
    decisions: list[PeriodDecision] = field(default_factory=list)

    @property
    def trainings(self) -> int:
        return sum(d.trained for d in self.decisions)

    @property
    def deployed(self) -> list[int]:
        return [d.period for d in self.decisions if d.promoted]

    def cost(self, auc: np.ndarray, alpha: float) -> float:
        periods = [d.period for d in self.decisions]
        assert serving(self.deployed, periods) == [d.serving for d in self.decisions]
        return schedule_cost(auc, self.deployed, alpha, periods, trainings=self.trainings)


def monitor_period(models: Models, champion: TrainedModel, t: int, calibrations: Any) -> tuple[bool, str]:
    """The ``monitor`` flow's decision on period ``t`` as scored by ``champion``, with its
    labels: NannyML against the champion's reference, then the policy."""
    from driftloop.tasks.monitor import monitor_analysis
    from driftloop.tasks.monitor_policy import decide_retraining
    from driftloop.tasks.score import prediction_frame

    spec = models.registered
    frame = models.periods[t]
    scored = prediction_frame(champion.loaded(), spec, frame, models.scores(champion.period, t), model_name=spec.name,
                              model_version=champion.period + 1, scored_at=datetime.now(UTC))
    assert spec.id is not None
    analysis = join_labels(scored, frame.select(spec.id, spec.target), spec)
    report = monitor_analysis(champion.monitor_fit(spec), analysis, with_plots=False, calibrations=calibrations)
    decision = decide_retraining(report, spec.monitoring, gate=spec.gate, gate_metric=spec.gate_metric)
    return decision.fired, "; ".join(decision.reasons)


def retrain_period(models: Models, champion: TrainedModel, s: int) -> PeriodDecision:
    """The ``retrain`` flow's steps at period ``s``: window, ``min_new_labels``, nothing
    new, train (from the cache), gate against the champion on the challenger's holdout."""
    from driftloop.tasks.evaluate import evaluate_scores, same_predictions
    from driftloop.tasks.gate import decide_promotion
    from driftloop.tasks.ingest import frame_content_hash

    spec = models.registered
    window = models.window_at(s, champion)
    needed = spec.retrain.min_new_labels
    if window.record.new_labels < needed:
        return PeriodDecision(s, reason=f"waiting for labels: {window.record.new_labels} of {needed}")
    if champion.content_hash is not None and frame_content_hash(window.frame) == champion.content_hash:
        return PeriodDecision(s, reason="nothing new")
    challenger = models.at(s)
    champion_metrics = evaluate_scores(spec, challenger.holdout, champion.scores(challenger.holdout), challenger.classes)[0]
    clone = same_predictions(champion.onnx, challenger.onnx, challenger.holdout)
    gate = decide_promotion(challenger.metrics, spec.gate, spec.gate_metric, champion=champion_metrics,
                            champion_version=champion.period + 1, min_improvement=spec.retrain.min_improvement,
                            identical_to_champion=clone)
    return PeriodDecision(s, trained=True, promoted=gate.passed, reason="; ".join(gate.reasons))


def replay(models: Models, strategy: Strategy, *, calibrations: Any = None) -> StrategyRun:
    """One strategy over the world's periods 1..T-1 (see the module docstring)."""
    run = StrategyRun(strategy)
    champion = models.at(0)
    for t in range(1, models.horizon):
        decision = PeriodDecision(t)
        if t in models.retrain_periods() and strategy != "never":
            fired, why = (True, "every period") if strategy == "every" else \
                monitor_period(models, champion, t - models.label_delay, calibrations)
            if fired:
                decision = retrain_period(models, champion, t)
                decision.reason = f"{why} -> {decision.reason}"
            else:
                decision.reason = why
            decision.fired = fired
            if decision.promoted:
                champion = models.at(t)
        decision.serving = champion.period
        run.decisions.append(decision)
    return run


def memory_calibrations(model_name: str) -> Any:
    """A calibration store in a temporary folder: each reference's thresholds computed
    once per replay, as the monitor flow stores them once per reference."""
    import tempfile

    from driftloop.storage import ArtifactStore
    from driftloop.tasks.calibration import CalibrationStore

    return CalibrationStore(ArtifactStore(tempfile.mkdtemp(prefix="driftloop-replay-")), model_name)


# --- a model's own history: which window to retrain on -----------------------------------


def window_label(window: TrainingWindow) -> str:
    return window.last if window.last is not None else ("all" if window.all else f"{window.rows} rows")


def parse_window(text: str) -> TrainingWindow:
    """``31d``, ``92d`` or ``all`` as a training window."""
    text = text.strip()
    return TrainingWindow(all=True) if text == "all" else TrainingWindow(last=text)


def history_periods(frame: pl.DataFrame, spec: DatasetSpec, period: str = "1mo") -> list[tuple[datetime, pl.DataFrame]]:
    """A model's labelled rows cut into calendar periods by the spec's timestamp."""
    assert spec.timestamp is not None
    ts = spec.timestamp
    keyed = frame.sort(ts).with_columns(pl.col(ts).dt.truncate(period).alias("_period"))
    return [(key[0], part.drop("_period")) for key, part in keyed.group_by("_period", maintain_order=True)]


def window_backtest(spec: DatasetSpec, labelled: pl.DataFrame, windows: Sequence[TrainingWindow], *, alpha: float,
                    trials: int, algorithms: Sequence[str] = ("lightgbm",), seed: int = 0, period: str = "1mo",
                    max_periods: int = MAX_PERIODS, model: str | None = None,
                    version: int | None = None) -> WindowChoice:
    """Replay retraining on ``labelled`` (the model's labelled rows, one per id) under each
    window: at the end of each labelled period (after the first) a retrain on the window
    of the rows up to then, judged on the next period. Cost per window: sum of
    (1 - metric) over the judged periods plus ``alpha`` per retrain. The window with the
    least cost is chosen (the first listed on a tie; with fewer than two labelled
    periods nothing can be judged and the first is chosen, with that reason). Only the
    newest ``max_periods`` periods are replayed (each costs one training per window)."""
    from driftloop.metrics import HIGHER_IS_BETTER
    from driftloop.tasks.evaluate import evaluate_scores

    metric = spec.gate_metric
    cut = history_periods(labelled, spec, period)[-max_periods:]
    figures = []
    for window in windows:
        policy = RetrainPolicy(window=window, skip_recent=spec.retrain.skip_recent, min_new_labels=0,
                               min_improvement=spec.retrain.min_improvement)
        windowed = spec.model_copy(update={"retrain": policy})
        realized: list[float | None] = []
        for i in range(1, len(cut)):
            known = [part for _, part in cut[:i]]
            data = labelled_data(windowed, known, policy)
            chosen = select_window(data, windowed, policy)
            value: float | None = None
            try:
                trained = train_model(windowed, chosen.frame, period=i, trials=trials, algorithms=algorithms, seed=seed,
                                      window=chosen)
                nxt = cut[i][1]
                value = evaluate_scores(windowed, nxt, trained.scores(nxt), trained.classes)[0].get(metric)
            except Exception as exc:  # noqa: BLE001 - a window too small to train on scores as missing
                logger.warning("window %s at period %s: %s", window_label(window), cut[i][0], exc)
            realized.append(None if value is None or math.isnan(value) else float(value))
        known_values = [v for v in realized if v is not None]
        loss = [(1 - v) if HIGHER_IS_BETTER.get(metric, True) else v for v in known_values]
        complete = len(known_values) == len(realized) and realized
        figures.append(WindowFigures(
            window=window_label(window), retrains=len(realized), metric=metric, realized=realized,
            mean=float(np.mean(known_values)) if known_values else None,
            cost=float(sum(loss) + alpha * len(realized)) if complete else None))
    costed = [f for f in figures if f.cost is not None]
    if costed:
        best = min(costed, key=lambda f: f.cost)  # type: ignore[arg-type,return-value]
        reason = f"least cost at alpha {alpha:g} over {best.retrains} replayed retrain(s)"
        chosen_window = best.window
    else:
        chosen_window = window_label(windows[0])
        reason = (f"{len(cut)} labelled period(s) of {period}: too short a history to judge a retrain on a later "
                  "period; the first candidate is used")
    return WindowChoice(model=model or spec.name, version=version, alpha=alpha, metric=metric,
                        periods=[str(start) for start, _ in cut], windows=figures, chosen=chosen_window, reason=reason)


def choose_window(spec: DatasetSpec, data: LabelledData, *, trials: int, algorithms: Sequence[str],
                  version: int | None = None) -> tuple[WindowChoice, DatasetSpec]:
    """``retrain: {window: {choose: [...]}}``: the backtest of every candidate on the
    model's labelled rows, and the spec with the chosen window in its place (for the
    window's selection only: the version keeps the spec with ``choose``)."""
    candidates = spec.retrain.window.candidates()
    choice = window_backtest(spec, data.frame.select(training_columns(spec)), candidates, alpha=spec.retrain.alpha,
                             trials=trials, algorithms=algorithms, model=spec.name, version=version)
    chosen = parse_window(choice.chosen or window_label(candidates[0]))
    return choice, spec.model_copy(update={"retrain": spec.retrain.model_copy(update={"window": chosen})})


@task(name="choose-window", cache_policy=NONE)
def choose_window_task(spec: DatasetSpec, data: LabelledData, trials: int, algorithms: list[str],
                       version: int | None) -> tuple[WindowChoice, DatasetSpec]:
    return choose_window(spec, data, trials=trials, algorithms=algorithms, version=version)
