"""Model artifacts damaged on disk: truncated, or swapped for another genuine model (a
valid ONNX file that loads, so only the recorded sha256 can tell). Each is refused with
a message naming the file and both hashes, in the data centre and in an edge cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from driftloop.onnx_model import load_model
from driftloop.spec import load_spec
from driftloop.tasks.edge import ModelCache
from driftloop.tasks.export import build_onnx
from driftloop.tasks.fit import fit_model, prepare_training_data
from driftloop.tasks.score import ArtifactIntegrityError, load_verified_model
from driftloop.tasks.split import split_dataset
from tests.support.data import make_loans, write_spec


def _two_models(tmp_path: Path) -> tuple[bytes, bytes]:
    spec = load_spec(write_spec(tmp_path))
    split = split_dataset(make_loans(2000, seed=1), spec, seed=0)
    data, encoding, _ = prepare_training_data(spec, split.train, split.valid)
    meta = {"spec": spec.model_dump(mode="json")}
    return tuple(build_onnx(fit_model("lightgbm", {"num_leaves": leaves}, data, seed=0), encoding, spec, meta)
                 for leaves in (7, 15))


@pytest.mark.parametrize("damage", ["truncated", "swapped"])
def test_a_damaged_artifact_is_refused_by_the_scorer_and_the_edge_cache(tmp_path: Path, damage: str) -> None:
    ours, other = _two_models(tmp_path)
    expected = hashlib.sha256(ours).hexdigest()
    damaged = ours[: len(ours) // 2] if damage == "truncated" else other
    if damage == "swapped":
        load_model(damaged)  # a genuine model: loading alone would accept it
    artifact = tmp_path / "models" / "loans" / "v1" / "model.onnx"
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(damaged)

    with pytest.raises(ArtifactIntegrityError) as err:
        load_verified_model(str(artifact), expected)
    message = str(err.value)
    assert str(artifact) in message and expected in message and hashlib.sha256(damaged).hexdigest() in message

    cache = ModelCache(tmp_path / "edge-cache", "loans")
    cache.install(1, expected, ours, str(artifact))
    cached = cache.current(cache_hit=True, offline=True, note="registry unreachable")
    assert cached is not None and cached.read() == ours
    cached.path.write_bytes(damaged)  # the device's disk damages it while offline: the next run refuses it
    with pytest.raises(ArtifactIntegrityError, match="delete the cache directory"):
        cache.current(cache_hit=True, offline=True, note="registry unreachable")
