"""The signed edge channel, waves and the rollout controller, on fake artifacts: a
manifest signed with another key, an expired one and an artifact whose hash differs are
refused by name while the cached model keeps serving; a simulated fleet of 24 devices
(each its own cache, reading the real signed channel file) advances wave by wave on
healthy telemetry and stops in the first wave on bad telemetry."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from driftloop.channel import (
    ChannelTarget,
    ManifestRefused,
    channel_relpath,
    device_wave,
    generate_key_pair,
    new_manifest,
    publish_champion,
    resign,
    sign,
    verify,
    write_manifest,
)
from driftloop.errors import DriftloopError
from driftloop.registry.store import open_registry
from driftloop.spec import EdgeAbort, EdgeRollout
from driftloop.storage import ArtifactStore
from driftloop.tasks.edge import ChannelSource, ModelCache, refresh_from_channel
from driftloop.tasks.edge_agent import EdgeTelemetry, score_histogram
from driftloop.tasks.edge_rollout import apply, judge, psi
from tests.unit.test_registry import complete, version_draft

NOW = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
PLAN = EdgeRollout(waves=[0.05, 0.25, 1.0], bake="1h", abort=EdgeAbort(error_rate=0.01, latency_p95_ratio=1.5,
                                                                          score_psi=0.25))


@pytest.fixture
def keys() -> tuple[bytes, bytes]:
    return generate_key_pair()


def put_artifact(store: ArtifactStore, version: int, payload: bytes | None = None) -> ChannelTarget:
    data = payload or f"model v{version}".encode()
    relpath = f"models/loans/onnx/v{version}.onnx"
    store.write_bytes(relpath, data)
    return ChannelTarget(version=version, artifact=relpath, sha256=hashlib.sha256(data).hexdigest())


def publish(store: ArtifactStore, manifest, private: bytes) -> str:
    write_manifest(store, manifest, private)
    return store.uri(channel_relpath("loans"))


# --- signatures, expiry, hashes --------------------------------------------------------


def test_a_signed_manifest_verifies_and_any_change_is_refused(keys) -> None:
    private, public = keys
    manifest = new_manifest("loans", ChannelTarget(version=2, artifact="models/a.onnx", sha256="a" * 64), None, PLAN,
                            now=NOW)
    data = sign(manifest, private)
    assert verify(data, public, model="loans", now=NOW).version == 2

    document = json.loads(data)
    document["payload"] = document["payload"].replace('"version":2', '"version":3')
    with pytest.raises(ManifestRefused) as err:
        verify(json.dumps(document).encode(), public, model="loans", now=NOW)
    assert err.value.cause == "signature"

    other_private, _ = generate_key_pair()
    with pytest.raises(ManifestRefused, match=r"\(signature\).*another key") as err:
        verify(sign(manifest, other_private), public, model="loans", now=NOW)
    with pytest.raises(ManifestRefused, match=r"\(expired\)"):
        verify(data, public, model="loans", now=manifest.expires_at + timedelta(seconds=1))
    with pytest.raises(ManifestRefused, match=r"\(model\)"):
        verify(data, public, model="other", now=NOW)
    with pytest.raises(ManifestRefused, match=r"\(replayed\)"):
        verify(data, public, model="loans", now=NOW, not_before=NOW + timedelta(minutes=1))
    with pytest.raises(ManifestRefused, match=r"\(unreadable\)"):
        verify(b"{not json", public, model="loans", now=NOW)


def test_a_signed_manifest_naming_a_path_outside_the_store_is_refused(keys) -> None:
    private, public = keys
    evil = new_manifest("loans", ChannelTarget.model_construct(version=2, artifact="../../etc/passwd",
                                                               sha256="a" * 64), None, PLAN, now=NOW)
    with pytest.raises(ManifestRefused, match=r"\(malformed\)"):
        verify(sign(evil, private), public, model="loans", now=NOW)


def test_refused_manifests_leave_the_verified_cached_model_serving(tmp_path: Path, keys) -> None:
    private, public = keys
    store = ArtifactStore(str(tmp_path / "store"))
    v1 = put_artifact(store, 1)
    channel = publish(store, new_manifest("loans", v1, None, PLAN, now=datetime.now(UTC)), private)
    cache = ModelCache(tmp_path / "cache", "loans")
    source = ChannelSource(channel, public, "dev-1")
    first = refresh_from_channel(cache, source)
    assert first.version == 1 and not first.cache_hit and first.refused is None and first.read() == b"model v1"

    v2 = put_artifact(store, 2)
    other_private, _ = generate_key_pair()
    publish(store, new_manifest("loans", v2, None, PLAN, now=datetime.now(UTC)), other_private)
    by_other_key = refresh_from_channel(cache, source)
    assert by_other_key.version == 1 and by_other_key.refused.startswith("signature")

    expired = new_manifest("loans", v2, None, PLAN, now=datetime.now(UTC) - timedelta(days=30))
    publish(store, expired, private)
    late = refresh_from_channel(cache, source)
    assert late.version == 1 and late.refused.startswith("expired")

    wrong = ChannelTarget(version=2, artifact=v2.artifact, sha256=hashlib.sha256(b"something else").hexdigest())
    publish(store, new_manifest("loans", wrong, None, PLAN, now=datetime.now(UTC)), private)
    tampered = refresh_from_channel(cache, source)
    assert tampered.version == 1 and tampered.refused.startswith("artifact_hash") and "sha256" in tampered.refused
    assert cache.state()["current"]["version"] == 1  # nothing of v2 was installed

    publish(store, new_manifest("loans", v2, None, PLAN, now=datetime.now(UTC)), private)
    fine = refresh_from_channel(cache, source)
    assert fine.version == 2 and fine.refused is None and cache.state()["previous"]["version"] == 1


def test_a_refusal_with_nothing_cached_scores_nothing(tmp_path: Path, keys) -> None:
    _, public = keys
    other_private, _ = generate_key_pair()
    store = ArtifactStore(str(tmp_path / "store"))
    channel = publish(store, new_manifest("loans", put_artifact(store, 1), None, PLAN, now=NOW), other_private)
    with pytest.raises(DriftloopError, match=r"\(signature\).*nothing is scored"):
        refresh_from_channel(ModelCache(tmp_path / "cache", "loans"), ChannelSource(channel, public, "dev-1"))


# --- the registry publishes on every champion move ----------------------------------------


def test_every_champion_move_publishes_the_channel(tmp_path: Path, keys) -> None:
    private, public = keys
    store = ArtifactStore(str(tmp_path / "store"))
    registry = open_registry(f"sqlite:///{tmp_path / 'registry.db'}")
    for version in (1, 2):
        target = put_artifact(store, version)
        registry.register_version(version_draft(onnx_uri=store.uri(target.artifact), onnx_sha256=target.sha256))
        complete(registry, version)
    moves: list[str] = []
    registry.champion_listeners.append(lambda reg, model: moves.append(model))
    registry.champion_listeners.append(lambda reg, model: publish_champion(reg, store, model, private, plan=PLAN))

    registry.promote("loans", 1, actor="t", reason="first")
    first = verify(store.fs.cat_file(store.path(channel_relpath("loans"))), public, model="loans")
    assert first.version == 1 and first.rollout.state == "complete"  # nothing ran before: everyone at once

    registry.set_alias("loans", "challenger", 2, actor="t", reason="trained")  # not a champion move
    assert moves == ["loans"]
    registry.promote("loans", 2, actor="t", reason="better")
    second = verify(store.fs.cat_file(store.path(channel_relpath("loans"))), public, model="loans")
    assert (second.version, second.previous.version, second.rollout.state, second.rollout.wave) == (2, 1, "rolling", 0)

    registry.rollback("loans", actor="t", reason="bad")
    third = verify(store.fs.cat_file(store.path(channel_relpath("loans"))), public, model="loans")
    assert third.version == 1 and third.rollout.state == "complete"  # a rollback reaches every device at once
    assert moves == ["loans"] * 3

    with pytest.raises(DriftloopError):
        registry.promote("loans", 7, actor="t", reason="no such version")
    assert moves == ["loans"] * 3  # a move that did not commit publishes nothing


# --- waves -------------------------------------------------------------------------------


def test_a_device_s_wave_is_stable_and_the_shares_hold() -> None:
    waves = [device_wave("loans", f"dev-{i}", PLAN.waves) for i in range(4000)]
    assert waves == [device_wave("loans", f"dev-{i}", PLAN.waves) for i in range(4000)]
    first, second = waves.count(0) / 4000, waves.count(1) / 4000
    assert 0.03 < first < 0.07 and 0.16 < second < 0.24  # 5% and the next 20%
    assert [device_wave("other", f"dev-{i}", PLAN.waves) for i in range(200)] != waves[:200]  # per model


def test_psi_and_histograms() -> None:
    same = score_histogram([0.1, 0.2, 0.5, 0.9] * 50)
    assert psi(same, same) == pytest.approx(0.0)
    shifted = score_histogram([0.95, 0.97, 0.99, 0.9] * 50)
    assert psi(same, shifted) > 1.0 and sum(shifted) == 200


def run(device: str, version: int, *, at: datetime, p95: float = 10.0, failed: bool = False,
        scores: list[float] | None = None) -> EdgeTelemetry:
    return EdgeTelemetry(run_id=f"{at:%H%M%S}-{device}", device_id=device, model="loans", version=version,
                         started_at=at, finished_at=at, rows_in=0 if failed else 100, rows_scored=0 if failed else 100,
                         rows_quarantined=0, failed=failed, latency_p50_ms=p95 / 2, latency_p95_ms=p95,
                         histogram=None if failed else score_histogram(scores or [0.1, 0.3, 0.5, 0.7] * 25))


def test_the_controller_holds_bakes_advances_and_aborts(keys) -> None:
    v1 = ChannelTarget(version=1, artifact="models/v1.onnx", sha256="1" * 64)
    v2 = ChannelTarget(version=2, artifact="models/v2.onnx", sha256="2" * 64)
    manifest = new_manifest("loans", v2, v1, PLAN, now=NOW)
    assert judge(manifest, [], NOW).action == "hold"
    healthy = [run("a", 2, at=NOW + timedelta(minutes=5)), run("b", 1, at=NOW + timedelta(minutes=5))]
    assert judge(manifest, healthy, NOW + timedelta(minutes=30)).action == "hold"  # still baking
    decision = judge(manifest, healthy, NOW + timedelta(hours=1))
    assert decision.action == "advance"
    advanced = apply(manifest, decision, NOW + timedelta(hours=1))
    assert advanced.rollout.wave == 1 and advanced.rollout.wave_started_at == NOW + timedelta(hours=1)

    slow = [run("a", 2, at=NOW + timedelta(minutes=5), p95=30.0), run("b", 1, at=NOW + timedelta(minutes=5))]
    crashed = [run("a", 2, at=NOW + timedelta(minutes=5), failed=True), run("b", 1, at=NOW + timedelta(minutes=5))]
    shifted = [run("a", 2, at=NOW + timedelta(minutes=5), scores=[0.99] * 100), run("b", 1, at=NOW + timedelta(minutes=5))]
    for bad, figure in ((slow, "latency"), (crashed, "error rate"), (shifted, "PSI")):
        decision = judge(manifest, bad, NOW + timedelta(minutes=10))
        assert decision.action == "abort" and figure in "; ".join(decision.reasons)
        stopped = apply(manifest, decision, NOW)
        assert stopped.rollout.state == "aborted" and stopped.rollout.aborted.version == 2
        assert all(stopped.for_device(f"dev-{i}")[0].version == 1 for i in range(100))


@pytest.mark.parametrize("bad", [False, True], ids=["healthy", "three-times-slower"])
def test_a_simulated_fleet_follows_the_waves(tmp_path: Path, keys, bad: bool) -> None:
    """24 devices, each its own cache, read the real signed channel file each round; the
    controller judges their telemetry. Healthy: 5% -> 25% -> 100%. Slow: stopped in the
    first wave, every device back on v1, and no device outside the first wave loaded v2."""
    private, public = keys
    store = ArtifactStore(str(tmp_path / "store"))
    v1, v2 = put_artifact(store, 1), put_artifact(store, 2)
    devices = [f"edge-{i:02d}" for i in range(24)]
    # A fleet this small may leave the first wave empty by chance: pick ids that give it one.
    while not any(device_wave("loans", d, PLAN.waves) == 0 for d in devices):
        devices.append(f"edge-{len(devices):02d}")
    caches = {d: ModelCache(tmp_path / "caches" / d, "loans") for d in devices}
    clock = datetime.now(UTC)
    channel = publish(store, new_manifest("loans", v1, None, PLAN, now=clock), private)
    for d in devices:
        assert refresh_from_channel(caches[d], ChannelSource(channel, public, d)).version == 1
    manifest = resign(new_manifest("loans", v2, v1, PLAN, now=clock), now=clock)
    publish(store, manifest, private)

    loaded_v2: set[str] = set()
    timeline: list[tuple[int, str, int]] = []
    telemetry: list[EdgeTelemetry] = []
    for round_ in range(8):
        for d in devices:
            model = refresh_from_channel(caches[d], ChannelSource(channel, public, d))
            assert model.refused is None
            if model.version == 2:
                loaded_v2.add(d)
            p95 = 30.0 if (bad and model.version == 2) else 10.0
            telemetry.append(run(d, model.version, at=clock + timedelta(minutes=1), p95=p95))
        timeline.append((round_, manifest.rollout.state, sum(1 for d in devices if caches[d].state()["current"]
                                                             ["version"] == 2)))
        clock += timedelta(hours=1)
        decision = judge(manifest, telemetry, clock)
        changed = apply(manifest, decision, clock)
        manifest = resign(changed or manifest, now=clock)
        publish(store, manifest, private)
        if manifest.rollout.state != "rolling":
            break
    waves = {d: device_wave("loans", d, PLAN.waves) for d in devices}
    final = {d: refresh_from_channel(caches[d], ChannelSource(channel, public, d)).version for d in devices}
    if bad:
        assert manifest.rollout.state == "aborted" and manifest.rollout.aborted.wave == 0
        assert set(final.values()) == {1}
        assert loaded_v2 and all(waves[d] == 0 for d in loaded_v2), timeline
    else:
        assert manifest.rollout.state == "complete" and set(final.values()) == {2}
        counts = [n for _, _, n in timeline]
        assert counts == sorted(counts) and counts[-1] == len(devices)
        first_wave = sum(1 for w in waves.values() if w == 0)
        assert counts[0] == first_wave < len(devices)


def test_status_shows_waves_devices_per_version_and_telemetry(tmp_path: Path, keys) -> None:
    from driftloop.cli.edge import human_edge_status
    from driftloop.tasks.edge_inbox import TELEMETRY_DIR
    from driftloop.tasks.edge_rollout import fleet_status

    private, _ = keys
    store = ArtifactStore(str(tmp_path / "store"))
    v1, v2 = put_artifact(store, 1), put_artifact(store, 2)
    started = datetime.now(UTC)
    publish(store, new_manifest("loans", v2, v1, PLAN, now=started), private)
    for device, version in (("a", 2), ("b", 1), ("c", 1)):
        telemetry = run(device, version, at=started + timedelta(seconds=1))
        store.write_text(f"{TELEMETRY_DIR}/loans/{telemetry.run_id}.json", telemetry.model_dump_json())
    status = fleet_status(store, "loans")
    assert status["devices_per_version"] == {"1": 2, "2": 1}
    channel = status["channel"]
    assert (channel["version"], channel["previous"], channel["state"], channel["wave"]) == (2, 1, "rolling", 0)
    assert channel["versions"]["2"]["runs"] == 1 and channel["versions"]["1"]["devices"] == 2
    shown = human_edge_status(status)
    assert "wave 0 of [0.05, 0.25, 1.0]" in shown and "v1: 2, v2: 1" in shown


def test_rollout_status_has_the_fleets_section(home: Path, keys, capsys) -> None:
    """``driftloop rollout status`` is the one command for where a model stands: the edge
    fleet's waves and devices per version beside the shadow phase."""
    import json

    from driftloop.cli import main
    from driftloop.registry import open_registry
    from driftloop.settings import get_settings
    from driftloop.tasks.edge_inbox import TELEMETRY_DIR
    from tests.unit.test_registry import version_draft

    private, _ = keys
    settings = get_settings()
    open_registry(settings.registry_database_url()).register_version(version_draft())
    assert main(["rollout", "status", "--model", "loans", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["edge"] is None  # no channel published yet

    store = ArtifactStore(settings.artifact_root_uri())
    v1, v2 = put_artifact(store, 1), put_artifact(store, 2)
    started = datetime.now(UTC)
    publish(store, new_manifest("loans", v2, v1, PLAN, now=started), private)
    for device, version in (("a", 2), ("b", 1)):
        telemetry = run(device, version, at=started + timedelta(seconds=1))
        store.write_text(f"{TELEMETRY_DIR}/loans/{telemetry.run_id}.json", telemetry.model_dump_json())
    assert main(["rollout", "status", "--model", "loans", "--json"]) == 0
    edge = json.loads(capsys.readouterr().out)["edge"]
    assert edge["devices_per_version"] == {"1": 1, "2": 1} and edge["channel"]["wave"] == 0
    assert main(["rollout", "status", "--model", "loans"]) == 0
    assert "edge       loans: channel v2 (previous v1), rolling, wave 0" in capsys.readouterr().out


def test_an_upload_killed_half_way_is_removed_once_abandoned_and_a_finished_one_kept(tmp_path: Path) -> None:
    from driftloop.tasks.edge_inbox import abandoned_uploads, pending_runs

    store = ArtifactStore(str(tmp_path / "store"))
    store.write_bytes("inbox/loans/dev-1/run-a/part-00000-00000.parquet", b"half")  # killed: no telemetry
    store.write_bytes("inbox/loans/dev-1/run-b/part-00000-00000.parquet", b"whole")
    store.write_text("inbox/loans/dev-1/run-b/telemetry.json", "{}")
    pending = pending_runs(store, "loans")
    assert pending == [("dev-1", "run-b")]
    now = datetime.now(UTC)
    assert abandoned_uploads(store, "loans", pending, now=now) == []  # maybe still uploading
    assert abandoned_uploads(store, "loans", pending, now=now + timedelta(days=2)) == ["inbox/loans/dev-1/run-a"]


def test_a_run_that_fails_is_reported_home_as_a_failed_run(tmp_path: Path, keys) -> None:
    from driftloop.tasks.edge_agent import AgentConfig, run_agent

    private, public = keys
    store = ArtifactStore(str(tmp_path / "store"))
    channel = publish(store, new_manifest("loans", put_artifact(store, 1, b"not an onnx model"), None, PLAN,
                                          now=datetime.now(UTC)), private)
    (tmp_path / "in.csv").write_text("id,amount\n1,2\n")
    config = AgentConfig(model="loans", input_uri=str(tmp_path / "in.csv"), output_uri=str(tmp_path / "out"),
                         cache_root=tmp_path / "cache", device_id="dev-9",
                         channel=ChannelSource(channel, public, "dev-9"))
    with pytest.raises(Exception):  # noqa: B017 - whatever the model raises
        run_agent(config)
    (sent,) = store.fs.glob(store.path("inbox/loans/dev-9/*/telemetry.json"))
    telemetry = EdgeTelemetry.model_validate_json(store.fs.cat_file(sent))
    assert telemetry.failed and telemetry.version == 1 and telemetry.error and not telemetry.parts


KILLED_UPLOAD = """
import sys, time
from pathlib import Path
import fsspec.implementations.local as local
from driftloop.tasks.edge_agent import upload_run

real = local.LocalFileSystem.pipe_file
def slow(self, path, value, **kwargs):
    real(self, path, value, **kwargs)
    Path(sys.argv[3]).write_text(path)  # one file is up: the test kills us now
    time.sleep(60)
local.LocalFileSystem.pipe_file = slow
upload_run(Path(sys.argv[1]), sys.argv[2], "loans", "dev-1")
"""


def test_kill_9_mid_upload_leaves_no_telemetry_and_the_rerun_completes(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    from driftloop.tasks.edge_agent import upload_run
    from driftloop.tasks.edge_inbox import pending_runs

    run_dir = tmp_path / "outbox" / "run-1"
    run_dir.mkdir(parents=True)
    for i in range(3):
        (run_dir / f"part-00000-0000{i}.parquet").write_bytes(b"rows %d" % i)
    (run_dir / "telemetry.json").write_text("{}")
    store = ArtifactStore(str(tmp_path / "store"))
    flag = tmp_path / "first-file-up"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_UPLOAD, str(run_dir), store.uri("inbox"), str(flag)])
    try:
        deadline = time.monotonic() + 300
        while not flag.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the uploader ended before its first file"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    uploaded = sorted(p.name for p in Path(store.path("inbox/loans/dev-1/run-1")).iterdir())
    assert uploaded == ["part-00000-00000.parquet"]  # killed after one part: no telemetry
    assert pending_runs(store, "loans") == []  # so the ingest does not see the run
    upload_run(run_dir, store.uri("inbox"), "loans", "dev-1")  # the next agent run sends it again
    assert pending_runs(store, "loans") == [("dev-1", "run-1")]
    assert len(list(Path(store.path("inbox/loans/dev-1/run-1")).iterdir())) == 4
