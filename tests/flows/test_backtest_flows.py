"""The replay of bench/loop.py is the loop: on a shortened world the replay's decisions
(fired, trained, promoted) and the champion's realized AUC per period equal those of the
real flows (labels, monitor, retrain, score) on a Prefect server. Then ``driftloop
backtest`` on that model's short labelled history, and ``window: {choose: [...]}``
recording the chosen window on the version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench.loop import compare, flow_run, replay_world
from bench.worlds import WORLDS, synthetic_spec
from driftloop.cli import main

pytestmark = [pytest.mark.prefect, pytest.mark.usefixtures("prefect_server")]

# The recurring world switches regime at period 3; its labels arrive at period 4, where
# monitoring should fire. Small and fast: 5 periods of 1,200 rows (a retrain waits for
# min_new_labels 1000), one Optuna trial.
WORLD, ROWS, TRIALS, PERIODS, WINDOW = "recurring", 1200, 1, 5, "31d"


@pytest.fixture(scope="module")
def flows_run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("loop")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DRIFTLOOP_PARITY_MIN_ROWS", "2000")
        mp.setenv("DRIFTLOOP_HOME", str(root / "unused"))  # flow_run sets its own; restored after the module
        rows = flow_run(WORLDS[WORLD], 0, ROWS, TRIALS, WINDOW, "driftloop", root, PERIODS)
        yield rows, root / f"{WORLD}-0-driftloop"


def test_replay_decisions_equal_the_flows(flows_run) -> None:
    rows, _ = flows_run
    replayed = replay_world(WORLD, 0, ROWS, TRIALS, WINDOW, PERIODS)
    assert compare(replayed, {"driftloop": rows}) == []
    # not a vacuous match: the policy fired and a retrain was promoted, in both
    assert any(r["fired"] for r in rows) and any(r["promoted"] for r in rows)
    assert [d[1:] for d in replayed["decisions"]["driftloop"]] == [[r["fired"], r["trained"], r["promoted"]] for r in rows]


def test_backtest_json_lists_every_window_with_its_figures(flows_run, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    _, home = flows_run
    monkeypatch.setenv("DRIFTLOOP_HOME", str(home))
    argv = ["backtest", "--model", WORLD, "--windows", "31d,all", "--trials", "1", "--last-periods", "3", "--json"]
    assert main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [w["window"] for w in payload["windows"]] == ["31d", "all"]
    # of period 0 (the training dataset) and periods 1-3 (scored, labels registered), the newest 3: 2 retrains judged
    assert [p[:7] for p in payload["periods"]] == ["2025-02", "2025-03", "2025-04"]
    for w in payload["windows"]:
        assert w["retrains"] == len(payload["periods"]) - 1 == len(w["realized"])
        assert all(v is not None and 0 <= v <= 1 for v in w["realized"])
        assert w["cost"] == pytest.approx(sum(1 - v for v in w["realized"]) + payload["alpha"] * w["retrains"])
    assert payload["alpha"] == 0.02  # the spec's default
    assert payload["chosen"] == min(payload["windows"], key=lambda w: w["cost"])["window"]
    assert main(["backtest", "--model", "absent", "--json"]) == 1
    assert "absent" in json.loads(capsys.readouterr().out)["error"]


def test_window_choose_records_the_chosen_window_on_the_version(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from driftloop.flows.labels import ingest_labels
    from driftloop.flows.retrain import retrain
    from driftloop.flows.score import score
    from driftloop.registry import open_registry
    from driftloop.settings import get_settings
    from driftloop.tasks.retrain import champion_spec
    from tests.support.models import train_fast

    monkeypatch.setenv("DRIFTLOOP_HOME", str(tmp_path / "home"))
    spec = synthetic_spec("choosy", WINDOW)
    spec["retrain"] = {**spec["retrain"], "window": {"choose": ["31d", "all"]}, "alpha": 0.03}
    spec_path = tmp_path / "choosy.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    data = WORLDS[WORLD].data(ROWS, seed=1, periods=3)
    data[0].write_parquet(tmp_path / "p0.parquet")
    train_fast(spec_path=str(spec_path), source=str(tmp_path / "p0.parquet"), trials=1, algorithms=["lightgbm"],
               parity_min_rows=2000)
    for m in (1, 2):
        data[m].drop("y").write_parquet(tmp_path / f"p{m}.parquet")
        score(input_uri=str(tmp_path / f"p{m}.parquet"), model="choosy@champion")
        data[m].select("id", "y").write_parquet(tmp_path / f"l{m}.parquet")
        ingest_labels(spec_path=str(spec_path), source=str(tmp_path / f"l{m}.parquet"))

    result = retrain(model="choosy", trials=1, algorithms=["lightgbm"], cooldown_s=0)
    assert not result.skipped, result.reason
    choice = result.window.choice
    assert choice is not None and [w.window for w in choice.windows] == ["31d", "all"]
    assert choice.alpha == 0.03 and all(w.cost is not None and w.retrains == 2 for w in choice.windows)
    assert choice.chosen == min(choice.windows, key=lambda w: w.cost).window
    assert result.window.policy == ("last 31d" if choice.chosen == "31d" else "all labelled rows")
    registry = open_registry(get_settings().registry_database_url())
    version = registry.get_version("choosy", result.challenger.version)
    assert version.window["choice"]["chosen"] == choice.chosen
    assert version.window["choice"]["windows"][0]["realized"] == choice.windows[0].realized
    # the version keeps the spec with choose: the next retrain chooses again
    assert champion_spec(version).retrain.window.choose == ["31d", "all"]
