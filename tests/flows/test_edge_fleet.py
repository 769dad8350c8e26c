"""The edge agent on the signed channel with a real model: no registry on the device,
rows sent home through the store's inbox and committed exactly once, an offline device
catching up, a refused manifest through the command line, and the rollout flow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from driftloop.channel import (
    channel_relpath,
    generate_key_pair,
    new_manifest,
    publish_champion,
    target_of,
    write_manifest,
)
from driftloop.registry import open_registry
from driftloop.settings import get_settings
from driftloop.spec import EdgeRollout
from driftloop.storage import ArtifactStore
from driftloop.tables import INPUT_KEY, SCORING_RUN
from driftloop.tasks import edge_agent
from driftloop.tasks.edge import ChannelSource
from driftloop.tasks.edge_agent import AgentConfig, run_agent
from driftloop.tasks.edge_inbox import INBOX, edge_input_key, ingest_inbox
from tests.support.data import make_loans
from tests.support.models import loans_champion

pytestmark = [pytest.mark.prefect, pytest.mark.usefixtures("prefect_server")]

UNREACHABLE_REGISTRY = "postgresql+psycopg://edge@127.0.0.1:1/registry"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("edge-fleet")
    with loans_champion(root) as spec:
        private, public = generate_key_pair()
        (root / "key.pub").write_bytes(public)
        settings = get_settings()
        store = ArtifactStore(settings.artifact_root_uri())
        registry = open_registry(settings.registry_database_url())
        manifest = publish_champion(registry, store, "loans", private)
        data = root / "score.csv"
        make_loans(300, seed=5).drop("repaid").with_columns(pl.col("ts").dt.strftime("%Y-%m-%d %H:%M:%S")) \
            .write_csv(data)
        yield {"root": root, "spec": spec, "store": store, "registry": registry, "private": private,
               "public": public, "version": manifest.version, "input": data,
               "channel": store.uri(channel_relpath("loans")), "registry_url": settings.registry_database_url()}


def agent(fleet: dict, tmp_path: Path, device: str, out: str, **overrides) -> AgentConfig:
    return AgentConfig(model="loans", input_uri=str(fleet["input"]), output_uri=str(tmp_path / out),
                       cache_root=tmp_path / "cache", device_id=device,
                       channel=ChannelSource(fleet["channel"], fleet["public"], device), batch_size=100, **overrides)


def table_rows(fleet: dict) -> pl.DataFrame:
    from driftloop.tables import open_tables

    table = open_tables(fleet["registry"].engine, fleet["store"].root).predictions("loans")
    assert table is not None
    return table.scan().collect()


def committed(fleet: dict, run_id: str) -> int:
    return table_rows(fleet).filter(pl.col(SCORING_RUN) == run_id).height


def ingest(fleet: dict):
    registry = fleet["registry"]
    from driftloop.tables import open_tables

    return ingest_inbox(fleet["store"], open_tables(registry.engine, fleet["store"].root), registry, "loans")


def test_a_device_without_a_registry_scores_from_the_channel_and_its_rows_land_once(
        fleet: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIFTLOOP_REGISTRY_URL", UNREACHABLE_REGISTRY)  # a device has no registry
    first = run_agent(agent(fleet, tmp_path, "dev-a", "o1"))
    assert first.version == fleet["version"] and first.refused is None and not first.offline
    assert first.rows_scored == 300 and first.upload == "sent" and first.queued_runs == 0

    # Offline: the store's inbox cannot be reached; runs queue on the device, oldest kept.
    def outage(*_args, **_kwargs):
        raise ConnectionRefusedError(111, "Connection refused")

    with monkeypatch.context() as offline:
        offline.setattr(edge_agent, "upload_run", outage)
        second = run_agent(agent(fleet, tmp_path, "dev-a", "o2"))
        third = run_agent(agent(fleet, tmp_path, "dev-a", "o3"))
        full = run_agent(agent(fleet, tmp_path, "dev-a", "o4", outbox_budget_bytes=1))
    assert second.upload.startswith("queued") and third.queued_runs == 2
    assert full.upload == "not queued: outbox full" and full.rows_scored == 300  # said loudly, scored all the same
    outbox = tmp_path / "cache" / "loans" / "outbox"
    assert sorted(p.name for p in outbox.iterdir()) == sorted([second.run_id, third.run_id])  # the oldest kept
    keep = tmp_path / "kept"
    shutil.copytree(outbox, keep)

    # A killed upload left parts without telemetry: not ingested.
    partial = Path(fleet["store"].path(f"{INBOX}/loans/dev-a/{second.run_id}"))
    partial.mkdir(parents=True)
    for part in (keep / second.run_id).glob("part-*"):
        shutil.copy(part, partial / part.name)
    report = ingest(fleet)
    assert first.run_id in report.committed and second.run_id not in report.committed

    # Back online: the next run sends the queue and itself; each run lands once.
    fourth = run_agent(agent(fleet, tmp_path, "dev-a", "o5"))
    assert fourth.upload == "sent" and fourth.queued_runs == 0 and not any(outbox.iterdir())
    report = ingest(fleet)
    assert sorted(report.committed) == sorted([second.run_id, third.run_id, fourth.run_id])

    # The device uploads a run again (a crash after its upload, before the outbox let go):
    # the commit replaces that run's rows, never adds them twice.
    edge_agent.upload_run(keep / second.run_id, fleet["store"].uri(INBOX), "loans", "dev-a")
    assert ingest(fleet).committed == [second.run_id]
    for run in (first, second, third, fourth):
        assert committed(fleet, run.run_id) == 300, run.run_id
    assert committed(fleet, full.run_id) == 0
    rows = table_rows(fleet).filter(pl.col(SCORING_RUN) == second.run_id)
    assert set(rows["device_id"]) == {"dev-a"} and set(rows["role"]) == {"served"}
    assert set(rows[INPUT_KEY]) == {edge_input_key("dev-a", second.run_id)}
    recorded = fleet["registry"].get_scoring_run(second.run_id)
    assert recorded is not None and recorded.rows_scored == 300  # counts like any scoring run


def test_the_command_names_a_refused_manifest_and_keeps_serving(fleet: dict, tmp_path: Path) -> None:
    env = {**os.environ, "DRIFTLOOP_HOME": str(tmp_path / "device-home"), "DRIFTLOOP_REGISTRY_URL": UNREACHABLE_REGISTRY,
           "DRIFTLOOP_EDGE_CACHE_DIR": str(tmp_path / "cache")}
    (tmp_path / "key.pub").write_bytes(fleet["public"])
    command = [str(Path(sys.executable).with_name("driftloop")), "edge", "score", "--model", "loans", "--input",
               str(fleet["input"]), "--channel", fleet["channel"], "--public-key", str(tmp_path / "key.pub"),
               "--device-id", "dev-cli", "--json", "--inbox", str(tmp_path / "inbox")]
    ok = subprocess.run([*command, "--output", str(tmp_path / "c1")], check=False, env=env, capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    served = json.loads(ok.stdout)
    assert served["version"] == fleet["version"] and served["refused"] is None and served["rows_scored"] == 300

    # Someone without the private key writes the channel: refused, named, the cached model serves.
    store = fleet["store"]
    good = store.fs.cat_file(store.path(channel_relpath("loans")))
    record = fleet["registry"].resolve("loans")
    forged, _ = generate_key_pair()
    try:
        write_manifest(store, new_manifest("loans", target_of(record, store.root), None, EdgeRollout(),
                                           now=datetime.now(UTC)), forged)
        refused = subprocess.run([*command, "--output", str(tmp_path / "c2")], check=False, env=env,
                                 capture_output=True, text=True, timeout=300)
    finally:
        store.write_bytes(channel_relpath("loans"), good)
    assert refused.returncode == 0, refused.stderr
    result = json.loads(refused.stdout)
    assert result["refused"].startswith("signature") and result["version"] == fleet["version"]
    assert result["cache_hit"] and result["rows_scored"] == 300


def test_the_rollout_flow_commits_uploads_and_re_signs_the_channel(fleet: dict, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from driftloop.channel import verify
    from driftloop.flows.edge_rollout import edge_rollout
    from driftloop.flows.score_edge import score_edge

    (tmp_path / "key.pem").write_bytes(fleet["private"])
    (tmp_path / "key.pub").write_bytes(fleet["public"])
    monkeypatch.setenv("DRIFTLOOP_HOME", str(fleet["root"] / "home"))
    monkeypatch.setenv("DRIFTLOOP_CHANNEL_KEY_FILE", str(tmp_path / "key.pem"))
    monkeypatch.setenv("DRIFTLOOP_EDGE_CACHE_DIR", str(tmp_path / "cache"))
    before = verify(fleet["store"].fs.cat_file(fleet["store"].path(channel_relpath("loans"))), fleet["public"],
                    model="loans")
    scored = score_edge(input_uri=str(fleet["input"]), output_uri=str(tmp_path / "out"), model="loans",
                        device_name="dev-flow", channel_uri=fleet["channel"],
                        public_key_path=str(tmp_path / "key.pub"))
    assert scored.upload == "sent" and scored.device_id == "dev-flow"
    result = edge_rollout(model="loans")
    assert result.runs_committed >= 1 and result.runs_rejected == 0
    assert result.action == "idle" and result.version == fleet["version"]  # one version: nothing to roll out
    after = verify(fleet["store"].fs.cat_file(fleet["store"].path(channel_relpath("loans"))), fleet["public"],
                   model="loans")
    assert after.issued_at > before.issued_at  # re-signed: the expiry moves on
    assert committed(fleet, scored.run_id) == 300


def test_the_signing_key_can_live_in_a_prefect_secret_block(tmp_path: Path) -> None:
    import argparse

    from driftloop.channel import public_key_of, signing_key
    from driftloop.cli.edge import cmd_keys_init
    from driftloop.settings import Settings

    made = cmd_keys_init(argparse.Namespace(secret_block="edge-channel-key", public_key=str(tmp_path / "k.pub"),
                                            private_key=None, force=True))
    assert made["private_key"] == "secret block edge-channel-key" and not (tmp_path / "k.pem").exists()
    private = signing_key(Settings(channel_key_block="edge-channel-key"))
    assert private is not None and public_key_of(private) == (tmp_path / "k.pub").read_bytes()
