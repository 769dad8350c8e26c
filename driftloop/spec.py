"""The dataset spec: a dataset described once, in YAML.

Everything column-related is derived from it: the pandera schema
(:mod:`driftloop.schema`), the training feature list, the ONNX input signature and
NannyML's column mapping. Nowhere else lists column names.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from driftloop.errors import SpecError
from driftloop.metrics import HIGHER_IS_BETTER, PRIMARY_METRIC

DType = Literal["int", "float", "bool", "category", "string", "datetime"]
TaskKind = Literal["binary_classification", "multiclass_classification", "regression"]

NUMERIC_DTYPES = ("int", "float")
# What validation writes into a quarantine beside the input's columns (tasks.validate.
# RESERVED_COLUMNS; a test keeps the two equal): no spec column may use these names.
RESERVED_COLUMN_NAMES = ("_row", "_columns", "_checks", "_values")


class ColumnSpec(BaseModel):
    """One column: its type and the checks every row must pass."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: DType
    min: float | None = Field(default=None, description="Inclusive lower bound (int, float).")
    max: float | None = Field(default=None, description="Inclusive upper bound (int, float).")
    allowed: list[str | int | float | bool] | None = Field(
        default=None, description="The only values accepted (category, string, int)."
    )
    nullable: bool = False
    unique: bool = False
    format: str | None = Field(
        default=None, description="strftime format for parsing text (datetime only)."
    )
    description: str | None = None

    @model_validator(mode="after")
    def _checks_fit_dtype(self) -> ColumnSpec:
        if (self.min is not None or self.max is not None) and self.dtype not in NUMERIC_DTYPES:
            raise ValueError(f"min/max apply to int and float columns, not {self.dtype}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        if self.allowed is not None:
            if self.dtype not in ("category", "string", "int"):
                raise ValueError(f"allowed applies to category, string and int, not {self.dtype}")
            if not self.allowed:
                raise ValueError("allowed must list at least one value")
        if self.format is not None and self.dtype != "datetime":
            raise ValueError("format applies to datetime columns only")
        return self

    @property
    def is_categorical(self) -> bool:
        return self.dtype in ("category", "string")


class Threshold(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min: float | None = None
    max: float | None = None


class GateSpec(BaseModel):
    """When a newly trained model may become champion."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str | None = Field(
        default=None, description="Metric compared with the champion (default: roc_auc, f1_macro or rmse)."
    )
    thresholds: dict[str, Threshold] = Field(default_factory=dict, description="Absolute limits, per metric.")
    max_regression: float = Field(
        default=0.01, ge=0, description="How much worse than the champion (in metric units) is still accepted."
    )

    @model_validator(mode="after")
    def _known_metrics(self) -> GateSpec:
        names = [self.metric] if self.metric else []
        unknown = [m for m in [*names, *self.thresholds] if m not in HIGHER_IS_BETTER]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(HIGHER_IS_BETTER)}")
        return self


class PerformanceRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    alerts: int = Field(default=2, ge=1, description="Retrain when this many ...")
    of_last: int = Field(default=3, ge=1, description="... of the last N analysis chunks alert.")


class ReferencePeriod(BaseModel):
    """A labelled period after training, as monitoring's reference."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: datetime = Field(description="First timestamp of the period (inclusive).")
    end: datetime = Field(description="End of the period (exclusive).")

    @model_validator(mode="after")
    def _ordered(self) -> ReferencePeriod:
        if self.start >= self.end:
            raise ValueError(f"start ({self.start}) must be before end ({self.end})")
        return self


class MonitoringPolicy(BaseModel):
    """What monitoring computes and what warrants retraining."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chunk_size: int | None = Field(default=None, ge=10, description="Rows per chunk (default: reference rows / 8).")
    chunk_period: str | None = Field(default=None, description="Chunk by period instead: D, W, M, Q or Y.")
    min_reference_chunks: int = Field(default=4, ge=2, description="Fewer reference chunks make thresholds meaningless.")
    continuous_methods: list[Literal["jensen_shannon", "kolmogorov_smirnov", "wasserstein", "hellinger"]] = ["jensen_shannon"]
    categorical_methods: list[Literal["jensen_shannon", "chi2", "l_infinity", "hellinger"]] = ["jensen_shannon"]
    estimated_metric: str | None = Field(default=None, description="Metric CBPE/DLE estimates (default: roc_auc / mae).")
    performance: PerformanceRule | None = Field(default_factory=PerformanceRule, description="Retrain on performance alerts.")
    multivariate_drift: bool = Field(default=True, description="Retrain on a multivariate drift alert in the last chunk window.")
    min_drifting_features: int | None = Field(default=None, ge=1, description="Retrain when at least this many features drift.")
    window: int = Field(default=3, ge=1, description="Drift rules look at the last N analysis chunks.")
    alert_rate: float | None = Field(
        default=0.01, gt=0, lt=0.5,
        description="False-alarm rate per chunk the drift thresholds are calibrated for (univariate: across all "
        "features; multivariate: its one statistic). null: NannyML's default thresholds (reference chunks' mean ± 3 sd).",
    )
    calibration_draws: int = Field(
        default=200, ge=50, le=5000, description="Chunks resampled from the reference to calibrate the thresholds."
    )
    reference_period: ReferencePeriod | None = Field(
        default=None,
        description="Use as the reference the rows the monitored version scored in this period, with their registered "
        "labels, instead of its holdout: data the model was not trained on, from a period of known performance, and "
        "usually many more rows (tighter thresholds). Needs the spec's id and timestamp.",
    )

    @model_validator(mode="after")
    def _chunking(self) -> MonitoringPolicy:
        if self.chunk_size and self.chunk_period:
            raise ValueError("give chunk_size or chunk_period, not both")
        if self.chunk_period and self.chunk_period not in ("D", "W", "M", "Q", "Y"):
            raise ValueError(f"chunk_period {self.chunk_period!r} must be one of D, W, M, Q, Y")
        if self.estimated_metric and self.estimated_metric not in HIGHER_IS_BETTER:
            raise ValueError(f"unknown estimated_metric {self.estimated_metric!r}")
        return self


_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _duration(text: str, units: str, examples: str) -> timedelta:
    match = _DURATION.match(text)
    if match is None or match.group(2) not in units:
        raise ValueError(f"{text!r} is not a duration; write a whole number with {', '.join(units[:-1])} or "
                         f"{units[-1]} ({examples})")
    return timedelta(**{_DURATION_UNITS[match.group(2)]: int(match.group(1))})


def parse_duration(text: str) -> timedelta:
    """``36h``, ``92d`` or ``12w`` as a timedelta (a training window, a label delay)."""
    return _duration(text, "hdw", "36h, 92d, 12w")


class TrainingWindow(BaseModel):
    """Which labelled rows a retrain learns from: the most recent span of time, the most
    recent rows, all of them, or the best of several candidates on the model's own
    labelled history (``choose``). Give exactly one key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    last: str | None = Field(default=None, description="The newest span of time, e.g. 92d (needs a timestamp).")
    rows: int | None = Field(default=None, ge=30, description="The newest N labelled rows.")
    all: bool | None = Field(default=None, description="Every labelled row (the default).")
    choose: list[str] | None = Field(
        default=None, description="Candidate windows (31d, 92d, all; needs a timestamp): each retrain replays the "
        "model's labelled history under each and trains on the one with the least cost at retrain.alpha.")

    @model_validator(mode="after")
    def _one_kind(self) -> TrainingWindow:
        given = [k for k in ("last", "rows", "all", "choose") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of last, rows, all or choose (got {', '.join(given) or 'none'})")
        if self.all is False:
            raise ValueError("all: false means nothing; give last or rows instead")
        if self.last is not None:
            parse_duration(self.last)
        if self.choose is not None:
            if len(self.choose) < 2:
                raise ValueError(f"choose lists {len(self.choose)} window(s); give at least two, e.g. [31d, 92d, all]")
            for candidate in self.choose:
                if candidate != "all":
                    try:
                        parse_duration(candidate)
                    except ValueError:
                        raise ValueError(f"choose: {candidate!r} is not a window; give spans like 31d or 12w, or "
                                         "all") from None
            if len(set(self.choose)) != len(self.choose):
                raise ValueError(f"choose lists a window twice: {self.choose}")
        return self

    @property
    def span(self) -> timedelta | None:
        return parse_duration(self.last) if self.last is not None else None

    def candidates(self) -> list[TrainingWindow]:
        """The windows ``choose`` names (one: this window itself)."""
        if self.choose is None:
            return [self]
        return [TrainingWindow(all=True) if c == "all" else TrainingWindow(last=c) for c in self.choose]

    def describe(self) -> str:
        if self.choose is not None:
            return f"best of {', '.join(self.choose)}"
        if self.last is not None:
            return f"last {self.last}"
        return f"newest {self.rows} rows" if self.rows is not None else "all labelled rows"


class RetrainPolicy(BaseModel):
    """What a retrain learns from and when a retrained model may replace the champion."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window: TrainingWindow = Field(default_factory=lambda: TrainingWindow(all=True))
    skip_recent: str = Field(default="0d", description="Leave out the newest labels (still maturing), e.g. 7d.")
    min_new_labels: int = Field(
        default=1000, ge=0, description="Labelled rows newer than the champion's training data needed to retrain."
    )
    min_improvement: float = Field(
        default=0.0, ge=0, description="The challenger must beat the champion by this on the gate metric."
    )
    alpha: float = Field(
        default=0.02, ge=0, le=1, description="The price of one retrain, in one period's lost metric: a "
        "backtest's cost is the sum over periods of (1 - metric) plus alpha per retrain (driftloop backtest, "
        "window: {choose: [...]})."
    )

    @field_validator("skip_recent")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value

    @property
    def skip_recent_span(self) -> timedelta:
        return parse_duration(self.skip_recent)


# --- rollout: shadow, guard, edge -------------------------------------------------------


def parse_bake(text: str) -> timedelta:
    """``30s``, ``15m``, ``1h`` or ``2d`` as a timedelta (an edge wave's bake time)."""
    return _duration(text, "smhd", "30s, 15m, 1h, 2d")


class EdgeAbort(BaseModel):
    """A wave whose telemetry crosses any of these stops the rollout (every device goes
    back to the previous version)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    error_rate: float = Field(default=0.01, ge=0.0, le=1.0,
                              description="Share of the new version's edge runs that failed.")
    latency_p95_ratio: float = Field(default=1.5, gt=1.0,
                                     description="New version's p95 batch latency over the previous version's.")
    score_psi: float = Field(default=0.25, gt=0.0,
                             description="Population stability index of the score histograms, new vs previous.")


class EdgeRollout(BaseModel):
    """How a new champion reaches edge devices: in waves, each a share of the devices."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    waves: list[float] = Field(default_factory=lambda: [1.0], min_length=1,
                               description="Cumulative share of devices per wave, increasing, ending at 1.0.")
    bake: str = Field(default="1h", description="Healthy telemetry for this long before the next wave (30s, 15m, 1h).")
    abort: EdgeAbort = Field(default_factory=EdgeAbort)

    @field_validator("waves")
    @classmethod
    def _increasing(cls, waves: list[float]) -> list[float]:
        if any(not 0.0 < w <= 1.0 for w in waves) or any(b <= a for a, b in itertools.pairwise(waves)) \
                or waves[-1] != 1.0:
            raise ValueError(f"waves {waves}: shares must increase, each in (0, 1], the last 1.0 (e.g. [0.05, 0.25, 1.0])")
        return waves

    @field_validator("bake")
    @classmethod
    def _bake(cls, value: str) -> str:
        parse_bake(value)
        return value

    @property
    def bake_s(self) -> float:
        return parse_bake(self.bake).total_seconds()


class ShadowPolicy(BaseModel):
    """A retrained model that passes the gate becomes ``candidate``: it scores a share of
    the champion's production rows in shadow until its own labelled rows decide."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fraction: float = Field(default=1.0, gt=0.0, le=1.0,
                            description="Share of rows the candidate also scores (a stable hash of the id).")
    min_labelled_rows: int = Field(default=20_000, ge=1,
                                   description="Rows scored by both models and labelled before a decision.")
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0, description="Of the paired bootstrap on those rows.")
    max_days: float = Field(default=30, gt=0, description="Then on_timeout decides.")
    on_timeout: Literal["keep_champion", "promote"] = "keep_champion"


class GuardPolicy(BaseModel):
    """After a promotion the replaced champion keeps scoring in shadow; a new champion that
    is worse on the same labelled rows is rolled back."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    days: float = Field(default=30, gt=0, description="How long after a promotion the guard watches.")
    tolerance: float = Field(default=0.01, ge=0,
                             description="New champion worse than the replaced one by more than this, with "
                                         "confidence: roll back.")
    min_labelled_rows: int | None = Field(default=None, ge=1,
                                          description="Rows before the guard may act (default: shadow's, or 20000).")
    confidence: float | None = Field(default=None, gt=0.5, lt=1.0, description="Default: shadow's, or 0.95.")


class RolloutPolicy(BaseModel):
    """How a retrained model replaces the champion: on production evidence (shadow), and
    watched after it did (guard); and how a new champion reaches edge devices (edge).
    Without this section a passing challenger becomes champion at once, as before, and
    every device follows a new champion at once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shadow: ShadowPolicy | None = None
    guard: GuardPolicy | None = None
    edge: EdgeRollout | None = Field(default=None, description="Edge devices follow the signed channel in waves.")

    @property
    def guard_rows(self) -> int:
        if self.guard and self.guard.min_labelled_rows:
            return self.guard.min_labelled_rows
        return self.shadow.min_labelled_rows if self.shadow else ShadowPolicy().min_labelled_rows

    @property
    def guard_confidence(self) -> float:
        if self.guard and self.guard.confidence:
            return self.guard.confidence
        return self.shadow.confidence if self.shadow else ShadowPolicy().confidence


class DatasetSpec(BaseModel):
    """A tabular dataset: its target, identity, time axis and typed columns."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_\-]{0,63}$", description="Also the model name.")
    task: TaskKind
    target: str
    id: str | None = None
    timestamp: str | None = None
    segment: str | None = None
    max_reject_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    columns: dict[str, ColumnSpec]
    features: list[str] | None = None
    gate: GateSpec = Field(default_factory=GateSpec)
    monitoring: MonitoringPolicy = Field(default_factory=MonitoringPolicy)
    retrain: RetrainPolicy = Field(default_factory=RetrainPolicy)
    rollout: RolloutPolicy | None = Field(
        default=None, description="Shadow scoring and guard for retrained models, edge waves; none: promote at once.")
    description: str | None = None

    @property
    def gate_metric(self) -> str:
        return self.gate.metric or PRIMARY_METRIC[self.task]

    @model_validator(mode="after")
    def _roles_are_consistent(self) -> DatasetSpec:
        roles = {"target": self.target, "id": self.id, "timestamp": self.timestamp}
        reserved = sorted({*self.columns, *(v for v in roles.values() if v)} & set(RESERVED_COLUMN_NAMES))
        if reserved:
            raise ValueError(
                f"column name(s) {reserved} are reserved for the quarantine's bookkeeping "
                f"({', '.join(RESERVED_COLUMN_NAMES)}); rename the column in the input and the spec"
            )
        named = [v for v in roles.values() if v]
        if len(named) != len(set(named)):
            raise ValueError(f"target, id and timestamp must be different columns, got {roles}")
        if self.features is not None:
            if not self.features:
                raise ValueError("features must list at least one column")
            unknown = [f for f in self.features if f not in self.columns]
            if unknown:
                raise ValueError(f"features {unknown} are not declared under columns")
            for role, col in roles.items():
                if col and col in self.features:
                    raise ValueError(f"the {role} column {col!r} cannot also be a feature")
            if len(set(self.features)) != len(self.features):
                raise ValueError("features lists a column twice")
        if not self.timestamp and self.retrain.window.last is not None:
            raise ValueError(
                f"retrain.window.last ({self.retrain.window.last}) needs a timestamp column and this spec has none; "
                "use window: {rows: N} or {all: true}"
            )
        if not self.timestamp and self.retrain.window.choose is not None:
            raise ValueError(
                f"retrain.window.choose ({', '.join(self.retrain.window.choose)}) replays the labelled history period "
                "by period and needs a timestamp column; this spec has none: give window: {rows: N} or {all: true}"
            )
        if not self.timestamp and self.retrain.skip_recent_span:
            raise ValueError("retrain.skip_recent needs a timestamp column and this spec has none; remove it")
        if self.segment is not None and self.segment not in self.columns:
            raise ValueError(f"segment {self.segment!r} is not declared under columns")
        if self.id and self.id in self.columns and self.columns[self.id].nullable:
            raise ValueError(f"the id column {self.id!r} cannot be nullable")
        if self.timestamp and self.timestamp in self.columns and self.columns[self.timestamp].dtype != "datetime":
            raise ValueError(f"the timestamp column {self.timestamp!r} must have dtype datetime")
        if self.timestamp and self.timestamp in self.columns and self.columns[self.timestamp].nullable:
            # Time-ordered splits and training windows place every row in time.
            raise ValueError(f"the timestamp column {self.timestamp!r} cannot be nullable")
        if not self.feature_columns:
            raise ValueError("no feature columns: declare some under columns")
        dated = [f for f in self.feature_columns if self.column_spec(f).dtype == "datetime"]
        if dated:
            raise ValueError(f"datetime features {dated} are not supported; derive numeric features from them")
        if self.task == "binary_classification":
            target = self.column_spec(self.target)
            if target.dtype not in ("int", "bool") or (target.dtype == "int" and set(target.allowed or []) - {0, 1}):
                raise ValueError(
                    f"a binary_classification target must be bool or int with allowed [0, 1]; "
                    f"{self.target!r} is {target.dtype} {target.allowed or ''}".rstrip()
                )
        return self

    # --- derived views (the only places column lists come from) ---------------------

    @property
    def feature_columns(self) -> list[str]:
        if self.features is not None:
            return list(self.features)
        roles = {self.target, self.id, self.timestamp}
        return [c for c in self.columns if c not in roles]

    def column_spec(self, name: str) -> ColumnSpec:
        """The declared spec of a column, or the implied one for id/timestamp/target."""
        if name in self.columns:
            spec = self.columns[name]
            if name == self.id and not spec.unique:
                return spec.model_copy(update={"unique": True})
            if name == self.target and self.task == "binary_classification" and spec.dtype == "int" and spec.allowed is None:
                return spec.model_copy(update={"allowed": [0, 1]})
            return spec
        if name == self.id:
            return ColumnSpec(dtype="string", unique=True)
        if name == self.timestamp:
            return ColumnSpec(dtype="datetime")
        if name == self.target:
            return _implied_target_spec(self.task)
        raise KeyError(name)

    def schema_columns(self, *, labelled: bool = True) -> dict[str, ColumnSpec]:
        """Every column a row must carry, in a stable order: id, timestamp, features,
        other declared columns, then the target (only when ``labelled``)."""
        order: list[str] = []
        for name in (self.id, self.timestamp, *self.feature_columns, *self.columns):
            if name and name not in order and name != self.target:
                order.append(name)
        if labelled:
            order.append(self.target)
        return {name: self.column_spec(name) for name in order}

    def fingerprint(self) -> str:
        """sha256 of the spec's data part (columns, roles, limits): changes whenever
        validation would, not when the gate, monitoring, retrain or rollout policy is edited."""
        canonical = json.dumps(self.model_dump(mode="json", exclude={"gate", "monitoring", "retrain", "rollout", "description"}), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


# A spec's name is its model's name. Matched whole (fullmatch): with ``match``, ``$`` also
# matches before a trailing newline, and ``car_loan\n`` would pass.
MODEL_NAME = re.compile(r"[a-z][a-z0-9_\-]{0,63}")


def check_model_name(name: str) -> str:
    """A model name from outside (an event, a CLI argument) before it reaches the
    registry or becomes part of a path."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise SpecError(
            f"model name {name!r} is not a driftloop model name (lowercase letters, digits, _ and -, starting "
            "with a letter); check the event's driftloop.model.name or the --model argument"
        )
    return name


def _implied_target_spec(task: TaskKind) -> ColumnSpec:
    if task == "binary_classification":
        return ColumnSpec(dtype="int", allowed=[0, 1])
    if task == "multiclass_classification":
        return ColumnSpec(dtype="category")
    return ColumnSpec(dtype="float")


def load_spec(path: str | Path) -> DatasetSpec:
    """Read and check a spec file; every problem raises :class:`SpecError` naming the file
    and the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"spec file {path} does not exist; pass the path of a dataset spec YAML") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"spec file {path} cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise SpecError(f"spec file {path}: invalid YAML{line}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise SpecError(f"spec file {path}: expected a mapping of keys (name, task, target, columns, ...)")
    return parse_spec(data, source=str(path))


def parse_spec(data: dict[str, Any], *, source: str = "<spec>") -> DatasetSpec:
    try:
        return DatasetSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(f"spec file {source}: {format_validation_error(exc)}") from None


def format_validation_error(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"] if p not in ("function-after",)) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            problems.append(f"key '{key}': unknown key; remove it or check its spelling")
        elif kind == "missing":
            problems.append(f"key '{key}': required key is missing")
        elif kind == "literal_error":
            allowed = err.get("ctx", {}).get("expected", "")
            problems.append(f"key '{key}': {err['input']!r} is not allowed; expected {allowed}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            value = f" (got {err['input']!r})" if key != "(top level)" and not isinstance(err["input"], dict) else ""
            problems.append(f"key '{key}': {msg}{value}")
    return "; ".join(problems)
