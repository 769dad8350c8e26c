"""The tensor-op ("perfect tree traversal") ONNX form of a tree ensemble.

ONNX Runtime's ``ai.onnx.ml.TreeEnsemble*`` kernels exist only on the CPU provider. This
form writes the same ensemble with standard tensor ops (GatherElements, Greater /
GreaterOrEqual, IsNaN, Where, Cast, Add, Mul, ReduceSum, Sigmoid, Reshape, Expand) that
every execution provider runs, so one artifact can score on CUDA too.

How the graph walks the trees, all trees at once (tensors of shape ``[rows, trees]``):

- missing values first, once per batch: the ``[N, F]`` feature matrix becomes column
  blocks where a missing value already sits on its side (NaN -> +inf in one block, -inf
  in the other; two more blocks where 0 counts as missing, for LightGBM's Zero type), and
  each node reads the block its own missing rule asks for. "Go right" is then a single
  comparison per node (XGBoost ``x >= t``, LightGBM ``x > t``), no per-node branching;
- level by level, each row's current node per tree gives a column and a threshold
  (``GatherElements`` on 1-D node tables) and the row's value in that column
  (``GatherElements`` on the block matrix);
- ``perfect`` layout: every tree is padded to a complete binary tree of the ensemble's
  depth (a shallow leaf is pushed down: all its descendants carry its value), so the
  child of slot ``i`` is slot ``2i`` or ``2i + 1`` of the next level's table: arithmetic,
  no child lookup. Its tables grow as ``trees * 2**depth``;
- ``compact`` layout, for deep trees (LightGBM grows leaf-wise, depth 20+ is common):
  the real nodes only, with a child table; leaves point to themselves, so rows that reached
  a leaf stay there for the remaining levels;
- the leaf values are gathered, summed over trees, the base margin added, and a sigmoid
  applied for binary classification.

ONNX Runtime's CPU ``Gather`` copies element by element: written with it, the same graph
ran 3-6x slower (bench/scoring.py measures the form). On CPU it runs fastest on row
slices of about 1,000 rows, which keep its ``[rows, trees]`` intermediates in cache.

The graph has O(depth) nodes whatever the number of trees. Inputs, the feature encoding
in the graph and the outputs are those of ``tasks.export.build_onnx``, so
``driftloop.onnx_model`` loads and runs both forms the same way and
``tasks.export.check_parity`` checks this one against the native model unchanged.

Exactness: thresholds are float32 as in the tree-kernel form (XGBoost's already are;
LightGBM's are rounded down to the largest float32 not above them, which keeps ``x <= t``
exact for float32 ``x``). XGBoost sends ``x < t`` left, LightGBM ``x <= t``; missing
values follow XGBoost's ``default_left``, and LightGBM's ``missing_type`` (None: a missing
value is 0; Zero: 0 and missing take the default side; NaN: missing takes it) as its
``NumericalDecision`` does. Sums are float32 (native: float32 for XGBoost, float64 for
LightGBM), about 1e-7 apart.

Not supported (``TensorFormUnsupported`` names the model and what to do): categorical
splits, multiclass and multi-target models, XGBoost boosters other than ``gbtree``,
LightGBM linear trees and random-forest mode, and objectives whose output transform is
not identity or sigmoid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from driftloop.errors import DriftloopError
from driftloop.features import FeatureEncoding
from driftloop.onnx_model import artifact_metadata, metadata_props
from driftloop.spec import DatasetSpec
from driftloop.tasks.export import encoding_nodes
from driftloop.tasks.fit import FittedModel

TARGET_OPSET = 15
ML_OPSET = 3
# Above this many padded leaves (trees * 2**depth) the perfect layout's tables outgrow
# the model they describe; the compact layout walks the real nodes instead.
PERFECT_MAX_LEAVES = 1 << 20
# LightGBM's kZeroThreshold: a value with |x| <= 1e-35f is read as 0 (and is "zero" for
# missing_type Zero).
LIGHTGBM_ZERO = float(np.float32(1e-35))

Layout = Literal["auto", "perfect", "compact"]

# Objectives whose prediction is the raw sum (regression) or sigmoid(sum) (binary).
_XGBOOST_IDENTITY = {"reg:squarederror", "reg:absoluteerror", "reg:pseudohubererror"}
_LIGHTGBM_IDENTITY = {"regression", "regression_l2", "l2", "mean_squared_error", "mse", "regression_l1", "l1",
                      "mean_absolute_error", "mae", "huber", "fair", "quantile", "mape"}


class TensorFormUnsupported(DriftloopError):
    """The model has something the tensor-op form does not express; the tree-kernel ONNX
    form (and the native booster) still score it."""


@dataclass
class Tree:
    """One tree as node arrays; node 0 is the root, ``left``/``right`` are -1 at leaves."""

    feature: np.ndarray  # int32
    threshold: np.ndarray  # float32, exact as compared
    missing_left: np.ndarray  # bool: where a missing (NaN) value goes
    zero_is_missing: np.ndarray  # bool: LightGBM missing_type Zero (0 takes the default side)
    left: np.ndarray  # int64
    right: np.ndarray  # int64
    value: np.ndarray  # float64: the leaf value at leaves, 0 elsewhere

    def depth(self) -> int:
        deepest, stack = 0, [(0, 0)]
        while stack:
            node, d = stack.pop()
            if self.left[node] < 0:
                deepest = max(deepest, d)
            else:
                stack += [(int(self.left[node]), d + 1), (int(self.right[node]), d + 1)]
        return deepest


@dataclass
class Ensemble:
    """What the graph needs to know about a fitted single-output tree ensemble."""

    algorithm: str
    trees: list[Tree]
    n_features: int
    left_if: Literal["less", "less_equal"]  # XGBoost: x < t goes left; LightGBM: x <= t
    base_margin: float  # added to the sum of leaves, in margin space
    output: Literal["sigmoid", "identity"]
    margin_scale: float = 1.0  # LightGBM's binary ``sigmoid:`` coefficient
    flush_tiny: bool = False  # LightGBM reads |x| <= 1e-35 as 0

    def depth(self) -> int:
        return max((t.depth() for t in self.trees), default=0)


def _tree_from_nodes(nodes: list[dict[str, Any]], left: list[int], right: list[int]) -> Tree:
    n = len(nodes)
    return Tree(
        feature=np.array([d.get("feature", 0) for d in nodes], dtype=np.int32),
        threshold=np.array([d.get("threshold", 0.0) for d in nodes], dtype=np.float32),
        missing_left=np.array([d.get("missing_left", True) for d in nodes], dtype=bool),
        zero_is_missing=np.array([d.get("zero_is_missing", False) for d in nodes], dtype=bool),
        left=np.array(left, dtype=np.int64).reshape(n),
        right=np.array(right, dtype=np.int64).reshape(n),
        value=np.array([d.get("value", 0.0) for d in nodes], dtype=np.float64),
    )


def float32_at_most(value: float) -> float:
    """The largest float32 not above ``value``: for float32 ``x``, ``x <= value`` and
    ``x <= float32_at_most(value)`` agree."""
    with np.errstate(over="ignore"):  # LightGBM writes +-1e300 for "any value": +-inf here
        as32 = np.float32(value)
    if float(as32) > value:
        as32 = np.nextafter(as32, np.float32(-np.inf))
    return float(as32)


def xgboost_ensemble(booster: Any, task: str, model_name: str) -> Ensemble:
    """The trees, base score and output transform of an XGBoost ``gbtree`` booster, read
    from its saved JSON model (exact float32 values)."""
    model = json.loads(booster.save_raw("json"))
    learner = model["learner"]
    objective = learner["objective"]["name"]
    params = learner["learner_model_param"]
    booster_kind = learner["gradient_booster"]["name"]
    if booster_kind != "gbtree":
        raise TensorFormUnsupported(
            f"model {model_name}: XGBoost booster {booster_kind!r} has no tensor-op form (only gbtree); "
            "score it with the ONNX tree-kernel form or the native booster")
    if int(params.get("num_class", "0")) > 1 or int(params.get("num_target", "1")) > 1:
        raise TensorFormUnsupported(
            f"model {model_name}: XGBoost multiclass/multi-target models have no tensor-op form; "
            "score it with the ONNX tree-kernel form or the native booster")
    if objective == "binary:logistic" and task == "binary_classification":
        output: Literal["sigmoid", "identity"] = "sigmoid"
    elif objective in _XGBOOST_IDENTITY and task == "regression":
        output = "identity"
    else:
        raise TensorFormUnsupported(
            f"model {model_name}: XGBoost objective {objective!r} for task {task} has no tensor-op form "
            f"(supported: binary:logistic, {', '.join(sorted(_XGBOOST_IDENTITY))}); "
            "score it with the ONNX tree-kernel form or the native booster")
    # XGBoost 2.x keeps base_score in output space ("5E-1", in 3.x "[5E-1]"): a
    # probability for binary:logistic, which enters the sum as its logit.
    base_score = np.float32(float(str(params["base_score"]).strip("[]")))
    if output == "sigmoid":
        base_margin = float(-np.log(np.float32(1.0) / base_score - np.float32(1.0)))
    else:
        base_margin = float(base_score)

    trees = []
    for raw in learner["gradient_booster"]["model"]["trees"]:
        if int(raw["tree_param"].get("size_leaf_vector", "1")) > 1:
            raise TensorFormUnsupported(
                f"model {model_name}: XGBoost vector-leaf trees have no tensor-op form; "
                "score it with the ONNX tree-kernel form or the native booster")
        if any(int(s) != 0 for s in raw["split_type"]):
            raise TensorFormUnsupported(
                f"model {model_name}: XGBoost categorical splits have no tensor-op form; "
                "score it with the ONNX tree-kernel form or the native booster")
        left = np.array(raw["left_children"], dtype=np.int64)
        is_leaf = left < 0
        conditions = np.array(raw["split_conditions"], dtype=np.float32)  # a leaf's holds its value
        trees.append(Tree(
            feature=np.where(is_leaf, 0, np.array(raw["split_indices"], dtype=np.int64)).astype(np.int32),
            threshold=np.where(is_leaf, np.float32(0), conditions).astype(np.float32),
            missing_left=np.array(raw["default_left"], dtype=bool),
            zero_is_missing=np.zeros(len(left), dtype=bool),
            left=left,
            right=np.array(raw["right_children"], dtype=np.int64),
            value=np.where(is_leaf, conditions.astype(np.float64), 0.0),
        ))
    return Ensemble("xgboost", trees, int(params["num_feature"]), "less", base_margin, output)


def lightgbm_ensemble(booster: Any, task: str, model_name: str) -> Ensemble:
    """The trees and output transform of a LightGBM booster, from ``dump_model()``."""
    dump = booster.dump_model()
    objective, *objective_args = str(dump.get("objective", "")).split()
    if int(dump.get("num_class", 1)) > 1 or int(dump.get("num_tree_per_iteration", 1)) > 1:
        raise TensorFormUnsupported(
            f"model {model_name}: LightGBM multiclass models have no tensor-op form; "
            "score it with the ONNX tree-kernel form or the native booster")
    if dump.get("average_output"):
        raise TensorFormUnsupported(
            f"model {model_name}: LightGBM random-forest mode (average_output) has no tensor-op form; "
            "score it with the ONNX tree-kernel form or the native booster")
    scale = 1.0
    if objective == "binary" and task == "binary_classification":
        output: Literal["sigmoid", "identity"] = "sigmoid"
        for arg in objective_args:
            if arg.startswith("sigmoid:"):
                scale = float(arg.removeprefix("sigmoid:"))
    elif objective in _LIGHTGBM_IDENTITY and task == "regression" and "sqrt" not in objective_args:
        output = "identity"
    else:
        raise TensorFormUnsupported(
            f"model {model_name}: LightGBM objective {dump.get('objective')!r} for task {task} has no tensor-op "
            "form (supported: binary, and regression objectives without an output transform); "
            "score it with the ONNX tree-kernel form or the native booster")
    names = dump.get("feature_names") or []

    trees = []
    for info in dump["tree_info"]:
        nodes: list[dict[str, Any]] = []
        left: list[int] = []
        right: list[int] = []
        # Depth-first, children numbered when their parent is written.
        stack = [(info["tree_structure"], 0)]
        nodes.append({})
        left.append(-1)
        right.append(-1)
        while stack:
            raw, at = stack.pop()
            if "leaf_value" in raw or "split_feature" not in raw:
                if "leaf_coeff" in raw or "leaf_const" in raw:
                    raise TensorFormUnsupported(
                        f"model {model_name}: LightGBM linear trees have no tensor-op form; "
                        "score it with the ONNX tree-kernel form or the native booster")
                nodes[at] = {"value": float(raw.get("leaf_value", 0.0))}
                continue
            feature = int(raw["split_feature"])
            if raw["decision_type"] != "<=":
                name = names[feature] if feature < len(names) else f"#{feature}"
                raise TensorFormUnsupported(
                    f"model {model_name}: LightGBM categorical split on feature {name} has no tensor-op form; "
                    "score it with the ONNX tree-kernel form or the native booster")
            threshold = float32_at_most(float(raw["threshold"]))
            missing = raw.get("missing_type", "None")
            if missing == "None":
                # A missing value is read as 0 and compared like any value.
                missing_left = 0.0 <= threshold
            elif missing in ("Zero", "NaN"):
                missing_left = bool(raw["default_left"])
            else:
                raise TensorFormUnsupported(
                    f"model {model_name}: LightGBM missing_type {missing!r} is not understood by the tensor-op form")
            nodes[at] = {"feature": feature, "threshold": threshold, "missing_left": missing_left,
                         "zero_is_missing": missing == "Zero"}
            for side, child in (("left", raw["left_child"]), ("right", raw["right_child"])):
                index = len(nodes)
                nodes.append({})
                left.append(-1)
                right.append(-1)
                (left if side == "left" else right)[at] = index
                stack.append((child, index))
        trees.append(_tree_from_nodes(nodes, left, right))
    return Ensemble("lightgbm", trees, int(dump["max_feature_idx"]) + 1, "less_equal", 0.0, output, scale,
                    flush_tiny=True)


def ensemble_of(fitted: FittedModel, task: str, model_name: str) -> Ensemble:
    if fitted.algorithm == "xgboost":
        return xgboost_ensemble(fitted.booster, task, model_name)
    if fitted.algorithm == "lightgbm":
        return lightgbm_ensemble(fitted.booster, task, model_name)
    raise TensorFormUnsupported(f"model {model_name}: algorithm {fitted.algorithm!r} has no tensor-op form")


# --- layouts ---------------------------------------------------------------------------
#
# Missing values without per-node branching: the graph builds the feature matrix in
# column blocks where a missing value is already on its side, and each node reads the
# block its missing rule asks for:
#   block 0: NaN -> +inf (goes right)     block 1: NaN -> -inf (goes left)
#   block 2: NaN and 0 -> +inf            block 3: NaN and 0 -> -inf   (LightGBM Zero)
# Then "go right" is one comparison: x >= t (XGBoost) or x > t (LightGBM).


def node_columns(tree: Tree, n_features: int) -> np.ndarray:
    """Column of the block matrix each node reads: feature + n_features * block."""
    block = 2 * tree.zero_is_missing.astype(np.int32) + tree.missing_left.astype(np.int32)
    return (tree.feature + n_features * block).astype(np.int32)


@dataclass
class PerfectLayout:
    columns: list[np.ndarray]  # level d: int32 [trees * 2**d], tree-major
    thresholds: list[np.ndarray]  # level d: float32 [trees * 2**d]
    leaves: np.ndarray  # float32 [trees * 2**depth]


@dataclass
class CompactLayout:
    columns: np.ndarray  # int32 [nodes], all trees' nodes concatenated
    thresholds: np.ndarray  # float32 [nodes]
    roots: np.ndarray  # int32 [trees]
    children: np.ndarray  # int32 [2 * nodes]: left at 2n, right at 2n + 1; a leaf points to itself
    values: np.ndarray  # float32 [nodes]
    depth: int


def perfect_layout(ensemble: Ensemble, depth: int) -> PerfectLayout:
    """Every tree padded to a complete binary tree of ``depth`` levels of splits; a leaf
    above the last level fills all its descendants' leaf slots (the padded splits under
    it read column 0 and do not matter)."""
    n_trees = len(ensemble.trees)
    columns = [np.zeros(n_trees << d, np.int32) for d in range(depth)]
    thresholds = [np.zeros(n_trees << d, np.float32) for d in range(depth)]
    leaves = np.zeros(n_trees << depth, np.float32)
    for t, tree in enumerate(ensemble.trees):
        tree_columns = node_columns(tree, ensemble.n_features)
        stack = [(0, 0, 0)]  # node, level, position within the level
        while stack:
            node, d, j = stack.pop()
            if tree.left[node] < 0:
                span = 1 << (depth - d)
                start = (t << depth) + j * span
                leaves[start:start + span] = tree.value[node]
                continue
            columns[d][(t << d) + j] = tree_columns[node]
            thresholds[d][(t << d) + j] = tree.threshold[node]
            stack += [(int(tree.left[node]), d + 1, 2 * j), (int(tree.right[node]), d + 1, 2 * j + 1)]
    return PerfectLayout(columns, thresholds, leaves)


def compact_layout(ensemble: Ensemble, depth: int) -> CompactLayout:
    offsets = np.cumsum([0] + [len(t.left) for t in ensemble.trees])
    total = int(offsets[-1])
    if 2 * total >= np.iinfo(np.int32).max:
        raise TensorFormUnsupported(f"{total:,} tree nodes are too many for the tensor-op form")
    children = np.empty(2 * total, np.int32)
    for tree, offset in zip(ensemble.trees, offsets[:-1], strict=False):
        ids = np.arange(len(tree.left)) + offset
        is_leaf = tree.left < 0
        children[2 * ids] = np.where(is_leaf, ids, tree.left + offset)
        children[2 * ids + 1] = np.where(is_leaf, ids, tree.right + offset)
    return CompactLayout(
        columns=np.concatenate([node_columns(t, ensemble.n_features) for t in ensemble.trees]),
        thresholds=np.concatenate([t.threshold for t in ensemble.trees]).astype(np.float32),
        roots=offsets[:-1].astype(np.int32),
        children=children,
        values=np.concatenate([t.value for t in ensemble.trees]).astype(np.float32),
        depth=depth,
    )


def choose_layout(ensemble: Ensemble, layout: Layout) -> Literal["perfect", "compact"]:
    if layout != "auto":
        return layout
    return "perfect" if len(ensemble.trees) << ensemble.depth() <= PERFECT_MAX_LEAVES else "compact"


# --- graph -----------------------------------------------------------------------------

_INT32 = 6  # onnx.TensorProto.INT32, without importing onnx at module import


class _Graph:
    """Collects nodes and constants, with unique names."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"tt_{hint}_{self._count}"

    def const(self, hint: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{out}_node", **attrs))
        return out


def _block_matrix(g: _Graph, ensemble: Ensemble, x: str) -> str:
    """[N, F] features -> [N, 2F] (or [N, 4F] with LightGBM Zero nodes): the blocks
    described above, so no node needs a missing-value test of its own."""
    f32 = np.float32
    if ensemble.flush_tiny:  # LightGBM reads |x| <= 1e-35 as 0
        tiny = g.op("LessOrEqual", [g.op("Abs", [x]), g.const("lightgbm_zero", np.array(LIGHTGBM_ZERO, f32))])
        x = g.op("Where", [tiny, g.const("zero", np.array(0.0, f32)), x], "x")
    plus, minus = g.const("plus_inf", np.array(np.inf, f32)), g.const("minus_inf", np.array(-np.inf, f32))
    missing = g.op("IsNaN", [x], "nan")
    blocks = [g.op("Where", [missing, plus, x], "nan_right"), g.op("Where", [missing, minus, x], "nan_left")]
    if any(t.zero_is_missing.any() for t in ensemble.trees):
        zero = g.op("Equal", [x, g.const("zero", np.array(0.0, f32))])
        missing = g.op("Or", [missing, zero], "nan_or_zero")
        blocks += [g.op("Where", [missing, plus, x], "zero_right"), g.op("Where", [missing, minus, x], "zero_left")]
    return g.op("Concat", blocks, "blocks", axis=1)


def _goes_right(g: _Graph, ensemble: Ensemble, value: str, threshold: str) -> str:
    """int32 [N, T]: 1 where the row goes to the right child. XGBoost sends x < t left,
    LightGBM x <= t."""
    compare = g.op("GreaterOrEqual" if ensemble.left_if == "less" else "Greater", [value, threshold], "cmp")
    return g.op("Cast", [compare], "right", to=_INT32)


def _lookup(g: _Graph, table: str, index: str, hint: str) -> str:
    """``table[index]`` for a 1-D table and 1-D index. GatherElements, not Gather: ONNX
    Runtime's CPU Gather copies element by element (it took ~90% of the run time),
    its GatherElements is a plain indexed loop."""
    return g.op("GatherElements", [table, index], hint, axis=0)


def _root_values(g: _Graph, x: str, root_columns: np.ndarray) -> str:
    """[N, T]: each row's value of each tree's root feature. GatherElements on the root
    columns broadcast to [N, T]; a Gather on axis 1 copied element by element (~25% of
    the run time)."""
    rows = g.op("Shape", [x], "rows", start=0, end=1)
    shape = g.op("Concat", [rows, g.const("trees", np.array([len(root_columns)], np.int64))], "shape", axis=0)
    columns = g.op("Expand", [g.const("root_column", root_columns.reshape(1, -1)), shape], "root_columns")
    return g.op("GatherElements", [x, columns], "xv", axis=1)


def _traverse_perfect(g: _Graph, ensemble: Ensemble, layout: PerfectLayout, x: str) -> str:
    """Leaf values [N * T] (row-major [N, T]) after walking the padded trees."""
    n_trees = len(ensemble.trees)
    flat, by_tree = g.const("flat", np.array([-1], np.int64)), g.const("by_tree", np.array([-1, n_trees], np.int64))
    # Level 0: one root per tree, the same for every row.
    value = _root_values(g, x, layout.columns[0])
    step = _goes_right(g, ensemble, value, g.const("root_threshold", layout.thresholds[0]))
    # Position in level d's table: tree * 2**d + j; the child is 2 * that + (went right).
    index = g.op("Add", [g.const("root_children", (2 * np.arange(n_trees)).astype(np.int32)), step], "index")
    index = g.op("Reshape", [index, flat], "index")
    two = g.const("two", np.array(2, np.int32))
    for d in range(1, len(layout.columns)):
        column = _lookup(g, g.const(f"column_l{d}", layout.columns[d]), index, "column")
        value = g.op("GatherElements", [x, g.op("Reshape", [column, by_tree])], "xv", axis=1)
        threshold = _lookup(g, g.const(f"threshold_l{d}", layout.thresholds[d]), index, "threshold")
        step = _goes_right(g, ensemble, g.op("Reshape", [value, flat]), threshold)
        index = g.op("Add", [g.op("Mul", [index, two]), step], "index")
    return g.op("Reshape", [_lookup(g, g.const("leaves", layout.leaves), index, "leaf_values"), by_tree])


def _traverse_compact(g: _Graph, ensemble: Ensemble, layout: CompactLayout, x: str) -> str:
    n_trees = len(ensemble.trees)
    flat, by_tree = g.const("flat", np.array([-1], np.int64)), g.const("by_tree", np.array([-1, n_trees], np.int64))
    columns_t = g.const("column", layout.columns)
    thresholds_t = g.const("threshold", layout.thresholds)
    children_t = g.const("children", layout.children)
    two = g.const("two", np.array(2, np.int32))
    roots = layout.roots
    value = _root_values(g, x, layout.columns[roots])
    step = _goes_right(g, ensemble, value, g.const("root_threshold", layout.thresholds[roots]))
    slot = g.op("Reshape", [g.op("Add", [g.const("root_slots", 2 * roots), step]), flat], "slot")
    node = _lookup(g, children_t, slot, "node")
    for _ in range(1, layout.depth):
        column = _lookup(g, columns_t, node, "column")
        value = g.op("GatherElements", [x, g.op("Reshape", [column, by_tree])], "xv", axis=1)
        threshold = _lookup(g, thresholds_t, node, "threshold")
        step = _goes_right(g, ensemble, g.op("Reshape", [value, flat]), threshold)
        node = _lookup(g, children_t, g.op("Add", [g.op("Mul", [node, two]), step]), "node")
    return g.op("Reshape", [_lookup(g, g.const("values", layout.values), node, "leaf_values"), by_tree])


def tensor_model(ensemble: Ensemble, encoding: FeatureEncoding, spec: DatasetSpec, metadata: dict[str, Any],
                 *, layout: Layout = "auto") -> bytes:
    """ONNX bytes for ``ensemble``: raw feature inputs -> encoding -> tensor-op traversal."""
    import onnx
    from onnx import TensorProto, helper

    if spec.task not in ("binary_classification", "regression"):
        raise TensorFormUnsupported(f"model {spec.name}: task {spec.task} has no tensor-op form")
    if ensemble.n_features > len(encoding.features):
        raise TensorFormUnsupported(
            f"model {spec.name}: the {ensemble.algorithm} booster uses {ensemble.n_features} features but the "
            f"encoding has {len(encoding.features)}; export the booster trained on this encoding")
    if not ensemble.trees:
        raise TensorFormUnsupported(f"model {spec.name}: the {ensemble.algorithm} booster has no trees")
    chosen = choose_layout(ensemble, layout)
    depth = max(1, ensemble.depth())  # a tree of single leaves still takes one (dummy) step

    g = _Graph()
    pre_nodes, inputs, x = encoding_nodes(encoding)
    x = _block_matrix(g, ensemble, x)
    if chosen == "perfect":
        leaf_values = _traverse_perfect(g, ensemble, perfect_layout(ensemble, depth), x)
    else:
        leaf_values = _traverse_compact(g, ensemble, compact_layout(ensemble, depth), x)
    margin = g.op("ReduceSum", [leaf_values, g.const("tree_axis", np.array([1], np.int64))], "sum", keepdims=1)
    if ensemble.base_margin != 0.0:
        margin = g.op("Add", [margin, g.const("base_margin", np.array(ensemble.base_margin, np.float32))], "margin")
    if ensemble.margin_scale != 1.0:
        margin = g.op("Mul", [margin, g.const("sigmoid_scale", np.array(ensemble.margin_scale, np.float32))])
    if spec.task == "binary_classification":
        if ensemble.output != "sigmoid":
            raise TensorFormUnsupported(f"model {spec.name}: binary task but the booster's output is not a sigmoid")
        p = g.op("Sigmoid", [margin], "p")
        q = g.op("Sub", [g.const("one", np.array(1.0, np.float32)), p], "q")
        g.nodes.append(helper.make_node("Concat", [q, p], ["probabilities"], axis=1, name="probabilities_node"))
        score_output = "probabilities"
        outputs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])]
    else:
        g.nodes.append(helper.make_node("Identity", [margin], ["variable"], name="variable_node"))
        score_output = "variable"
        outputs = [helper.make_tensor_value_info("variable", TensorProto.FLOAT, [None, 1])]

    graph = helper.make_graph(pre_nodes + g.nodes, "driftloop_tensor_trees", inputs, outputs, g.initializers)
    opsets = [helper.make_opsetid("", TARGET_OPSET)]
    if encoding.categories:
        opsets.append(helper.make_opsetid("ai.onnx.ml", ML_OPSET))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="driftloop")
    model.ir_version = min(model.ir_version, 8)  # what onnxruntime 1.1x reads
    meta = artifact_metadata(metadata, task=spec.task, algorithm=ensemble.algorithm, encoding=encoding,
                             score_output=score_output, form="tensor", tensor_layout=chosen,
                             trees=len(ensemble.trees), depth=depth)
    onnx.helper.set_model_props(model, metadata_props(meta))
    onnx.checker.check_model(model)
    return model.SerializeToString()


def build_tensor_onnx(fitted: FittedModel, encoding: FeatureEncoding, spec: DatasetSpec, metadata: dict[str, Any],
                      *, layout: Layout = "auto") -> bytes:
    """The tensor-op form of ``fitted``, with the same inputs, encoding, outputs and
    metadata contract as ``tasks.export.build_onnx`` (plus ``"form": "tensor"``).
    Raises ``TensorFormUnsupported`` for what the form cannot express: the caller skips
    the form and keeps the tree-kernel one."""
    ensemble = ensemble_of(fitted, spec.task, spec.name)
    return tensor_model(ensemble, encoding, spec, metadata, layout=layout)
