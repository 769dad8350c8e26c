"""Scoring forms through the real flows: training registers each verified form with its
sha256, parity and speed; every engine scores the same rows with the same probabilities;
the scoring record says which form scored; a damaged form is refused."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from driftloop.flows.score import score
from driftloop.forms import registered_forms
from driftloop.registry import open_registry
from driftloop.settings import get_settings
from driftloop.storage import read_bytes
from driftloop.tasks.score import ArtifactIntegrityError
from tests.support import tables as memory
from tests.support.data import make_loans
from tests.support.models import loans_champion

pytestmark = [pytest.mark.prefect, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("engines")
    with loans_champion(root, algorithm="xgboost", seed=2, parity_min_rows=5000):
        source = root / "score.parquet"
        make_loans(4000, seed=9).drop("repaid").write_parquet(source)
        yield {"root": root, "source": source}


def test_training_registers_every_verified_form(trained) -> None:
    record = open_registry(get_settings().registry_database_url()).resolve("loans")
    forms = {f.kind: f for f in registered_forms(record)}
    assert set(forms) == {"onnx", "native", "tensor", "compiled"}
    assert forms["onnx"].sha256 == record.onnx_sha256
    assert forms["compiled"].parity_max_abs_diff == 0 and forms["compiled"].library.startswith("numba ")
    for form in forms.values():
        assert hashlib.sha256(read_bytes(form.uri)).hexdigest() == form.sha256
        assert form.parity_rows >= 5000 and form.parity_flips == 0 and form.parity_max_abs_diff <= 1e-5
        assert form.rows_per_s > 0
    assert forms["native"].library.startswith("xgboost ")


def _pin_speeds(speeds: dict[str, float]) -> None:
    """Set the registered rows/s of each form (what ``auto`` chooses by): the speeds timed
    at registration on a shared machine are noise, a fixed expectation needs fixed speeds."""
    from sqlalchemy import select

    from driftloop.registry.tables import ModelVersionRow

    registry = open_registry(get_settings().registry_database_url())
    version = registry.resolve("loans").version
    with registry.session() as s:
        row = s.scalars(select(ModelVersionRow).where(ModelVersionRow.model_name == "loans",
                                                      ModelVersionRow.version == version)).one()
        row.forms = [{**f, "rows_per_s": speeds[f["kind"]]} for f in row.forms]


def test_every_engine_scores_the_same_probabilities_and_the_record_names_the_form(trained, tmp_path: Path) -> None:
    outputs = {}
    for engine in ("onnx", "native", "tensor", "compiled"):
        summary = score(input_uri=str(trained["source"]), model="loans", engine=engine)
        assert summary.rows_scored == 4000
        assert summary.form == engine and "forced" in summary.form_reason
        outputs[engine] = memory.rows("loans", summary.snapshot_id, run=summary.run_id).select("id", "probability").sort("id")
    # auto takes the form registered as fastest: one fixed expectation per speed table,
    # the slowest-by-nature (tensor) included, so the pick is the registry's, not a rerun.
    original = {f.kind: f.rows_per_s for f in registered_forms(open_registry(get_settings().registry_database_url()).resolve("loans"))}
    try:
        for speeds, expected in (({"onnx": 2e5, "native": 1e5, "tensor": 3e5, "compiled": 1e5}, "tensor"),
                                 ({"onnx": 2e5, "native": 4e5, "tensor": 3e5, "compiled": 1e5}, "native"),
                                 ({"onnx": 5e5, "native": 4e5, "tensor": 3e5, "compiled": 1e5}, "onnx"),
                                 ({"onnx": 5e5, "native": 4e5, "tensor": 3e5, "compiled": 8e5}, "compiled")):
            _pin_speeds(speeds)
            summary = score(input_uri=str(trained["source"]), model="loans", engine="auto")
            assert summary.form == expected and "fastest" in summary.form_reason, (speeds, summary.form_reason)
            outputs[f"auto-{expected}"] = memory.rows("loans", summary.snapshot_id, run=summary.run_id).select(
                "id", "probability").sort("id")
    finally:
        _pin_speeds(original)
    runs = open_registry(get_settings().registry_database_url()).list_scoring_runs("loans")
    assert sorted(r.form for r in runs[:8]) == sorted(["onnx", "native", "tensor", "compiled"] * 2)
    # The compiled form is XGBoost's own scores, bit for bit.
    assert outputs["compiled"].equals(outputs["native"]) and outputs["auto-compiled"].equals(outputs["native"])
    base = outputs["onnx"]
    for engine, frame in outputs.items():
        assert frame["id"].to_list() == base["id"].to_list()
        diff = (frame["probability"] - base["probability"]).abs().max()
        assert diff <= 1e-5, f"{engine} differs from onnx by {diff}"


def test_a_damaged_form_is_refused(trained, tmp_path: Path) -> None:
    record = open_registry(get_settings().registry_database_url()).resolve("loans")
    native = next(f for f in registered_forms(record) if f.kind == "native")
    path = Path(native.uri)
    original = path.read_bytes()
    try:
        path.write_bytes(original[:-8] + b"\x00" * 8)
        with pytest.raises(ArtifactIntegrityError, match=native.sha256):
            score(input_uri=str(trained["source"]), output_uri=str(tmp_path / "x"), model="loans", engine="native")
    finally:
        path.write_bytes(original)


def test_the_cli_forces_an_engine_and_says_which_form_scored(trained, tmp_path: Path) -> None:
    driftloop = Path(sys.executable).with_name("driftloop")
    done = subprocess.run([str(driftloop), "score", "--model", "loans", "--input", str(trained["source"]),
                           "--output", str(tmp_path / "cli"), "--engine", "tensor", "--json"],
                          capture_output=True, text=True, timeout=300, check=False, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(done.stdout)
    assert payload["form"] == "tensor" and payload["rows_scored"] == 4000
    cuda = subprocess.run([str(driftloop), "score", "--model", "loans", "--input", str(trained["source"]),
                           "--output", str(tmp_path / "gpu"), "--device", "cuda"],
                          capture_output=True, text=True, timeout=300, check=False, env=os.environ.copy())
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert cuda.returncode != 0 and "CUDAExecutionProvider is not available" in cuda.stderr
        assert not (tmp_path / "gpu").exists()
    else:
        assert cuda.returncode == 0, cuda.stderr[-3000:]
