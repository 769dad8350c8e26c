"""The edge agent rides out an outage on its cached model, and only an outage: a
configuration error fails the run, and a model name never walks out of the cache."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from driftloop.errors import DriftloopError, RegistryError, SpecError, is_unreachable
from driftloop.registry.store import open_registry
from driftloop.tasks.edge import ModelCache, refresh


def cached(tmp_path: Path) -> ModelCache:
    cache = ModelCache(tmp_path / "cache", "loans")
    data = b"an artifact fetched while online"
    cache.install(3, hashlib.sha256(data).hexdigest(), data, "s3://bucket/models/loans.onnx")
    return cache


def test_an_unreachable_registry_falls_back_to_the_cache(tmp_path: Path) -> None:
    cache = cached(tmp_path)
    model = refresh(cache, lambda: open_registry("postgresql+psycopg://edge@127.0.0.1:1/registry").resolve("loans"))
    assert model.offline and model.version == 3 and "unreachable" in model.note


@pytest.mark.postgres
def test_a_configuration_error_fails_instead_of_scoring_with_a_stale_model(tmp_path: Path, postgres) -> None:
    cache = cached(tmp_path)
    wrong_database = postgres.url.rsplit("/", 1)[0] + "/no_such_registry"
    with pytest.raises(RegistryError, match="no_such_registry") as err:
        refresh(cache, lambda: open_registry(wrong_database).resolve("loans"))
    assert not is_unreachable(err.value)


def test_any_other_failure_is_not_taken_for_an_outage(tmp_path: Path) -> None:
    cache = cached(tmp_path)

    def revoked():
        raise PermissionError(13, "Access Denied (the credential was revoked)")

    with pytest.raises(PermissionError):
        refresh(cache, revoked)


@pytest.mark.parametrize("name", ["../..", "../../etc", "a/b", "Loans", "", "car_loan\n", "car_loan\n/../x"])
def test_a_model_name_never_becomes_a_path_outside_the_cache(tmp_path: Path, name: str) -> None:
    with pytest.raises(SpecError, match="not a driftloop model name"):
        ModelCache(tmp_path / "cache", name)


# --- the cache's state on disk, and two agents on one cache ----------------------------


@dataclass
class _Record:
    """What the registry resolves a model to (the fields the edge agent reads)."""

    version: int
    onnx_sha256: str
    onnx_uri: str


def _published(tmp_path: Path, version: int) -> _Record:
    """An artifact published in the artifact store (a local directory here)."""
    data = f"artifact of v{version} ".encode() * 50
    path = tmp_path / "store" / f"v{version}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return _Record(version, hashlib.sha256(data).hexdigest(), str(path))


def _offline():
    return open_registry("postgresql+psycopg://edge@127.0.0.1:1/registry").resolve("loans")


@pytest.mark.parametrize("damage", [b"", b'{"current": {"version": 3, "sha', b"[]", b"\x00" * 64])
def test_a_damaged_state_file_is_rebuilt_from_the_registry(tmp_path: Path, damage: bytes) -> None:
    """A power loss can leave state.json empty (written, not yet flushed): the next run
    that reaches the registry rebuilds it, whether or not the artifact is cached."""
    cache = cached(tmp_path)
    (cache.dir / "state.json").write_bytes(damage)
    same = refresh(cache, lambda: _Record(3, _sha(cache), "s3://bucket/models/loans.onnx"))
    assert same.version == 3 and not same.offline
    assert json.loads((cache.dir / "state.json").read_text())["current"]["version"] == 3
    (cache.dir / "state.json").write_bytes(damage)
    newer = _published(tmp_path, 4)
    model = refresh(cache, lambda: newer)
    assert (model.version, model.offline) == (4, False) and hashlib.sha256(model.read()).hexdigest() == newer.onnx_sha256
    assert json.loads((cache.dir / "state.json").read_text())["current"]["sha256"] == newer.onnx_sha256


def _sha(cache: ModelCache) -> str:
    return next((cache.dir / "artifacts").glob("*.onnx")).stem


@pytest.mark.parametrize("damage", [b"", b'{"current": {"version": 3, "sha', b"[]"])
def test_a_damaged_state_file_while_offline_is_one_clear_error(tmp_path: Path, damage: bytes) -> None:
    cache = cached(tmp_path)
    (cache.dir / "state.json").write_bytes(damage)
    with pytest.raises(DriftloopError, match="state.json") as err:
        refresh(cache, _offline)
    assert "damaged" in str(err.value) and "connect" in str(err.value)
    assert not isinstance(err.value, json.JSONDecodeError)


# An edge agent in its own process: resolves a model (offline: from the cache, or online:
# the record given on its command line), says so, waits to be told to go on, then reads
# the model as the score-edge flow does after its refresh task.
_AGENT = """
import hashlib, json, sys
from pathlib import Path
from driftloop.registry.store import open_registry
from driftloop.tasks.edge import ModelCache, refresh
cache = ModelCache(Path(sys.argv[1]), "loans")
model = refresh(cache, lambda: open_registry("postgresql+psycopg://edge@127.0.0.1:1/registry").resolve("loans"))
print(json.dumps({"version": model.version}), flush=True)
sys.stdin.readline()
print(json.dumps({"read": hashlib.sha256(model.read()).hexdigest()}), flush=True)
"""

# Another agent that installs each record given on its command line, once told to start.
_INSTALLER = """
import hashlib, json, sys, types
from pathlib import Path
from driftloop.tasks.edge import ModelCache, refresh
cache = ModelCache(Path(sys.argv[1]), "loans")
records = [types.SimpleNamespace(**r) for r in json.loads(sys.argv[2])]
sys.stdin.readline()
for record in records:
    model = refresh(cache, lambda: record)
    assert hashlib.sha256(model.read()).hexdigest() == model.sha256
print("done", flush=True)
"""


def test_an_agent_reading_its_model_while_another_prunes_it(tmp_path: Path) -> None:
    """Agent A resolved v3 from the cache; agent B then installs v4 and v5, which prunes
    v3's artifact; A still scores with the v3 it resolved, verified."""
    cache = cached(tmp_path)
    v3 = _sha(cache)
    reader = subprocess.Popen([sys.executable, "-c", _AGENT, str(tmp_path / "cache")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert reader.stdin is not None and reader.stdout is not None
    assert json.loads(reader.stdout.readline() or "{}") == {"version": 3}, reader.stderr.read() if reader.stderr else ""
    for version in (4, 5):
        record = _published(tmp_path, version)
        assert refresh(ModelCache(tmp_path / "cache", "loans"), lambda r=record: r).version == version
    assert not (cache.dir / "artifacts" / f"{v3}.onnx").exists()  # pruned under the reader
    out, err = reader.communicate("go\n", timeout=120)
    assert reader.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == {"read": v3}


def test_two_agents_installing_at_once_leave_a_consistent_cache(tmp_path: Path) -> None:
    cache = cached(tmp_path)
    batches = [[vars(_published(tmp_path, base + i)) for i in range(150)] for base in (1000, 2000)]
    agents = [subprocess.Popen([sys.executable, "-c", _INSTALLER, str(tmp_path / "cache"), json.dumps(batch)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for batch in batches]
    for agent in agents:  # both start together
        assert agent.stdin is not None
        agent.stdin.write("go\n")
        agent.stdin.flush()
    for agent in agents:
        out, err = agent.communicate(timeout=300)
        assert agent.returncode == 0 and out.strip() == "done", err
    state = cache.state()
    kept = {p.stem for p in (cache.dir / "artifacts").glob("*.onnx")}
    assert {state["current"]["sha256"], state["previous"]["sha256"]} <= kept and len(kept) <= 2
    assert state["current"]["version"] in (1149, 2149)
    for entry in (state["current"], state["previous"]):
        data = (cache.dir / "artifacts" / f"{entry['sha256']}.onnx").read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
