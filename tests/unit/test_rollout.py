"""Promotion on production evidence, the plain functions: which ids are shadowed, the
paired bootstrap on synthetic arrays, what a comparison decides, the spec's section and
the registry's compare-and-swap of a decision."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from driftloop.errors import SpecError
from driftloop.registry import ChampionChanged
from driftloop.registry.store import RolloutDecisionRecord, open_registry
from driftloop.rollout import (
    Comparison,
    guard_decision,
    metric_value,
    paired_bootstrap,
    shadow_decision,
    shadow_mask,
    stable_unit,
)
from driftloop.spec import RolloutPolicy, parse_spec
from tests.support.data import LOAN_SPEC
from tests.unit.test_registry import complete, version_draft

# --- which ids ---------------------------------------------------------------------------------


def test_fraction_shadows_the_same_ids_on_every_run_and_about_that_share() -> None:
    ids = pl.Series("id", np.arange(20_000, dtype=np.int64))
    first = shadow_mask(ids, 0.2)
    # Another run: the ids in another order and batching; the same ids are picked.
    shuffled = ids.sample(fraction=1.0, shuffle=True, seed=3)
    again = dict(zip(shuffled.to_list(), shadow_mask(shuffled, 0.2).tolist(), strict=True))
    assert [again[i] for i in ids.to_list()] == first.tolist()
    assert 0.19 < first.mean() < 0.21
    # Pinned: the hash is SplitMix64 of the id, not a library's hash that may change.
    assert np.flatnonzero(shadow_mask(pl.Series(np.arange(40, dtype=np.int64)), 0.2)).tolist() == [3, 10, 18, 21, 33]
    assert shadow_mask(ids, 1.0).all()
    text = pl.Series(["a-1", "b-2", "c-3"] * 2)
    assert shadow_mask(text, 0.5).tolist()[:3] == shadow_mask(text, 0.5).tolist()[3:]
    assert ((stable_unit(text) >= 0) & (stable_unit(text) < 1)).all()


# --- comparing on the same rows --------------------------------------------------------------------


def test_auc_with_ties_equals_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 3000)
    s = np.round(rng.random(3000) + y * 0.3, 1)  # many ties, as small trees give
    assert metric_value("roc_auc", y, s, (s > 0.5).astype(int)) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def synthetic(n: int, *, contender_noise: float, incumbent_noise: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    signal = y * 1.0
    a = 1 / (1 + np.exp(-(signal + rng.normal(0, incumbent_noise, n))))
    b = 1 / (1 + np.exp(-(signal + rng.normal(0, contender_noise, n))))
    return y, (a, (a > 0.5).astype(int)), (b, (b > 0.5).astype(int))


def test_paired_bootstrap_sees_a_better_a_worse_and_an_equal_contender() -> None:
    y, a, b = synthetic(4000, contender_noise=0.6)
    better = paired_bootstrap("roc_auc", y, a, b, confidence=0.95, resamples=300)
    assert better.contender > better.incumbent and 0 < better.lower <= better.difference <= better.upper
    worse = paired_bootstrap("roc_auc", y, b, a, confidence=0.95, resamples=300)
    assert worse.upper < 0 and worse.difference == pytest.approx(-better.difference)
    same = paired_bootstrap("roc_auc", y, a, a, confidence=0.95, resamples=50)
    assert same.lower == same.upper == same.difference == 0
    # Seeded: the same rows give the same interval.
    assert paired_bootstrap("roc_auc", y, a, b, confidence=0.95, resamples=300) == better


def test_lower_is_better_metrics_are_oriented_so_positive_means_contender_better() -> None:
    rng = np.random.default_rng(1)
    y = rng.normal(0, 1, 2000)
    good, bad = y + rng.normal(0, 0.2, 2000), y + rng.normal(0, 0.6, 2000)
    result = paired_bootstrap("rmse", y, (good * 0, bad), (good * 0, good), confidence=0.9, resamples=200)
    assert result.contender < result.incumbent and result.difference > 0 and result.lower > 0


# --- what it decides -----------------------------------------------------------------------------

POLICY = RolloutPolicy.model_validate({"shadow": {"min_labelled_rows": 1000, "max_days": 10},
                                       "guard": {"days": 5, "tolerance": 0.01}})


def comparison(rows: int, lower: float, upper: float) -> Comparison:
    return Comparison(metric="roc_auc", rows=rows, incumbent=0.7, contender=0.7 + (lower + upper) / 2,
                      difference=(lower + upper) / 2, lower=lower, upper=upper, confidence=0.95, resamples=100)


def test_shadow_decisions() -> None:
    day = timedelta(days=1)
    assert shadow_decision(None, POLICY, min_improvement=0, age=day).verdict == "waiting"
    assert shadow_decision(comparison(999, 0.05, 0.08), POLICY, min_improvement=0, age=day).verdict == "waiting"
    assert shadow_decision(comparison(1000, 0.05, 0.08), POLICY, min_improvement=0, age=day).verdict == "promote"
    assert shadow_decision(comparison(1000, 0.05, 0.08), POLICY, min_improvement=0.06, age=day).verdict == "waiting"
    assert shadow_decision(comparison(1000, -0.08, -0.01), POLICY, min_improvement=0, age=day).verdict == "reject"
    assert shadow_decision(comparison(5000, -0.01, 0.02), POLICY, min_improvement=0, age=day).verdict == "waiting"
    late = shadow_decision(comparison(10, -0.01, 0.02), POLICY, min_improvement=0, age=11 * day)
    assert late.verdict == "reject" and late.timed_out and "keep_champion" in late.reason
    promote_on_timeout = POLICY.model_copy(update={"shadow": POLICY.shadow.model_copy(update={"on_timeout": "promote"})})
    assert shadow_decision(None, promote_on_timeout, min_improvement=0, age=11 * day).verdict == "promote"


def test_guard_decisions() -> None:
    day = timedelta(days=1)
    assert guard_decision(comparison(1000, -0.05, -0.02), POLICY, age=day).verdict == "rollback"
    # Worse, but not by more than the tolerance with confidence: kept.
    assert guard_decision(comparison(1000, -0.03, -0.005), POLICY, age=day).verdict == "waiting"
    assert guard_decision(comparison(10, -0.05, -0.02), POLICY, age=day).verdict == "waiting"
    assert guard_decision(comparison(1000, -0.01, 0.01), POLICY, age=6 * day).verdict == "settled"


# --- the spec's section ------------------------------------------------------------------------------


def test_rollout_section_is_validated_and_off_by_default() -> None:
    plain = parse_spec(dict(LOAN_SPEC))
    assert plain.rollout is None
    spec = parse_spec({**LOAN_SPEC, "rollout": {"shadow": {"fraction": 0.2}, "guard": {}}})
    assert spec.rollout.shadow.fraction == 0.2 and spec.rollout.shadow.min_labelled_rows == 20_000
    assert spec.rollout.shadow.on_timeout == "keep_champion" and spec.rollout.guard.tolerance == 0.01
    assert spec.fingerprint() == plain.fingerprint()  # a policy, not the data
    with pytest.raises(SpecError, match="fractoin"):
        parse_spec({**LOAN_SPEC, "rollout": {"shadow": {"fractoin": 0.2}}})
    with pytest.raises(SpecError):
        parse_spec({**LOAN_SPEC, "rollout": {"shadow": {"fraction": 0}}})
    with pytest.raises(SpecError):
        parse_spec({**LOAN_SPEC, "rollout": {"shadow": {"on_timeout": "flip"}}})


# --- the registry applies a decision as one compare-and-swap --------------------------------------------


def decision(verdict: str, served: int, shadow: int, phase: str = "shadow") -> RolloutDecisionRecord:
    return RolloutDecisionRecord(model_name="loans", phase=phase, verdict=verdict, served_version=served,
                                 shadow_version=shadow, metric="roc_auc", rows_scored_by_both=10, rows_labelled=10,
                                 served_metric=0.7, shadow_metric=0.6, difference=-0.1, lower=-0.2, upper=-0.05,
                                 confidence=0.95, reason="synthetic", actor="test")


def test_a_rejection_removes_the_candidate_and_holds_the_cooldown(tmp_path: Path) -> None:
    store = open_registry(f"sqlite:///{tmp_path / 'r.db'}")
    for _ in range(2):
        complete(store, store.register_version(version_draft()).version)
    store.promote("loans", 1, actor="t", reason="first", expected_champion=None)
    store.set_alias("loans", "candidate", 2, actor="t", reason="gate passed")
    stored = store.apply_rollout_decision(decision("reject", 1, 2), expected_champion=1, expected_candidate=2)
    assert stored.applied and store.aliases("loans") == {"champion": 1}
    lease = store.acquire_retrain_lease("loans", "retrain", cooldown_s=600, ttl_s=60)
    assert not lease.acquired and "cooldown" in lease.reason and "rejected" in lease.reason
    assert [d.verdict for d in store.list_rollout_decisions("loans")] == ["reject"]


def test_a_decision_and_a_concurrent_promote_do_not_interleave(tmp_path: Path) -> None:
    """Both take the model's row lock: whichever commits second sees the first whole and
    refuses (nothing half-moved), whatever the order."""
    store = open_registry(f"sqlite:///{tmp_path / 'cas.db'}")
    for _ in range(3):
        complete(store, store.register_version(version_draft()).version)
    store.promote("loans", 1, actor="t", reason="first", expected_champion=None)
    store.set_alias("loans", "candidate", 2, actor="t", reason="gate passed")
    outcomes: dict[str, str] = {}
    barrier = threading.Barrier(2)

    def rollout() -> None:
        barrier.wait()
        try:
            store.apply_rollout_decision(decision("promote", 1, 2), expected_champion=1, expected_candidate=2)
            outcomes["rollout"] = "moved"
        except ChampionChanged:
            outcomes["rollout"] = "refused"

    def person() -> None:
        barrier.wait()
        try:
            store.promote("loans", 3, actor="alice", reason="by hand", expected_champion=1)
            outcomes["person"] = "moved"
        except ChampionChanged:
            outcomes["person"] = "refused"

    threads = [threading.Thread(target=rollout), threading.Thread(target=person)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes.values()) == ["moved", "refused"]
    aliases = store.aliases("loans")
    if outcomes["rollout"] == "moved":
        assert aliases == {"champion": 2}
        assert [d.verdict for d in store.list_rollout_decisions("loans")] == ["promote"]
    else:
        assert aliases == {"champion": 3, "candidate": 2} and store.list_rollout_decisions("loans") == []
    # A rollout decision judged against a champion that has since moved moves nothing.
    store.set_alias("loans", "candidate", 2, actor="t", reason="again")
    with pytest.raises(ChampionChanged):
        store.apply_rollout_decision(decision("reject", 1, 2), expected_champion=1, expected_candidate=2)


def test_a_guard_rollback_moves_the_champion_back(tmp_path: Path) -> None:
    store = open_registry(f"sqlite:///{tmp_path / 'g.db'}")
    for _ in range(2):
        complete(store, store.register_version(version_draft()).version)
    store.promote("loans", 1, actor="t", reason="first", expected_champion=None)
    store.promote("loans", 2, actor="t", reason="second", expected_champion=1)
    store.apply_rollout_decision(decision("rollback", 2, 1, phase="guard"), expected_champion=2,
                                 expected_candidate=None)
    assert store.aliases("loans") == {"champion": 1}
    last = store.alias_history("loans")[-1]
    assert last.reason.startswith("rollback: rollout guard") and (last.from_version, last.to_version) == (2, 1)
    assert not store.acquire_retrain_lease("loans", "r", cooldown_s=600, ttl_s=60).acquired


def test_rollout_status_errors_follow_the_cli_conventions(home: Path, capsys) -> None:
    import json

    from driftloop.cli import main

    assert main(["rollout", "status", "--model", "absent", "--json"]) == 1
    payload = json.loads(capsys.readouterr().out)
    assert payload["kind"] == "model_not_found" and "absent" in payload["error"]
    assert main(["rollout", "decide", "--model", "Not A Name", "--json"]) == 2  # no Prefect server started
    assert json.loads(capsys.readouterr().out)["kind"] == "usage"


def test_paired_chunks_and_their_chart() -> None:
    from driftloop.rollout import paired_chunks
    from driftloop.tasks.rollout import ChunkFigures, paired_markdown

    y, a, b = synthetic(1200, contender_noise=0.5)
    frame = pl.DataFrame({"id": np.arange(1200), "ts": pl.datetime_range(
        pl.datetime(2024, 1, 1), pl.datetime(2024, 1, 1) + pl.duration(minutes=1199), "1m", eager=True),
        "target": y, "served_probability": a[0], "served_prediction": a[1],
        "shadow_probability": b[0], "shadow_prediction": b[1]})
    spec = parse_spec(dict(LOAN_SPEC))
    chunks = paired_chunks(frame, spec, chunks=6)
    assert [c.rows for c in chunks] == [200] * 6 and chunks[0].label.startswith("2024-01-01")
    assert sum(c.shadow > c.served for c in chunks) >= 5  # the better model, chunk by chunk
    figures = [ChunkFigures(label=c.label, rows=c.rows, served=c.served, shadow=c.shadow) for c in chunks]
    markdown = paired_markdown("loans", "shadow", 1, 2, "roc_auc", figures)
    assert "![Realized roc_auc per chunk" in markdown and "data:image/png;base64," in markdown
    assert "| chunk | rows | champion v1 | candidate v2 |" in markdown


# --- the rollout artifact says who serves after an applied decision ---------------------------------------


@pytest.mark.parametrize(("verdict", "phase", "applied", "now"), [
    ("promote", "shadow", True, "- now: v2 is champion (v1, the champion it replaced, no longer serves)"),
    ("reject", "shadow", True, "- now: v1 stays champion (candidate v2 rejected)"),
    ("rollback", "guard", True, "- now: v2 is champion again (v1 rolled back)"),
    ("waiting", "shadow", False, None),
    ("promote", "shadow", False, None),  # lost the compare-and-swap: nothing moved
])
def test_the_artifact_separates_the_phase_decided_in_from_who_serves_now(verdict: str, phase: str, applied: bool,
                                                                        now: str | None) -> None:
    from driftloop.flows.rollout import render
    from driftloop.tasks.rollout import RolloutOutcome

    record = decision(verdict, 1, 2, phase).model_copy(update={"applied": applied})
    text = render(RolloutOutcome(model="loans", phase=phase, champion=1, shadow=2, decision=record, reason="synthetic"))
    assert f"- phase at the decision: {phase}" in text
    assert [line for line in text.splitlines() if line.startswith("- now:")] == ([now] if now else [])
