"""Calibrated thresholds are computed once per reference, chunk size and policy, stored in
the artifact store, and read back on later runs; a changed chunk size or policy
recalibrates, a damaged stored calibration is recomputed with a warning. The realized
performance thresholds come from the same calibration. Results are the same whether the
thresholds were computed or read back, and whether the analysis went through NannyML in
one pass or a few chunks at a time."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from driftloop.spec import DatasetSpec, MonitoringPolicy, parse_spec
from driftloop.storage import ArtifactStore
from driftloop.tasks import monitor_calculators
from driftloop.tasks.calibration import CalibrationStore, resample, resample_batches
from driftloop.tasks.monitor import run_monitoring
from driftloop.tasks.monitor_calculators import ensure_calibration
from driftloop.tasks.monitor_frames import Levers

CHUNK = 400
POLICY = MonitoringPolicy(chunk_size=CHUNK, calibration_draws=50)


def frame(rows: int, seed: int, shift: float = 0.0, labelled: bool = True) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    data: dict[str, object] = {f"x{i}": rng.normal(shift if i == 0 else 0.0, 1.0, rows) for i in range(3)}
    data["colour"] = rng.choice(["red", "green", "blue"], rows)
    data["flag"] = rng.random(rows) < 0.3
    proba = 1 / (1 + np.exp(-(np.asarray(data["x0"]) + np.asarray(data["x1"]))))
    data["probability"] = proba
    data["prediction"] = (proba >= 0.5).astype(np.int64)
    if labelled:
        data["y"] = (rng.random(rows) < proba).astype(np.int64)
    data["ts"] = (np.datetime64("2025-01-01T00:00:00") + np.arange(rows).astype("timedelta64[m]")).astype("datetime64[us]")
    return pl.DataFrame(data)


@pytest.fixture(scope="module")
def spec() -> DatasetSpec:
    return parse_spec({"name": "tiny", "task": "binary_classification", "target": "y", "timestamp": "ts",
                       "columns": {"x0": {"dtype": "float"}, "x1": {"dtype": "float"}, "x2": {"dtype": "float"},
                                   "colour": {"dtype": "category"}, "flag": {"dtype": "bool"},
                                   "y": {"dtype": "int"}, "ts": {"dtype": "datetime"}}})


@pytest.fixture(scope="module")
def data() -> dict[str, pl.DataFrame]:
    # 5 reference chunks; 15 full analysis chunks and a partial one of 100 rows, the first
    # feature shifted (alerts to keep equal), labels on every row.
    return {"reference": frame(5 * CHUNK, seed=1), "analysis": frame(15 * CHUNK + 100, seed=2, shift=0.5)}


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times the calibration was computed."""
    made: list[int] = []
    real = monitor_calculators.calibrate

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(monitor_calculators, "calibrate", counting)
    return made


def store_at(tmp_path: Path) -> CalibrationStore:
    return CalibrationStore(ArtifactStore(str(tmp_path / "artifacts")), "tiny_model")


def stored_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "artifacts" / "calibrations" / "tiny_model").glob("*.json"))


def test_the_second_run_reads_the_stored_thresholds_and_gets_the_same_results(
        tmp_path: Path, spec: DatasetSpec, data: dict, calls: list[int]) -> None:
    store = store_at(tmp_path)
    first = run_monitoring(data["reference"], data["analysis"], spec, POLICY, with_plots=False, calibrations=store)
    assert first.calibration_source == "computed" and calls == [1] and store.saved == 1
    assert len(stored_files(tmp_path)) == 1
    # A new store object (a new flow run) on the same artifact root.
    again = store_at(tmp_path)
    second = run_monitoring(data["reference"], data["analysis"], spec, POLICY, with_plots=False, calibrations=again)
    assert second.calibration_source == "stored" and again.loaded == 1 and again.saved == 0
    assert calls == [1]  # not recomputed
    assert second.calibration == first.calibration
    assert second.results == first.results
    uncached = run_monitoring(data["reference"], data["analysis"], spec, POLICY, with_plots=False)
    assert uncached.calibration_source == "computed" and calls == [1, 1]
    assert uncached.results == first.results
    assert any(r["alert"] for r in first.rows("univariate"))  # something to compare


def test_a_changed_chunk_size_or_policy_recalibrates(tmp_path: Path, spec: DatasetSpec, data: dict, calls: list[int]) -> None:
    store = store_at(tmp_path)
    run_monitoring(data["reference"], data["analysis"], spec, POLICY, with_plots=False, calibrations=store)
    for changed in (POLICY.model_copy(update={"chunk_size": 500}), POLICY.model_copy(update={"alert_rate": 0.05}),
                    POLICY.model_copy(update={"continuous_methods": ["kolmogorov_smirnov"]})):
        report = run_monitoring(data["reference"], data["analysis"], spec, changed, with_plots=False, calibrations=store)
        assert report.calibration_source == "computed"
    assert len(calls) == 4 and len(stored_files(tmp_path)) == 4
    # Each is read back for its own policy afterwards; a policy field that does not change
    # the thresholds (the retraining window) does not recalibrate.
    report = run_monitoring(data["reference"], data["analysis"], spec, POLICY.model_copy(update={"alert_rate": 0.05}),
                            with_plots=False, calibrations=store)
    assert report.calibration_source == "stored" and report.calibration is not None
    assert report.calibration.alert_rate == 0.05
    report = run_monitoring(data["reference"], data["analysis"], spec, POLICY.model_copy(update={"window": 5}),
                            with_plots=False, calibrations=store)
    assert report.calibration_source == "stored" and len(calls) == 4


def test_another_reference_recalibrates(tmp_path: Path, spec: DatasetSpec, data: dict, calls: list[int]) -> None:
    store = store_at(tmp_path)
    run_monitoring(data["reference"], data["analysis"], spec, POLICY, with_plots=False, calibrations=store)
    other = data["reference"].with_columns(pl.col("x2") * 1.001)
    report = run_monitoring(other, data["analysis"], spec, POLICY, with_plots=False, calibrations=store)
    assert report.calibration_source == "computed" and len(calls) == 2


@pytest.mark.parametrize("damage", ["not json", "edited threshold", "another key's document"])
def test_a_damaged_stored_calibration_is_recomputed_with_a_warning(
        tmp_path: Path, spec: DatasetSpec, data: dict, calls: list[int], damage: str,
        caplog: pytest.LogCaptureFixture) -> None:
    store = store_at(tmp_path)
    first = run_monitoring(data["reference"], data["analysis"], spec, POLICY, with_plots=False, calibrations=store)
    (path,) = stored_files(tmp_path)
    if damage == "not json":
        path.write_text('{"sha256": "abc", "body": {')
    elif damage == "edited threshold":
        document = json.loads(path.read_text())
        document["body"]["calibration"]["multivariate"] = 1e9  # the sha256 no longer matches
        path.write_text(json.dumps(document))
    else:  # intact, but for chunks of 500
        ensure_calibration(data["reference"], spec, POLICY.model_copy(update={"chunk_size": 500}), store)
        (other,) = [p for p in stored_files(tmp_path) if p != path]
        path.write_bytes(other.read_bytes())
    with caplog.at_level(logging.WARNING, logger="driftloop.tasks.calibration"):
        report = run_monitoring(data["reference"], data["analysis"], spec, POLICY, with_plots=False, calibrations=store)
    assert report.calibration_source == "computed" and len(calls) == (3 if damage == "another key's document" else 2)
    assert "is not usable" in caplog.text and "recalibrating" in caplog.text
    assert report.results == first.results
    # Replaced by a good one: the next run reads it.
    assert run_monitoring(data["reference"], data["analysis"], spec, POLICY, with_plots=False,
                          calibrations=store).calibration_source == "stored"


def test_realized_performance_is_judged_by_the_stored_calibration(
        tmp_path: Path, spec: DatasetSpec, data: dict) -> None:
    store = store_at(tmp_path)
    report = run_monitoring(data["reference"], data["analysis"], spec, POLICY, with_plots=False, calibrations=store)
    assert report.calibration is not None
    lower, upper = report.calibration.realized["roc_auc"]
    assert lower is not None and upper is None and 0.5 < lower < 1.0  # roc_auc: only the bad (low) side
    realized = [r for r in report.rows("realized") if r["name"] == "roc_auc"]
    assert realized and all(r["lower_threshold"] == lower and r["upper_threshold"] is None for r in realized)
    assert all(r["alert"] == (r["value"] < lower) for r in realized if r["chunk_index"] not in report.partial_chunks)
    # A stored calibration (re-signed, as calibrate would have written it) with a realized
    # threshold above every chunk's value: every full chunk's realized roc_auc alerts.
    (path,) = stored_files(tmp_path)
    document = json.loads(path.read_text())
    document["body"]["calibration"]["realized"]["roc_auc"]["lower"] = 0.999
    import hashlib

    from driftloop.tasks.calibration import _canonical

    document["sha256"] = hashlib.sha256(_canonical(document["body"])).hexdigest()
    path.write_text(json.dumps(document))
    again = run_monitoring(data["reference"], data["analysis"], spec, POLICY, with_plots=False, calibrations=store)
    assert again.calibration_source == "stored"
    realized = [r for r in again.rows("realized") if r["name"] == "roc_auc"]
    assert all(r["lower_threshold"] == 0.999 for r in realized)
    assert all(r["alert"] for r in realized if r["chunk_index"] not in again.partial_chunks)
    # The drift rows are untouched by it.
    assert again.rows("univariate") == report.rows("univariate")


def test_chunk_wise_analysis_categoricals_and_views_give_the_same_results(spec: DatasetSpec, data: dict) -> None:
    policy = POLICY.model_copy(update={"alert_rate": None})  # NannyML's thresholds: no calibration needed here
    one_pass = run_monitoring(data["reference"], data["analysis"], spec, policy, with_plots=False,
                              levers=Levers(batch_rows=None, categoricals=False, views=False))
    batched = run_monitoring(data["reference"], data["analysis"], spec, policy, with_plots=False,
                             levers=Levers(batch_rows=2 * CHUNK + 1))  # 2 chunks a pass, a partial one last
    assert [c.key for c in batched.chunks] == [c.key for c in one_pass.chunks]
    assert batched.chunks[-1].key == f"[{15 * CHUNK}:{15 * CHUNK + 99}]"
    assert batched.results == one_pass.results
    assert batched.labelled_rows == one_pass.labelled_rows and batched.partial_chunks == one_pass.partial_chunks == {15: 100}


def test_category_codes_give_the_same_drift_and_thresholds_with_new_values_and_nulls(spec: DatasetSpec, data: dict) -> None:
    # Values the reference never had (one sorting before all of its values), beside nulls
    # in the same column: where the data reconstruction treats codes differently from
    # strings; univariate drift alone reads the codes. Every categorical method.
    rng = np.random.default_rng(7)

    def spoiled(frame: pl.DataFrame, values: list[str | None]) -> pl.DataFrame:
        picked = pl.Series(rng.choice(len(values) + 1, frame.height, p=[0.85] + [0.15 / len(values)] * len(values)))
        colour = pl.when(picked == 0).then(pl.col("colour"))
        for i, value in enumerate(values, start=1):
            colour = colour.when(picked == i).then(pl.lit(value, pl.String))
        return frame.with_columns(colour.alias("colour"))

    reference = spoiled(data["reference"], [None])
    analysis = spoiled(data["analysis"], [None, "aqua", "purple"])
    policy = POLICY.model_copy(update={"categorical_methods": ["jensen_shannon", "chi2", "l_infinity", "hellinger"]})
    codes, strings = (run_monitoring(reference, analysis, spec, policy, with_plots=False, levers=Levers(category_codes=on))
                      for on in (True, False))
    assert codes.results == strings.results
    assert codes.calibration == strings.calibration
    assert {r["method"] for r in codes.rows("univariate") if r["name"] == "colour"} == {"jensen_shannon", "chi2", "l_infinity", "hellinger"}
    assert any(r["alert"] for r in codes.rows("univariate") if r["name"] == "colour")  # its new values drift


def test_the_plots_cover_every_chunk_when_the_analysis_goes_through_in_batches(spec: DatasetSpec, data: dict) -> None:
    policy = POLICY.model_copy(update={"alert_rate": None})
    report = run_monitoring(data["reference"], data["analysis"], spec, policy, with_plots=True,
                            levers=Levers(batch_rows=2 * CHUNK))
    assert set(report.figures) == {"univariate_drift", "multivariate_drift", "estimated_performance", "realized_performance"}
    figure = report.figures["multivariate_drift"]
    xs = {x for trace in figure.data for x in (trace.x if trace.x is not None else [])}
    assert len(xs) >= 16  # reference and all 16 analysis chunks, not one batch's


def test_the_draws_are_the_same_rows_chunk_by_chunk(data: dict) -> None:
    reference = data["reference"].to_pandas()
    whole = resample(reference, chunk_rows=CHUNK, draws=7, seed=3)
    batches = list(resample_batches(reference, chunk_rows=CHUNK, draws=7, seed=3, batch=3))
    assert [len(b) for b in batches] == [3 * CHUNK, 3 * CHUNK, CHUNK]
    import pandas as pd

    pd.testing.assert_frame_equal(pd.concat(batches, ignore_index=True), whole)


def test_the_reference_hash_depends_on_content_only() -> None:
    from driftloop.tasks.calibration import frame_sha256

    plain = pl.DataFrame({"x": [1.0, 2.0, 3.0], "s": ["a", "b", "a"]})
    built = pl.concat([plain.head(1), plain.tail(2)], rechunk=False).with_columns(pl.col("s").cast(pl.Categorical))
    assert built.n_chunks() == 2
    assert frame_sha256(built) == frame_sha256(plain)
    assert frame_sha256(plain.with_columns(pl.col("x") + 1e-12)) != frame_sha256(plain)
