"""Names of the quality metrics driftloop reports, and which way is better."""

from __future__ import annotations

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
