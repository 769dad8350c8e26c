"""The compiled XGBoost form: XGBoost's scores bit for bit on every objective driftloop
trains (missing values, trees of uneven depth, row counts that are not a
multiple of the kernel's eight), bytes that are deterministic and checked before the
kernel follows any index, and a clear refusal of models it does not run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xgboost as xgb

from driftloop.compiled_trees import (
    MAGIC,
    MAX_DEPTH,
    CompiledFormInvalid,
    CompiledFormUnsupported,
    CompiledTrees,
)

FEATURES = 6


def _rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, FEATURES)).astype(np.float32)
    x[rng.random(x.shape) < 0.05] = np.nan
    return x


def _booster(objective: str, *, rounds: int = 25, **params: object) -> xgb.Booster:
    x = _rows(3000, seed=0)
    signal = np.nan_to_num(x[:, 0]) - 0.5 * np.nan_to_num(x[:, 1])
    rng = np.random.default_rng(1)
    if objective == "binary:logistic":
        y = (signal + rng.standard_normal(len(x)) > 0).astype(int)
    elif objective == "multi:softprob":
        y = np.digitize(signal + 0.5 * rng.standard_normal(len(x)), [-1.0, 0.0, 1.0])
        params = {"num_class": 4, **params}
    else:
        y = 5 + 3 * signal + rng.standard_normal(len(x))
    # depth 7 on 3,000 rows: many leaves above the last level, padded by the compiled form
    return xgb.train({"objective": objective, "max_depth": 7, "tree_method": "hist", "nthread": 1, "seed": 0, **params},
                     xgb.DMatrix(x, label=y), num_boost_round=rounds)


@pytest.mark.parametrize("objective", ["binary:logistic", "multi:softprob", "reg:squarederror"])
def test_the_compiled_form_gives_xgboosts_scores_bit_for_bit(objective: str) -> None:
    booster = _booster(objective)
    trees = CompiledTrees.from_bytes(CompiledTrees.from_xgboost(booster).to_bytes())
    assert trees.depth == 7 and trees.n_features == FEATURES
    for rows in (1, 7, 8, 1003):  # the kernel's groups of eight and the rows after them
        x = _rows(rows, seed=rows)
        margins = booster.inplace_predict(x, predict_type="margin")
        assert np.array_equal(trees.margins(x).reshape(margins.shape), margins)
        expected = booster.inplace_predict(x)
        got = trees.predict(x)
        assert got.shape == expected.shape and got.dtype == np.float32
        assert np.array_equal(got, expected), objective
    # XGBoost refuses infinite values; the compiled form scores +inf as the largest float
    # (every split sends both right), also where a leaf above the last level was padded.
    x = _rows(64, seed=5)
    x[:, 0] = np.inf
    largest = x.copy()
    largest[:, 0] = np.finfo(np.float32).max
    assert np.array_equal(trees.predict(x), booster.inplace_predict(largest))


def test_the_sigmoid_is_xgboosts_at_extreme_margins() -> None:
    """XGBoost caps -x at 88.7 before expf: very negative margins give a tiny positive
    probability, not 0."""
    from driftloop import compiled_kernels

    margins = np.array([-200.0, -88.7, -50.0, 0.0, 30.0, 200.0], dtype=np.float32)
    probabilities = compiled_kernels.sigmoid(margins)
    assert probabilities[0] > 0 and probabilities[0] == probabilities[1]
    assert probabilities[3] == np.float32(0.5) and probabilities[-1] == np.float32(1.0)


def test_the_bytes_are_deterministic_and_round_trip() -> None:
    booster = _booster("binary:logistic")
    first = CompiledTrees.from_xgboost(booster).to_bytes()
    assert first.startswith(MAGIC) and first == CompiledTrees.from_xgboost(booster).to_bytes()
    again = CompiledTrees.from_bytes(first)
    assert again.to_bytes() == first


def _header_and_arrays(data: bytes) -> tuple[dict, bytes]:
    end = data.index(b"\n", len(MAGIC))
    return json.loads(data[len(MAGIC):end]), data[end + 1:]


def _with_header(header: dict, arrays: bytes) -> bytes:
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + arrays


def test_damaged_or_foreign_bytes_are_refused_before_the_kernel_reads_them() -> None:
    trees = CompiledTrees.from_xgboost(_booster("multi:softprob", rounds=3))
    data = trees.to_bytes()
    header, arrays = _header_and_arrays(data)
    with pytest.raises(CompiledFormInvalid, match="bad magic"):
        CompiledTrees.from_bytes(b"PK\x03\x04" + data)
    with pytest.raises(CompiledFormInvalid, match="ends early"):
        CompiledTrees.from_bytes(data[:-4])
    with pytest.raises(CompiledFormInvalid, match="after the last array"):
        CompiledTrees.from_bytes(data + b"\x00" * 4)
    with pytest.raises(CompiledFormInvalid, match="unreadable header"):
        CompiledTrees.from_bytes(MAGIC + b"{not json\n" + arrays)
    with pytest.raises(CompiledFormInvalid, match="out of range"):
        CompiledTrees.from_bytes(_with_header({**header, "depth": MAX_DEPTH + 1}, arrays))
    # A split that would read past the row: feature index = n_features.
    nodes = trees.nodes.copy()
    nodes[0, 0] = np.uint32(FEATURES) | (nodes[0, 0] & np.uint32(1 << 31))
    bad = CompiledTrees(trees.objective, trees.n_features, trees.depth, trees.base_margin, trees.tree_group, nodes,
                        trees.thresholds, trees.leaves)
    with pytest.raises(CompiledFormInvalid, match="feature index"):
        CompiledTrees.from_bytes(bad.to_bytes())
    # A tree that adds to a fifth class of four.
    groups = trees.tree_group.copy()
    groups[-1] = 4
    bad = CompiledTrees(trees.objective, trees.n_features, trees.depth, trees.base_margin, groups, trees.nodes,
                        trees.thresholds, trees.leaves)
    with pytest.raises(CompiledFormInvalid, match="output column"):
        CompiledTrees.from_bytes(bad.to_bytes())


def test_a_matrix_of_the_wrong_shape_or_type_is_refused() -> None:
    trees = CompiledTrees.from_xgboost(_booster("reg:squarederror", rounds=2))
    with pytest.raises(ValueError, match="6 features"):
        trees.predict(np.zeros((3, FEATURES + 1), dtype=np.float32))
    with pytest.raises(ValueError, match="float32"):
        trees.predict(np.zeros((3, FEATURES), dtype=np.float64))
    with pytest.raises(ValueError, match="C-ordered"):
        trees.predict(np.asfortranarray(np.zeros((3, FEATURES), dtype=np.float32)))


def test_models_the_kernel_does_not_run_are_refused_with_the_reason() -> None:
    with pytest.raises(CompiledFormUnsupported, match="objective reg:absoluteerror"):
        CompiledTrees.from_xgboost(_booster("reg:absoluteerror", rounds=2))
    with pytest.raises(CompiledFormUnsupported, match="booster dart"):
        CompiledTrees.from_xgboost(_booster("binary:logistic", rounds=2, booster="dart"))
    import pandas as pd

    frame = pd.DataFrame({"colour": pd.Categorical(["red", "green", "blue"] * 100), "x": np.arange(300.0)})
    categorical = xgb.train({"objective": "reg:squarederror", "tree_method": "hist", "max_cat_to_onehot": 1},
                            xgb.DMatrix(frame, label=(frame["colour"] == "red").astype(float), enable_categorical=True),
                            num_boost_round=2)
    with pytest.raises(CompiledFormUnsupported, match="categorical splits"):
        CompiledTrees.from_xgboost(categorical)
    deep = xgb.train({"objective": "reg:squarederror", "max_depth": MAX_DEPTH + 2, "tree_method": "exact",
                      "min_child_weight": 0}, xgb.DMatrix(np.arange(40_000.0).reshape(-1, 1), label=np.arange(40_000.0) % 7),
                     num_boost_round=1)
    with pytest.raises(CompiledFormUnsupported, match="levels deep"):
        CompiledTrees.from_xgboost(deep)


def test_at_two_threads_a_batch_is_scored_in_parts_at_once_with_the_same_scores() -> None:
    import threading

    from driftloop.forms import HALVES_MIN_ROWS, compiled_scorer
    from driftloop.onnx_model import LoadedModel

    booster = _booster("binary:logistic")
    data = CompiledTrees.from_xgboost(booster).to_bytes()
    # the compiled scorer reads the task and the encoding only: no ONNX session needed
    descriptor = LoadedModel(session=None, metadata={  # type: ignore[arg-type]
        "task": "binary_classification", "encoding": {"features": [f"f{i}" for i in range(FEATURES)], "categories": {}}})
    x = _rows(HALVES_MIN_ROWS * 2 + 5, seed=3)
    expected = booster.inplace_predict(x)
    before = set(threading.enumerate())
    with compiled_scorer(descriptor, data, threads=2) as scorer:
        assert scorer.predict.lanes == 2
        assert np.array_equal(scorer.predict.run(x), expected)
        assert np.array_equal(scorer.predict.run_lane(x[:9]), expected[:9])
        helpers = [t for t in threading.enumerate() if t.name.startswith("driftloop-compiled") and t not in before]
        assert helpers  # the other part was scored on the scorer's helper thread
    assert not any(t.is_alive() for t in helpers)


def test_where_numba_finds_no_place_for_its_cache_the_kernels_compile_in_each_process(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """numba refuses ``cache=True`` outright where neither the install nor the home is
    writable (a locked-down container); the compiled form must still run there."""
    from driftloop import compiled_kernels

    asked: list[bool] = []
    real = compiled_kernels.njit

    def njit(*, cache: bool, **options):
        asked.append(cache)
        if cache:
            raise RuntimeError("cannot cache function 'double': no locator available for file '<read-only>'")
        return real(cache=False, **options)

    monkeypatch.setattr(compiled_kernels, "njit", njit)

    @compiled_kernels.jit(nogil=True)
    def double(x):
        return x * 2

    assert asked == [True, False] and double(21) == 42
