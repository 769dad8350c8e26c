"""The train flow and the models CLI against a real Prefect server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from driftloop.flows.ingest import ingest
from driftloop.onnx_model import load_model, predict_scores
from driftloop.registry import open_registry
from driftloop.settings import get_settings
from driftloop.storage import read_bytes
from tests.support.data import make_loans, write_spec
from tests.support.models import train_fast

pytestmark = [pytest.mark.prefect, pytest.mark.usefixtures("prefect_server")]

FAST = {"trials": 3, "parity_min_rows": 5_000}  # train_fast sets the parity rows


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    driftloop = Path(sys.executable).with_name("driftloop")
    return subprocess.run([str(driftloop), *args], check=False, capture_output=True, text=True, timeout=600)


@pytest.fixture()
def loans(tmp_path: Path, home: Path) -> tuple[Path, str]:
    spec = write_spec(tmp_path, {"gate": {"thresholds": {"roc_auc": {"min": 0.6}}, "max_regression": 0.01}})
    data = tmp_path / "loans.parquet"
    make_loans(4000, seed=5).write_parquet(data)
    return spec, ingest(spec_path=str(spec), source=str(data)).dataset_id


def test_train_registers_a_champion_then_reproduces_it(loans, tmp_path: Path) -> None:
    spec, dataset_id = loans
    first = train_fast(spec_path=str(spec), dataset_id=dataset_id, algorithms=["xgboost", "lightgbm"], seed=3, **FAST)
    assert first.version == 1 and first.promoted and first.gate.passed
    assert "no champion yet: judged on absolute thresholds alone" in first.gate.reasons
    assert first.parity.label_flips == 0 and first.parity.max_abs_diff <= 1e-5
    assert first.metrics["roc_auc"] > 0.6
    registry = open_registry(get_settings().registry_database_url())
    card = Path(first.card_uri).read_text()
    assert "## Promotion gate" in card and f"sha256 `{first.onnx_sha256}`" in card

    # Same dataset, spec, seed and trials: identical params and identical ONNX predictions.
    second = train_fast(spec_path=str(spec), dataset_id=dataset_id, algorithms=["xgboost", "lightgbm"], seed=3, **FAST)
    v1, v2 = registry.get_version("loans", 1), registry.get_version("loans", 2)
    assert v1.params == v2.params and v1.algorithm == v2.algorithm
    rows = make_loans(3000, seed=11)
    np.testing.assert_array_equal(
        predict_scores(load_model(read_bytes(v1.onnx_uri)), rows),
        predict_scores(load_model(read_bytes(v2.onnx_uri)), rows),
    )
    # The second model was compared with the champion on the same holdout: equal, so not
    # worse; but it predicts exactly what the champion does, and a clone is never promoted.
    assert any("vs champion v1" in r and "not worse" in r for r in second.gate.reasons)
    assert not second.promoted and "identical model: the same prediction as champion v1 for every holdout row" in second.gate.reasons
    assert registry.aliases("loans") == {"champion": 1, "challenger": 2}


def test_gate_failure_registers_but_does_not_promote(loans, tmp_path: Path) -> None:
    spec, dataset_id = loans
    train_fast(spec_path=str(spec), dataset_id=dataset_id, algorithms=["lightgbm"], **FAST)
    strict = write_spec(tmp_path, {"gate": {"thresholds": {"roc_auc": {"min": 0.999}}}}, name="strict.yaml")
    result = train_fast(spec_path=str(strict), dataset_id=dataset_id, algorithms=["lightgbm"], **FAST)
    assert not result.gate.passed and not result.promoted
    assert any("< min 0.999" in r for r in result.gate.reasons)
    registry = open_registry(get_settings().registry_database_url())
    assert registry.aliases("loans") == {"champion": 1, "challenger": 2}
    assert registry.get_version("loans", 2).gate["passed"] is False


def test_train_and_models_cli(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DRIFTLOOP_PARITY_MIN_ROWS")  # the default a worker without the setting checks
    spec = write_spec(tmp_path)
    data = tmp_path / "loans.parquet"
    make_loans(3000, seed=2).write_parquet(data)
    run = cli("train", "--spec", str(spec), str(data), "--trials", "2", "--algorithms", "lightgbm", "--json")
    assert run.returncode == 0, run.stderr
    payload = json.loads(run.stdout)
    assert {"model", "version", "algorithm", "metrics", "gate", "parity", "onnx_uri", "onnx_sha256"} <= payload.keys()
    assert payload["parity"]["rows"] >= 100_000 and payload["parity"]["label_flips"] == 0
    assert set(payload["gate"]) >= {"passed", "reasons"}

    run = cli("train", "--spec", str(spec), str(data), "--trials", "2", "--algorithms", "xgboost", "--no-promote", "--json")
    assert run.returncode == 0, run.stderr
    listing = json.loads(cli("models", "list", "--json").stdout)
    (model,) = listing["models"]
    assert model["aliases"] == {"champion": 1, "challenger": 2}

    promoted = cli("models", "promote", "loans", "2", "--reason", "reviewed", "--actor", "ci", "--json")
    assert promoted.returncode == 0, promoted.stderr
    assert json.loads(promoted.stdout)["aliases"] == {"champion": 2}
    rolled = json.loads(cli("models", "rollback", "loans", "--reason", "canary failed", "--json").stdout)
    assert rolled["champion"] == 1
    shown = json.loads(cli("models", "show", "loans@champion", "--json").stdout)
    assert shown["version"] == 1
    assert [e["actor"] for e in shown["alias_history"] if e["alias"] == "champion"][-2:] == ["ci", shown["alias_history"][-1]["actor"]]
    assert shown["alias_history"][-1]["reason"] == "rollback: canary failed"

    bad = cli("train", "--spec", str(spec), str(data), "--algorithms", "catboost")
    assert bad.returncode == 2 and "unknown catboost" in bad.stderr  # a usage error, found before anything ran
