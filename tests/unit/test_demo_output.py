"""What `make demo` prints about its shadow rollout: the decision with both models' metric
on the same rows, how many rows, the difference and its bounds, and where to see it again.
(The whole loop demo runs on a real server: `make demo`; its steps are the deployments
that tests/e2e/test_loop.py and tests/flows/test_rollout_flow.py test.)"""

from __future__ import annotations

from datetime import UTC, datetime

from driftloop.cli.demo import human_demo
from driftloop.registry.store import RolloutDecisionRecord


def _payload(rollout: dict) -> dict:
    return {"ui": "http://127.0.0.1:4321", "kept_running": False, "steps": {}, "monitor": None, "tables": {},
            "retrain": {"state": "Completed", "flow_run": "calm-fox", "verdict": "v2 candidate: ..."},
            "versions": [], "aliases": {"champion": 2}, "rollout": rollout}


def test_the_demo_prints_the_shadow_decision_with_both_metrics_on_the_same_rows() -> None:
    decision = RolloutDecisionRecord(
        model_name="car_loan", phase="shadow", verdict="promote", applied=True, served_version=1, shadow_version=2,
        metric="roc_auc", rows_scored_by_both=9826, rows_labelled=9826, served_metric=0.8312, shadow_metric=0.9105,
        difference=0.0793, lower=0.0741, upper=0.0846, confidence=0.95,
        reason="candidate better: roc_auc contender 0.9105 vs incumbent 0.8312 on 9,826 rows: ...",
        actor="flow rollout-decide/brave-owl", created_at=datetime(2026, 1, 2, tzinfo=UTC))
    text = human_demo(_payload({
        "model": "car_loan", "served": 1, "candidate": 2, "from": "2019-07-01", "later_rows": 9826,
        "policy": {"fraction": 1.0, "min_labelled_rows": 5000, "confidence": 0.95, "max_days": 30,
                   "on_timeout": "keep_champion"},
        "decisions": [decision.model_dump(mode="json")], "phase": "guard", "champion": 2, "shadow": 1,
        "status_command": "driftloop rollout status --model car_loan", "artifact": "rollout-car-loan",
        "artifact_url": None}))
    assert "champion v1 scored the later period (9,826 rows from 2019-07-01), candidate v2 the same rows" in text
    assert ">= 5,000 labelled rows scored by both" in text
    assert "decision by flow rollout-decide/brave-owl: PROMOTE (applied): candidate better" in text
    assert "roc_auc on the same 9,826 labelled rows: champion v1 0.8312, candidate v2 0.9105" in text
    assert "difference +0.0793 (candidate v2 better when positive), 95% bounds [+0.0741, +0.0846]" in text
    assert "now: champion v2, phase guard: v1, the champion it replaced, scores in shadow" in text
    assert ("see it again: driftloop rollout status --model car_loan; in the Prefect UI, artifact rollout-car-loan "
            "(make demo KEEP=1 keeps the UI up)") in text


def test_without_a_candidate_the_demo_says_the_later_period_was_not_scored() -> None:
    text = human_demo(_payload({
        "model": "car_loan", "served": 2, "candidate": None, "from": "2019-07-01", "later_rows": 9826, "policy": None,
        "decisions": [], "phase": "settled", "champion": 2, "shadow": None,
        "status_command": "driftloop rollout status --model car_loan", "artifact": "rollout-car-loan",
        "artifact_url": "http://127.0.0.1:4321/artifacts/key/rollout-car-loan"}))
    assert "no candidate after the retrain (its verdict above says why); the later period was not scored" in text
    assert "now: champion v2, phase settled" in text
    assert "artifact http://127.0.0.1:4321/artifacts/key/rollout-car-loan" in text
