from driftloop.spec import GateSpec, Threshold
from driftloop.tasks.gate import decide_promotion

POLICY = GateSpec(thresholds={"roc_auc": Threshold(min=0.8), "log_loss": Threshold(max=0.5)}, max_regression=0.01)


def test_first_model_passes_on_thresholds_alone() -> None:
    decision = decide_promotion({"roc_auc": 0.85, "log_loss": 0.4}, POLICY, "roc_auc")
    assert decision.passed
    assert "roc_auc 0.8500 >= min 0.8" in decision.reasons
    assert "no champion yet: judged on absolute thresholds alone" in decision.reasons


def test_fails_on_an_absolute_threshold() -> None:
    decision = decide_promotion({"roc_auc": 0.75, "log_loss": 0.4}, POLICY, "roc_auc")
    assert not decision.passed
    assert "roc_auc 0.7500 < min 0.8" in decision.reasons


def test_fails_on_regression_against_the_champion() -> None:
    decision = decide_promotion({"roc_auc": 0.85, "log_loss": 0.4}, POLICY, "roc_auc", champion={"roc_auc": 0.87}, champion_version=3)
    assert not decision.passed
    assert decision.champion_version == 3 and decision.champion == 0.87
    assert any("worse by 0.0200, exceeds max_regression 0.01" in r for r in decision.reasons)


def test_small_regression_within_tolerance_passes() -> None:
    decision = decide_promotion({"roc_auc": 0.865, "log_loss": 0.4}, POLICY, "roc_auc", champion={"roc_auc": 0.87}, champion_version=3)
    assert decision.passed
    assert any("within max_regression" in r for r in decision.reasons)


def test_lower_is_better_metric_compares_the_right_way() -> None:
    policy = GateSpec(max_regression=0.0)
    better = decide_promotion({"rmse": 9.0}, policy, "rmse", champion={"rmse": 10.0}, champion_version=1)
    worse = decide_promotion({"rmse": 11.0}, policy, "rmse", champion={"rmse": 10.0}, champion_version=1)
    assert better.passed and not worse.passed


def test_a_retrain_must_beat_the_champion_by_min_improvement() -> None:
    champion = {"roc_auc": 0.85, "log_loss": 0.4}
    small = decide_promotion({"roc_auc": 0.855, "log_loss": 0.4}, POLICY, "roc_auc", champion=champion, champion_version=2,
                   min_improvement=0.01)
    assert not small.passed and "improvement +0.0050 over champion v2 is below min_improvement 0.01" in small.reasons
    clear = decide_promotion({"roc_auc": 0.87, "log_loss": 0.4}, POLICY, "roc_auc", champion=champion, champion_version=2,
                   min_improvement=0.01)
    assert clear.passed and clear.champion_metrics == champion and clear.challenger_metrics["roc_auc"] == 0.87
    # Slightly worse is within max_regression for a manual train, but not for a retrain.
    worse = {"roc_auc": 0.845, "log_loss": 0.4}
    assert decide_promotion(worse, POLICY, "roc_auc", champion=champion, champion_version=2).passed
    assert not decide_promotion(worse, POLICY, "roc_auc", champion=champion, champion_version=2, min_improvement=0.0).passed


def test_an_identical_model_is_never_promoted() -> None:
    same = {"roc_auc": 0.85, "log_loss": 0.4}
    decision = decide_promotion(same, POLICY, "roc_auc", champion=same, champion_version=4, identical_to_champion=True)
    assert not decision.passed
    assert "identical model: the same prediction as champion v4 for every holdout row" in decision.reasons
