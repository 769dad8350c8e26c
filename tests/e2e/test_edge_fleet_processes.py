"""A fleet of 20 edge agent processes (distinct device ids and caches, no registry) on
the signed channel, with the rollout controller run as the ``edge-rollout`` flow on a
real Prefect server: a healthy new version advances 5% -> 25% -> 100%; a version whose
scores are shifted is stopped in the first wave, every device ends on the previous
version, and no device outside the first wave ever loaded it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from driftloop.channel import device_wave, generate_key_pair
from tests.support.data import make_loans, write_spec
from tests.support.models import train_fast

# 20 processes importing the scorer: minutes on a loaded 2-core machine (12 min measured at load 27).
pytestmark = [pytest.mark.prefect, pytest.mark.e2e, pytest.mark.timeout(1800), pytest.mark.usefixtures("prefect_server")]

AGENT = Path(__file__).resolve().parents[1] / "support" / "edge_fleet_agent.py"
WAVES = [0.05, 0.25, 1.0]
# Latency is left out of this test's judgement (a shared machine's timing is noise): the
# bad version is the one whose scores moved. Failed runs and PSI keep their defaults.
ROLLOUT = {"edge": {"waves": WAVES, "bake": "0s", "abort": {"latency_p95_ratio": 1000}}}


def devices(n: int = 20) -> list[str]:
    """n device ids whose first wave is not empty (5% of 20 may be nobody)."""
    for start in range(1000):
        ids = [f"truck-{start}-{i:02d}" for i in range(n)]
        if any(device_wave("loans", d, WAVES) == 0 for d in ids):
            return ids
    raise AssertionError("no id set with a first wave")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from driftloop.flows.ingest import ingest

    root = tmp_path_factory.mktemp("process-fleet")
    private, public = generate_key_pair()
    (root / "key.pem").write_bytes(private)
    (root / "key.pub").write_bytes(public)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DRIFTLOOP_HOME", str(root / "home"))
        mp.setenv("DRIFTLOOP_CHANNEL_KEY_FILE", str(root / "key.pem"))  # the registry side signs
        spec = write_spec(root, {"rollout": ROLLOUT})
        data = root / "train.parquet"
        make_loans(3000, seed=1).write_parquet(data)
        dataset = ingest(spec_path=str(spec), source=str(data)).dataset_id
        first = train_fast(spec_path=str(spec), dataset_id=dataset, trials=1, algorithms=["lightgbm"],
                           parity_min_rows=2000)
        score = root / "score.csv"
        make_loans(200, seed=5).drop("repaid").with_columns(pl.col("ts").dt.strftime("%Y-%m-%d %H:%M:%S")) \
            .write_csv(score)
        ids = devices()
        env = {**os.environ, "DRIFTLOOP_HOME": str(root / "device-home"),
               "DRIFTLOOP_REGISTRY_URL": "postgresql+psycopg://edge@127.0.0.1:1/registry",  # devices: no registry
               # 20 processes on a few cores: one thread each, as a small device would run.
               "POLARS_MAX_THREADS": "1", "OMP_NUM_THREADS": "1"}
        env.pop("DRIFTLOOP_CHANNEL_KEY_FILE", None)
        from driftloop.settings import get_settings

        channel = f"{get_settings().artifact_root_uri()}/channels/loans.json"
        agents = [subprocess.Popen([sys.executable, str(AGENT), str(root / "fleet"), d, channel,
                                    str(root / "key.pub"), str(score)], env=env, cwd=root,
                                   stdout=subprocess.DEVNULL, stderr=open(root / f"{d}.log", "w"))  # noqa: SIM115
                  for d in ids]
        try:
            yield {"root": root, "spec": spec, "dataset": dataset, "v1": first.version, "ids": ids, "rounds": [0]}
        finally:
            (root / "fleet").mkdir(exist_ok=True)
            (root / "fleet" / "stop").write_text("")
            for agent in agents:
                try:
                    agent.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    agent.kill()


def play_round(fleet: dict) -> dict[str, int]:
    """Every agent scores once; their versions by device."""
    fleet["rounds"][0] += 1
    n = fleet["rounds"][0]
    base = fleet["root"] / "fleet"
    (base / "rounds").mkdir(parents=True, exist_ok=True)
    (base / "rounds" / str(n)).write_text("")
    deadline = time.monotonic() + 600
    while True:
        found = {d: base / "results" / f"{n}-{d}.json" for d in fleet["ids"]}
        if all(p.exists() for p in found.values()):
            break
        assert time.monotonic() < deadline, f"round {n}: agents did not answer; logs in {fleet['root']}"
        time.sleep(0.2)
    results = {d: json.loads(p.read_text()) for d, p in found.items()}
    errors = {d: r["error"] for d, r in results.items() if r["error"] or r["refused"]}
    assert not errors, errors
    return {d: r["version"] for d, r in results.items()}


def controller_step():
    """The controller as the deployment runs it: the edge-rollout flow, on the server."""
    from driftloop.flows.edge_rollout import edge_rollout

    return edge_rollout(model="loans")


def new_version(fleet: dict, seed: int, *, algorithm: str, shifted: bool = False) -> int:
    from driftloop.flows.ingest import ingest
    from driftloop.registry import open_registry
    from driftloop.settings import get_settings

    frame = make_loans(3000, seed=seed, start="2024-03-01")
    if shifted:  # nearly every loan repaid: the model scores everyone high
        frame = frame.with_columns(pl.Series("repaid", [0 if i % 20 == 0 else 1 for i in range(frame.height)]))
    data = fleet["root"] / f"train-{seed}.parquet"
    frame.write_parquet(data)
    dataset = ingest(spec_path=str(fleet["spec"]), source=str(data)).dataset_id
    trained = train_fast(spec_path=str(fleet["spec"]), dataset_id=dataset, trials=1, algorithms=[algorithm],
                         parity_min_rows=2000, promote=False)
    open_registry(get_settings().registry_database_url()).promote("loans", trained.version, actor="test",
                                                                    reason="a new champion for the fleet")
    return trained.version


def test_waves_advance_on_a_healthy_version_and_stop_on_a_bad_one(fleet: dict,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIFTLOOP_HOME", str(fleet["root"] / "home"))
    monkeypatch.setenv("DRIFTLOOP_CHANNEL_KEY_FILE", str(fleet["root"] / "key.pem"))
    ids, v1 = fleet["ids"], fleet["v1"]
    waves = {d: device_wave("loans", d, WAVES) for d in ids}
    timeline: list[str] = []

    assert set(play_round(fleet).values()) == {v1}
    v2 = new_version(fleet, 11, algorithm="xgboost")
    seen: list[dict[str, int]] = []
    for _ in range(6):
        versions = play_round(fleet)
        seen.append(versions)
        step = controller_step()
        timeline.append(f"healthy v{v2}: {sum(v == v2 for v in versions.values())}/{len(ids)} devices on v{v2}; "
                        f"controller: {step.action} -> wave {step.wave} ({step.state}) {step.figures}")
        if step.state == "complete":
            break
    assert step.state == "complete", timeline
    assert set(play_round(fleet).values()) == {v2}
    on_new = [sum(v == v2 for v in versions.values()) for versions in seen]
    assert on_new[0] == sum(w == 0 for w in waves.values()) < len(ids), timeline  # the first wave alone
    assert on_new == sorted(on_new), timeline
    for versions in seen:  # whole waves move, in order
        opened = max(waves[d] for d, v in versions.items() if v == v2)
        assert all((v == v2) == (waves[d] <= opened) for d, v in versions.items()), timeline

    v3 = new_version(fleet, 13, algorithm="lightgbm", shifted=True)
    loaded_bad: set[str] = set()
    for _ in range(3):
        versions = play_round(fleet)
        loaded_bad |= {d for d, v in versions.items() if v == v3}
        step = controller_step()
        timeline.append(f"bad v{v3}: {sum(v == v3 for v in versions.values())}/{len(ids)} devices on v{v3}; "
                        f"controller: {step.action} -> wave {step.wave} ({step.state}) {step.reasons}")
        if step.state != "rolling":
            break
    assert step.state == "aborted" and step.wave == 0, timeline
    assert any("PSI" in r for r in step.reasons), timeline
    assert loaded_bad and all(waves[d] == 0 for d in loaded_bad), timeline
    assert set(play_round(fleet).values()) == {v2}, timeline  # every device back on the previous version
    print("\n".join(timeline))
