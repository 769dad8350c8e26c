"""Names of the quality metrics driftloop reports, and which way is better."""

from __future__ import annotations

import math
from typing import Any

HIGHER_IS_BETTER: dict[str, bool] = {
    "roc_auc": True, "pr_auc": True, "log_loss": False, "f1": True, "accuracy": True,
    "roc_auc_macro": True, "roc_auc_weighted": True, "f1_macro": True, "f1_weighted": True,
    "mae": False, "rmse": False, "r2": True,
}
PRIMARY_METRIC: dict[str, str] = {
    "binary_classification": "roc_auc",
    "multiclass_classification": "f1_macro",
    "regression": "rmse",
}

# Why a metric can be undefined (NaN in memory, null once stored or printed as JSON).
UNDEFINED_REASONS: dict[str, str] = {
    "roc_auc": "undefined: the rows hold one class only (ROC AUC needs both)",
    "pr_auc": "undefined: the rows hold one class only (PR AUC needs both)",
    "r2": "undefined: R² needs at least two rows",
}


def is_undefined(value: object) -> bool:
    """None, or a float that is not finite (NaN: the metric has no value on these rows)."""
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def undefined_metrics(metrics: dict[str, Any]) -> dict[str, str]:
    """The metrics without a value, each with the reason."""
    return {name: UNDEFINED_REASONS.get(name, "undefined on these rows") for name, value in metrics.items()
            if is_undefined(value)}


def format_metric(name: str, value: object, digits: int = 4) -> str:
    """``roc_auc 0.8123``, or ``roc_auc n/a (undefined: ...)`` for a metric without a value."""
    if is_undefined(value):
        return f"{name} n/a ({UNDEFINED_REASONS.get(name, 'undefined on these rows')})"
    return f"{name} {value:.{digits}f}" if isinstance(value, float) else f"{name} {value}"


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None: what JSON can hold.
    PostgreSQL's json type rejects ``NaN``, and ``NaN`` printed by ``json.dumps`` is not
    JSON; the registry and ``--json`` store and print null instead."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
