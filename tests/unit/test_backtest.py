"""The oracle, the cost of a schedule, the worlds of bench/loop.py, and the spec's
``retrain.alpha`` and ``window: {choose: [...]}``."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from driftloop.backtest import (
    brute_force_schedule,
    meets_target,
    oracle_schedule,
    schedule_cost,
    serving,
)
from driftloop.errors import SpecError
from driftloop.spec import parse_spec
from tests.support.data import LOAN_SPEC

NAN = np.nan
# Period 0 trains model 0; periods 1..5 are served. Model 0 collapses at period 3 (a
# concept flip); the retrain at 3 sees it, the one at 2 does not.
HAND = np.array([
    [NAN, 0.90, 0.90, 0.50, 0.50, 0.50],
    [NAN, NAN, NAN, NAN, NAN, NAN],
    [NAN, NAN, 0.91, 0.50, 0.50, 0.50],
    [NAN, NAN, NAN, 0.88, 0.89, 0.89],
    [NAN, NAN, NAN, NAN, 0.90, 0.89],
    [NAN, NAN, NAN, NAN, NAN, 0.905],
])
PERIODS = [1, 2, 3, 4, 5]
CANDIDATES = [2, 3, 4, 5]


def test_cost_of_a_schedule_by_hand() -> None:
    assert serving([3], PERIODS) == [0, 0, 3, 3, 3]
    # (1-.9) + (1-.9) + (1-.88) + (1-.89) + (1-.89) + alpha
    assert schedule_cost(HAND, [3], 0.02, PERIODS) == pytest.approx(0.1 + 0.1 + 0.12 + 0.11 + 0.11 + 0.02)
    # a rejected retrain is still paid for
    assert schedule_cost(HAND, [], 0.02, PERIODS, trainings=1) == pytest.approx(0.1 + 0.1 + 1.5 + 0.02)


@pytest.mark.parametrize("alpha, expected", [(0.0, (2, 3, 4, 5)), (0.005, (2, 3, 4, 5)), (0.012, (3, 5)), (0.02, (3,)), (2.0, ())])
def test_oracle_on_a_hand_made_matrix_equals_brute_force(alpha: float, expected: tuple[int, ...]) -> None:
    oracle = oracle_schedule(HAND, alpha, PERIODS, CANDIDATES)
    brute = brute_force_schedule(HAND, alpha, PERIODS, CANDIDATES)
    assert oracle.retrains == brute.retrains == expected
    assert oracle.cost == pytest.approx(brute.cost)
    assert oracle.cost == pytest.approx(schedule_cost(HAND, expected, alpha, PERIODS))


def test_oracle_equals_brute_force_on_random_matrices() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        horizon = int(rng.integers(3, 9))
        auc = rng.uniform(0.4, 0.95, (horizon, horizon))
        periods = list(range(1, horizon))
        candidates = [p for p in periods if rng.random() < 0.8]
        alpha = float(rng.choice([0.0, 0.01, 0.05, 0.3]))
        oracle = oracle_schedule(auc, alpha, periods, candidates)
        assert oracle.cost == pytest.approx(brute_force_schedule(auc, alpha, periods, candidates).cost, abs=1e-12)
        assert oracle.cost == pytest.approx(schedule_cost(auc, oracle.retrains, alpha, periods), abs=1e-12)


def test_oracle_refuses_a_candidate_outside_the_served_periods() -> None:
    with pytest.raises(ValueError, match="not served periods"):
        oracle_schedule(HAND, 0.02, PERIODS, [0, 3])


def test_the_target() -> None:
    assert meets_target(driftloop=2.0, never=3.0, every=2.5, oracle=1.9)  # regret 0.1 <= 0.3 * 0.6
    assert not meets_target(driftloop=2.3, never=3.0, every=2.5, oracle=1.9)  # 0.4 > 0.18
    assert not meets_target(driftloop=2.6, never=3.0, every=2.5, oracle=2.6)  # not below every


def test_census_world_loads_from_the_installed_nannyml(monkeypatch: pytest.MonkeyPatch) -> None:
    import nannyml

    def no_network(*_args, **_kwargs):
        raise AssertionError("the census world tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    from bench.worlds import CENSUS_CATEGORIES, WORLDS, census_rows

    rows = census_rows()
    assert sorted(rows["year"].unique().to_list()) == [2015, 2016, 2017, 2018]
    assert rows.height > 270_000  # every row of the four years
    periods = WORLDS["census"].data(500, seed=1)
    assert len(periods) == 13 and all(p.height == 500 for p in periods)
    assert {"AGEP", *CENSUS_CATEGORIES, "employed", "ts"} <= set(periods[0].columns)
    # no row twice within a year, another sample with another seed
    assert periods[1]["id"].is_in(periods[2]["id"]).sum() == 0
    assert not periods[1]["id"].equals(WORLDS["census"].data(500, seed=2, periods=2)[1]["id"])
    assert nannyml.__file__  # read from the package, not fetched
    parse_spec(WORLDS["census"].spec("31d"))


def test_every_world_is_a_valid_spec_and_reproducible() -> None:
    from bench.worlds import WORLDS

    for world in WORLDS.values():
        parse_spec(world.spec("31d"))
    first = WORLDS["gradual"].data(200, seed=3, periods=3)
    assert all(a.equals(b) for a, b in zip(first, WORLDS["gradual"].data(200, seed=3, periods=3), strict=True))


def spec_with(retrain: dict) -> dict:
    return {**LOAN_SPEC, "retrain": retrain}


def test_retrain_alpha_and_choose_are_validated() -> None:
    spec = parse_spec(spec_with({"window": {"choose": ["31d", "92d", "all"]}, "alpha": 0.05}))
    assert spec.retrain.alpha == 0.05
    assert [w.describe() for w in spec.retrain.window.candidates()] == ["last 31d", "last 92d", "all labelled rows"]
    assert parse_spec(LOAN_SPEC).retrain.alpha == 0.02  # the default
    for retrain, message in [
        ({"alpha": -0.1}, "retrain.alpha"),
        ({"alpha": 2}, "retrain.alpha"),
        ({"window": {"choose": ["31d"]}}, "give at least two"),
        ({"window": {"choose": ["31d", "31x"]}}, "'31x' is not a window"),
        ({"window": {"choose": ["31d", "31d"]}}, "twice"),
        ({"window": {"choose": ["31d", "all"], "last": "31d"}}, "exactly one of last, rows, all or choose"),
        ({"window": {"chose": ["31d", "all"]}}, "unknown key"),
    ]:
        with pytest.raises(SpecError, match=message):
            parse_spec(spec_with(retrain))
    without_ts = {**spec_with({"window": {"choose": ["31d", "all"]}}), "timestamp": None}
    without_ts["columns"] = {k: v for k, v in LOAN_SPEC["columns"].items() if k != "ts"}
    with pytest.raises(SpecError, match="needs a timestamp"):
        parse_spec(without_ts)


def test_the_flows_check_catches_a_changed_decision_or_metric() -> None:
    from bench.loop import compare

    replayed = {"decisions": {"driftloop": [[1, False, False, False], [2, True, True, True]]},
                "auc": {"driftloop": [0.8, 0.9]}}
    flows = [{"period": 1, "fired": False, "trained": False, "promoted": False, "auc": 0.8, "why": ""},
             {"period": 2, "fired": True, "trained": True, "promoted": True, "auc": 0.9, "why": ""}]
    assert compare(replayed, {"driftloop": flows}) == []
    flows[1]["promoted"] = False
    flows[0]["auc"] = 0.81
    problems = compare(replayed, {"driftloop": flows})
    assert len(problems) == 2 and "period 2" in problems[0] and "AUC" in problems[1]
