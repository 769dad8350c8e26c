"""Promotion on production evidence, on a real Prefect server: worlds in which the
retrain's gate and production disagree, decided by the rows both models scored.

- The world turns back: the retrain learned a concept that is gone by the time it
  serves. Its gate passes; its shadow rows reject it; the champion never changes.
- The world moves on: the candidate is better on its shadow rows and is promoted once
  enough of them are labelled, not before. Then the world turns back, and the guard rolls
  the new champion back to the one it replaced.
- Shadow scoring reads the input once; served rows are those of a run without shadow;
  a fraction shadows the same ids on every run.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import polars as pl
import pytest

from driftloop.flows.labels import ingest_labels
from driftloop.flows.retrain import retrain
from driftloop.flows.score import ScoreSummary, score
from driftloop.registry import open_registry
from driftloop.rollout import shadow_mask
from driftloop.settings import get_settings
from driftloop.tables import open_tables
from tests.support.data import make_period, write_spec
from tests.support.models import train_fast

pytestmark = [pytest.mark.prefect, pytest.mark.usefixtures("prefect_server")]

FAST = {"trials": 1, "algorithms": ["lightgbm"]}
GATE = {"thresholds": {"roc_auc": {"min": 0.6}}, "max_regression": 0.01}
ROLLOUT = {"shadow": {"min_labelled_rows": 1500, "confidence": 0.95},
           "guard": {"days": 30, "tolerance": 0.01, "min_labelled_rows": 1500}}


def start(tmp_path: Path, name: str, rollout: dict = ROLLOUT, gate: dict = GATE) -> Path:
    """v1, trained on the old concept, under a spec with a rollout section."""
    spec = write_spec(tmp_path, {"name": name, "gate": gate, "rollout": rollout,
                                 "retrain": {"window": {"last": "35d"}, "min_new_labels": 500}}, name=f"{name}.yaml")
    old = make_period(3000, start="2024-01-01", days=120, seed=1, first_id=0, concept="old")
    path = tmp_path / f"{name}-old.parquet"
    old.write_parquet(path)
    v1 = train_fast(spec_path=str(spec), source=str(path), parity_min_rows=2000, **FAST)
    assert v1.version == 1 and v1.promoted  # the first model has nothing to compete with
    return spec


def score_period(tmp_path: Path, name: str, frame: pl.DataFrame, tag: str) -> ScoreSummary:
    path = tmp_path / f"{name}-{tag}.parquet"
    frame.drop("repaid").write_parquet(path)
    return score(input_uri=str(path), model=f"{name}@champion")


def label_period(tmp_path: Path, spec: Path, name: str, frame: pl.DataFrame, tag: str) -> None:
    path = tmp_path / f"{name}-{tag}-labels.csv"
    frame.select("id", "repaid").write_csv(path)
    ingest_labels(spec_path=str(spec), source=str(path))  # decides the rollout when one is in progress


def candidate_from_new_concept(tmp_path: Path, spec: Path, name: str) -> None:
    """The world changes: a month of the new concept is scored and labelled; the retrain
    learns it, passes its gate on that month's newest rows, and becomes candidate."""
    registry = open_registry(get_settings().registry_database_url())
    new = make_period(2000, start="2024-05-01", days=30, seed=2, first_id=10_000, concept="new")
    score_period(tmp_path, name, new, "new")
    label_period(tmp_path, spec, name, new, "new")
    result = retrain(model=name, **FAST)
    assert not result.skipped and result.candidate == 2 and not result.promoted, result.reason
    assert "candidate" in result.reason
    assert registry.aliases(name) == {"champion": 1, "candidate": 2}
    # While the candidate is in shadow, a drift event's retrain is turned away.
    again = retrain(model=name, cooldown_s=0, **FAST)
    assert again.skipped and again.reason.startswith("candidate v2 is in shadow beside champion v1"), again.reason


def events_of(prefect_server, name: str, since: float, count: int, timeout: float = 30) -> list[str]:
    body = {"filter": {"occurred": {"since": datetime.fromtimestamp(since, UTC).isoformat()},
                       "event": {"prefix": ["driftloop.model."]},
                       "resource": {"id": [f"driftloop.model.{name}"]}}, "limit": 50}
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.post(f"{prefect_server.api_url}/events/filter", json=body, timeout=10)
        response.raise_for_status()
        found = [e["event"] for e in response.json()["events"]]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def figures(d) -> str:
    return (f"{d.verdict}: {d.metric} served v{d.served_version} {d.served_metric:.4f}, shadow v{d.shadow_version} "
            f"{d.shadow_metric:.4f} on {d.rows_labelled} rows; difference {d.difference:+.4f} "
            f"[{d.lower:+.4f}, {d.upper:+.4f}]")


def test_a_candidate_worse_on_production_is_rejected_and_the_champion_never_changes(
        tmp_path: Path, home: Path, prefect_server) -> None:
    since = time.time()
    name = "turns_back"
    registry = open_registry(get_settings().registry_database_url())
    spec = start(tmp_path, name)
    candidate_from_new_concept(tmp_path, spec, name)

    # The world turns back to the old concept: the candidate's gate was a fluke of its window.
    back = make_period(2000, start="2024-06-01", days=30, seed=3, first_id=20_000, concept="old")
    scored = score_period(tmp_path, name, back, "back")
    assert scored.version == 1 and scored.shadow_version == 2 and scored.shadow_rows == scored.rows_scored == 2000
    label_period(tmp_path, spec, name, back, "back")

    decision = registry.list_rollout_decisions(name)[0]
    print(f"\nworld turns back: {figures(decision)}")
    assert decision.verdict == "reject" and decision.applied and decision.phase == "shadow"
    assert decision.rows_labelled == 2000 and decision.upper < 0 < decision.served_metric - decision.shadow_metric
    assert decision.predictions_snapshot and decision.labels_snapshot  # its rows can be read again
    assert registry.aliases(name) == {"champion": 1}
    assert all(e.to_version != 2 for e in registry.alias_history(name) if e.alias == "champion")
    assert "driftloop.model.candidate-rejected" in events_of(prefect_server, name, since, 1)
    # The rejection holds the retrain cooldown: the loop does not retrain into the same model at once.
    held = retrain(model=name, **FAST)
    assert held.skipped and held.reason.startswith("cooldown:") and "rejected" in held.reason


def test_a_better_candidate_is_promoted_once_enough_rows_are_labelled_and_the_guard_rolls_it_back(
        tmp_path: Path, home: Path, prefect_server, capsys) -> None:
    from driftloop.cli import main

    since = time.time()
    name = "moves_on"
    registry = open_registry(get_settings().registry_database_url())
    spec = start(tmp_path, name)
    candidate_from_new_concept(tmp_path, spec, name)

    # The new concept stays. 1000 labelled shadow rows: fewer than min_labelled_rows, so no decision.
    first = make_period(1000, start="2024-06-01", days=15, seed=3, first_id=20_000, concept="new")
    assert score_period(tmp_path, name, first, "first").shadow_rows == 1000
    label_period(tmp_path, spec, name, first, "first")
    waiting = registry.list_rollout_decisions(name)[0]
    assert waiting.verdict == "waiting" and not waiting.applied and waiting.rows_labelled == 1000
    assert registry.aliases(name) == {"champion": 1, "candidate": 2}
    assert main(["rollout", "status", "--model", name, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["phase"] == "shadow" and status["champion"] == 1 and status["candidate"] == 2
    assert status["rows_labelled"] == 1000 and status["verdict"] == "waiting" and status["verdict_since"]
    assert status["shadow_metric"] > status["champion_metric"]

    second = make_period(1000, start="2024-06-16", days=15, seed=4, first_id=30_000, concept="new")
    score_period(tmp_path, name, second, "second")
    label_period(tmp_path, spec, name, second, "second")
    promoted = registry.list_rollout_decisions(name)[0]
    with capsys.disabled():
        print(f"\nworld moves on: {figures(promoted)}")
    assert promoted.verdict == "promote" and promoted.applied and promoted.rows_labelled == 2000
    assert promoted.lower > 0
    assert registry.aliases(name) == {"champion": 2}

    # The guard: the replaced champion scores in shadow; the world turns back to the old concept.
    back = make_period(2000, start="2024-07-01", days=30, seed=5, first_id=40_000, concept="old")
    scored = score_period(tmp_path, name, back, "back")
    assert scored.version == 2 and scored.shadow_version == 1 and scored.shadow_rows == 2000
    label_period(tmp_path, spec, name, back, "back")
    rolled = registry.list_rollout_decisions(name)[0]
    with capsys.disabled():
        print(f"\nguard after the world turns back: {figures(rolled)}")
    assert rolled.verdict == "rollback" and rolled.applied and rolled.phase == "guard"
    assert (rolled.served_version, rolled.shadow_version, rolled.rows_labelled) == (2, 1, 2000)
    assert rolled.upper < -0.01 and rolled.served_metric < rolled.shadow_metric
    assert registry.aliases(name) == {"champion": 1}
    assert registry.alias_history(name)[-1].reason.startswith("rollback: rollout guard")
    found = events_of(prefect_server, name, since, 2)
    assert {"driftloop.model.promoted", "driftloop.model.rolled-back"} <= set(found), found
    held = retrain(model=name, **FAST)
    assert held.skipped and held.reason.startswith("cooldown:") and "rolled back" in held.reason
    assert main(["rollout", "status", "--model", name]) == 0
    assert "settled" in capsys.readouterr().out


def test_shadow_reads_the_input_once_serves_the_same_rows_and_shadows_the_same_ids(
        tmp_path: Path, home: Path, monkeypatch) -> None:
    import driftloop.tasks.score as scoring

    name = "shadowed"
    loose = {"thresholds": {"roc_auc": {"min": 0.6}}, "max_regression": 0.5}
    spec = start(tmp_path, name, rollout={"shadow": {"fraction": 0.2}}, gate=loose)
    registry = open_registry(get_settings().registry_database_url())
    tables = open_tables(registry.engine, get_settings().artifact_root_uri())
    rows = make_period(3000, start="2024-05-01", days=30, seed=7, first_id=50_000, concept="old")
    path = tmp_path / "input.parquet"
    rows.drop("repaid").write_parquet(path)  # once: every run below scores the same files (same input key)
    served_before = score(input_uri=str(path), model=f"{name}@champion")
    assert served_before.shadow_version is None

    def served(run_id: str) -> pl.DataFrame:
        return (tables.predictions(name).scan().filter((pl.col("scoring_run_id") == run_id) & (pl.col("role") == "served"))
                .drop("scored_at", "scoring_run_id").collect().sort("id"))

    without_shadow = served(served_before.run_id)
    # v2 by hand (driftloop train): the gate passes, and under a shadow policy it becomes candidate.
    more = make_period(4000, start="2024-01-01", days=120, seed=8, first_id=100_000, concept="old")
    more_path = tmp_path / "more.parquet"
    more.write_parquet(more_path)
    v2 = train_fast(spec_path=str(spec), source=str(more_path), parity_min_rows=2000, **FAST)
    assert v2.candidate and not v2.promoted and registry.aliases(name) == {"champion": 1, "candidate": 2}

    reads: list[str] = []
    real = scoring.iter_input

    def counted(uri, *args, **kwargs):
        reads.append(uri)
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(scoring, "iter_input", counted)
    expected = set(rows.filter(pl.Series(shadow_mask(rows["id"], 0.2)))["id"].to_list())
    for n in (1, 2):  # the second run replaces the first's rows, shadow rows included
        run = score(input_uri=str(path), model=f"{name}@champion", output_uri=str(tmp_path / f"export-{n}.parquet"))
        assert len(reads) == n  # one read of the input per run, shadow included
        assert served(run.run_id).equals(without_shadow)  # bit for bit, but for the run's id and time
        shadow = (tables.predictions(name).scan()
                  .filter((pl.col("scoring_run_id") == run.run_id) & (pl.col("role") == "shadow")).collect())
        assert set(shadow["id"].to_list()) == expected and run.shadow_rows == len(expected)
        assert shadow["model_version"].unique().to_list() == [2]
        exported = pl.read_parquet(run.output_uri)  # consumers get the served rows only
        assert exported.height == rows.height and exported["role"].unique().to_list() == ["served"]
    # A re-run of the same input replaced the earlier run's rows, shadow included.
    everything = tables.predictions(name).scan().collect()
    assert everything.filter(pl.col("role") == "shadow").height == len(expected)
    assert everything.filter(pl.col("role") == "served").height == rows.height
    assert 0.15 < len(expected) / rows.height < 0.25
