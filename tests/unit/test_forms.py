"""Scoring forms: each form of a real model is verified against the native model, and the
scorer's choice between them follows what is registered and what runs here."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from driftloop.forms import FormRecord, FormUnavailable, choose_form, load_form
from driftloop.onnx_model import load_model
from driftloop.spec import load_spec
from driftloop.storage import ArtifactStore, read_bytes
from driftloop.tasks.export import build_onnx, native_scores
from driftloop.tasks.fit import fit_model, prepare_training_data
from driftloop.tasks.form_builder import build_forms, store_forms
from driftloop.tasks.split import split_dataset
from tests.support.data import make_loans, write_spec


@pytest.fixture(scope="module", params=["xgboost", "lightgbm"])
def model(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    spec = load_spec(write_spec(tmp))
    frame = make_loans(3000, seed=4)  # 5% of ratio missing: each form must route them as the trees do
    assert frame["ratio"].null_count() > 50
    split = split_dataset(frame, spec, seed=0)
    data, encoding, _ = prepare_training_data(spec, split.train, split.valid)
    params = {"max_depth": 4} if request.param == "xgboost" else {"num_leaves": 15}
    fitted = fit_model(request.param, params, data, seed=0)
    onnx = build_onnx(fitted, encoding, spec, {"spec": spec.model_dump(mode="json")})
    return request.param, spec, split, encoding, fitted, onnx, tmp


def test_every_form_matches_the_native_model_and_is_stored_under_its_hash(model) -> None:
    _, spec, split, encoding, fitted, onnx, tmp = model
    rows = split.holdout
    built = build_forms(fitted, encoding, spec, onnx, rows)
    algorithm = model[0]
    expected_kinds = {"onnx", "native", "tensor"} | ({"compiled"} if algorithm == "xgboost" else set())
    assert {f.kind for f in built.forms} == expected_kinds, built.skipped
    if algorithm == "lightgbm":
        assert built.skipped == {"compiled": "the compiled form runs XGBoost models only"}
    for form in built.forms:
        assert form.parity_rows == rows.height and form.parity_flips == 0 and form.parity_max_abs_diff <= 1e-5
        assert form.rows_per_s > 0
        if form.kind == "compiled":  # it promises XGBoost's scores bit for bit
            assert form.parity_max_abs_diff == 0 and form.library.startswith("numba ")
    records = store_forms(ArtifactStore(str(tmp / "artifacts")), spec.name, built)
    descriptor = load_model(onnx)
    expected = native_scores(fitted, encoding.matrix(rows), spec.task)
    for record in records:
        data = read_bytes(record.uri)
        assert hashlib.sha256(data).hexdigest() == record.sha256
        scores = load_form(record, descriptor, data, threads=1).predict(rows)
        assert np.abs(scores - expected).max() <= 1e-5, record.kind
        if record.kind == "compiled":
            assert np.array_equal(scores, expected)
    assert records[0].kind == "onnx" and records[0].sha256 == hashlib.sha256(onnx).hexdigest()


def test_the_onnx_form_at_two_threads_scores_halves_of_each_batch_bit_for_bit(model) -> None:
    import threading

    import polars as pl

    from driftloop.forms import HALVES_MIN_ROWS
    from driftloop.onnx_model import predict_scores

    _, _, split, _, _, onnx, _ = model
    rows = pl.concat([split.holdout] * (HALVES_MIN_ROWS // split.holdout.height + 2))
    assert rows.height > HALVES_MIN_ROWS
    single = predict_scores(load_model(onnx, threads=1), rows)
    before = set(threading.enumerate())  # thread objects: an ident is reused once its thread ends
    halves = load_form(_form("onnx", 1.0), load_model(onnx, threads=2), onnx, threads=2)
    assert np.array_equal(halves.predict(rows), single)
    assert np.array_equal(halves.predict(rows.head(11)), single[:11])  # a small batch is scored whole
    helpers = [t for t in threading.enumerate() if t.name.startswith("driftloop-onnx-half") and t not in before]
    assert helpers and all(t.is_alive() for t in helpers)
    # Closing the scorer shuts its helper thread down (it was never shut down before).
    with halves:
        pass
    assert not any(t.is_alive() for t in helpers)
    # Without the ONNX bytes (the descriptor alone), the 2-thread session scores as before.
    plain = load_form(_form("onnx", 1.0), load_model(onnx, threads=2), b"", threads=2)
    assert np.abs(plain.predict(rows) - single).max() <= 1e-6


def _form(kind: str, speed: float) -> FormRecord:
    return FormRecord(kind=kind, uri=f"mem://{kind}", sha256="0" * 64, parity_rows=10, parity_max_abs_diff=0.0,
                      parity_flips=0, rows_per_s=speed)


def test_auto_takes_the_fastest_form_that_runs_here_and_a_forced_one_must_exist() -> None:
    forms = [_form("onnx", 120_000), _form("native", 230_000), _form("tensor", 20_000)]
    chosen, why = choose_form(forms, engine="auto", algorithm="xgboost")
    assert chosen.kind == "native" and "fastest" in why
    chosen, _ = choose_form([_form("onnx", 300_000), _form("native", 180_000)], engine="auto", algorithm="lightgbm")
    assert chosen.kind == "onnx"
    assert choose_form(forms, engine="tensor", algorithm="xgboost")[0].kind == "tensor"
    with pytest.raises(FormUnavailable, match="no native form"):
        choose_form([_form("onnx", 1.0)], engine="native", algorithm="xgboost")


def test_cuda_needs_the_tensor_form_and_the_cuda_provider() -> None:
    import onnxruntime as ort

    forms = [_form("onnx", 120_000), _form("native", 230_000)]
    with pytest.raises(FormUnavailable, match="cuda"):
        choose_form(forms, engine="auto", algorithm="xgboost", device="cuda")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(FormUnavailable, match="CUDAExecutionProvider is not available"):
            choose_form([*forms, _form("tensor", 1.0)], engine="auto", algorithm="xgboost", device="cuda")


def test_a_version_registered_before_forms_has_its_onnx_form(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from driftloop.forms import registered_forms

    old = SimpleNamespace(forms=None, onnx_uri="file:///m.onnx", onnx_sha256="a" * 64,
                          parity={"rows": 5, "max_abs_diff": 1e-7, "label_flips": 0})
    (only,) = registered_forms(old)
    assert only.kind == "onnx" and only.sha256 == "a" * 64
    assert choose_form([only], engine="auto", algorithm="xgboost")[0] is only


@pytest.mark.parametrize("threads", [1, 2])
def test_a_staged_form_scores_the_same_whole_in_stages_and_streamed(model, tmp_path: Path, threads: int,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The native form's stages (the float32 matrix, then the kernel) give its scores bit for
    bit, and so does the streamed scorer that runs them on different threads: every row
    scored or quarantined, probabilities equal to the native model's on the same rows. At
    2 threads XGBoost keeps two batches in flight and its lanes (1-thread kernels) score
    pieces of them: the same scores, written in input order. XGBoost's compiled form does
    all of this too, with the native model's scores bit for bit."""
    from driftloop.tasks.form_builder import compiled_form_bytes, native_form_bytes

    forms = {"native": native_form_bytes(model[4])}
    if model[0] == "xgboost":
        forms["compiled"] = compiled_form_bytes(model[4])[0]
    for kind, data in forms.items():
        _staged_form_scores_bit_for_bit(model, tmp_path / kind, threads, monkeypatch, kind, data)


def _staged_form_scores_bit_for_bit(model, tmp_path: Path, threads: int, monkeypatch: pytest.MonkeyPatch,
                                    kind: str, data: bytes) -> None:
    import polars as pl

    from driftloop.forms import StagedPredict
    from driftloop.outputs import read_predictions
    from driftloop.tasks import score as scoring
    from driftloop.tasks.score import score_stream

    _, spec, split, encoding, fitted, onnx, _ = model
    tmp_path.mkdir()
    rows = split.holdout
    descriptor = load_model(onnx, threads=1)
    form = load_form(_form(kind, 1.0), descriptor, data, threads=threads)
    assert isinstance(form.predict, StagedPredict)
    assert form.predict.lanes == (2 if model[0] == "xgboost" and threads == 2 else 1)
    x = form.predict.prepare(rows)
    assert x.dtype == np.float32 and x.flags.c_contiguous
    assert np.array_equal(x, encoding.matrix(rows), equal_nan=True)
    expected = native_scores(fitted, x, spec.task)
    assert np.array_equal(form.predict.run(x), expected)
    assert np.array_equal(form.predict.run_lane(x), expected)
    assert np.array_equal(form.predict(rows), expected)

    source = tmp_path / "in.parquet"
    pl.concat([rows, rows.head(1)]).write_parquet(source)  # the last row repeats an id: quarantined
    monkeypatch.setattr(scoring, "LANE_PIECE_ROWS", 3)  # batches of 7 rows: pieces of 3, 3 and 1
    pieces: list[int] = []
    lane = form.predict.run_lane

    def run_lane(x: np.ndarray) -> np.ndarray:
        pieces.append(len(x))
        return lane(x)

    form.predict.run_lane = run_lane
    result = score_stream(descriptor, str(source), str(tmp_path / "out"), model_name="m", model_version=1,
                          batch_size=7, predict=form.predict)
    assert (result.rows_in, result.rows_scored, result.rows_quarantined) == (rows.height + 1, rows.height, 1)
    if form.predict.lanes > 1:
        assert sum(pieces) == rows.height and max(pieces) == 3 and len(pieces) > result.batches
    else:
        assert pieces == []  # one lane: the kernel runs whole batches on the scoring thread
    assert result.batches == len(result.batch_latencies_s) == -(-(rows.height + 1) // 7)
    scored = read_predictions(str(tmp_path / "out"))
    assert scored[spec.id].to_list() == rows[spec.id].to_list()
    assert np.array_equal(scored["probability"].to_numpy(), expected.astype(np.float64))
    assert scored.select(spec.feature_columns).equals(rows.select(spec.feature_columns))


def test_the_pipelines_helper_threads_yield_to_the_kernel(model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation (prepare) and writing run HELPER_NICE nicer than the kernel's thread, which
    keeps the caller's priority; a run leaves the caller's priority as it was."""
    import os
    import threading

    from driftloop.forms import StagedPredict
    from driftloop.tasks import score as scoring
    from driftloop.tasks.form_builder import native_form_bytes
    from driftloop.tasks.score import score_stream

    _, _, split, _, fitted, onnx, _ = model
    descriptor = load_model(onnx, threads=1)
    form = load_form(_form("native", 1.0), descriptor, native_form_bytes(fitted), threads=1)
    nice: dict[str, set[int]] = {"prepare": set(), "kernel": set(), "writer": set()}

    def own_nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def prepare(frame):
        nice["prepare"].add(own_nice())
        return form.predict.prepare(frame)

    def run(x):
        nice["kernel"].add(own_nice())
        return form.predict.run(x)

    conform = scoring.prediction_frame

    def prediction_frame(*args, **kwargs):
        nice["writer"].add(own_nice())
        return conform(*args, **kwargs)

    monkeypatch.setattr(scoring, "prediction_frame", prediction_frame)
    source = tmp_path / "in.parquet"
    split.holdout.write_parquet(source)
    base = own_nice()
    score_stream(descriptor, str(source), str(tmp_path / "out"), model_name="m", model_version=1, batch_size=50,
                 predict=StagedPredict(prepare, run))
    assert scoring.HELPER_NICE > 0
    assert nice == {"prepare": {base + scoring.HELPER_NICE}, "kernel": {base}, "writer": {base + scoring.HELPER_NICE}}
    assert own_nice() == base
