"""The compiled form of an XGBoost model: its trees as perfect binary trees in flat arrays,
scored by a branch-free kernel that numba compiles for the CPU it runs on.

Why it is faster than XGBoost's own predictor (~2x per thread in bench/scoring.py): every
tree is padded to the ensemble's depth, so a row's walk is ``depth`` steps of
``node = 2 * node + 1 + went_right`` with no branch to mispredict, and the kernel walks
eight rows at once through each tree, so the CPU overlaps their memory loads.

Why the scores are XGBoost's, bit for bit: each row's margin starts at the model's base
margin and adds the trees' leaf values in float32, in tree order, as XGBoost's CPU predictor
does; a split sends a row left when ``value < threshold`` and a missing value (NaN) to the
split's default side; the output transforms are XGBoost's float32 formulas with libm's
``expf``. Registration (``tasks.form_builder``) keeps the form only where its scores equal
the native model's exactly on the parity rows.

Supported: ``gbtree`` boosters with numeric splits, depth <= ``MAX_DEPTH``, objectives
``binary:logistic``, ``multi:softprob`` and ``reg:squarederror`` (what ``tasks.fit``
trains). Anything else raises :class:`CompiledFormUnsupported` and the version keeps its
other forms.

The form's bytes are a small JSON header and the raw arrays (deterministic: the same
booster gives the same bytes). :meth:`CompiledTrees.from_bytes` checks every index the
kernel will follow, because the kernel itself does not: a form's bytes are verified
against the registry's sha256, and still read as untrusted input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from driftloop.errors import DriftloopError

MAGIC = b"driftloop-compiled-trees/1\n"
MAX_DEPTH = 12  # 4,095 nodes a tree once padded; tasks.search_space tunes depth 3-10
OBJECTIVES = ("binary:logistic", "multi:softprob", "reg:squarederror")
_RIGHT_ON_MISSING = np.uint32(1 << 31)  # high bit of a node word; the low bits are the feature
_FEATURE_BITS = np.uint32((1 << 31) - 1)


class CompiledFormUnsupported(DriftloopError):
    """The model has something the compiled form does not run (the reason says what)."""


class CompiledFormInvalid(DriftloopError):
    """A compiled form's bytes are not a well-formed form (corrupt or not ours)."""


@dataclass(frozen=True)
class CompiledTrees:
    """An ensemble as perfect trees of ``depth`` levels. Tree ``t``'s internal node ``i``
    (breadth-first: children of ``i`` are ``2i+1`` and ``2i+2``) splits on feature
    ``nodes[t, i] & 0x7fffffff`` at ``thresholds[t, i]``; its high bit sends a missing value
    right. Leaf ``j`` of tree ``t`` is ``leaves[t, j]``, added to output column
    ``tree_group[t]``."""

    objective: str
    n_features: int
    depth: int
    base_margin: np.ndarray  # float32, one per output column
    tree_group: np.ndarray  # int32, one per tree
    nodes: np.ndarray  # uint32 (trees, 2**depth - 1)
    thresholds: np.ndarray  # float32 (trees, 2**depth - 1)
    leaves: np.ndarray  # float32 (trees, 2**depth)

    @property
    def trees(self) -> int:
        return int(self.tree_group.shape[0])

    @property
    def groups(self) -> int:
        return int(self.base_margin.shape[0])

    # --- building ------------------------------------------------------------------

    @classmethod
    def from_xgboost(cls, booster: Any) -> CompiledTrees:
        """The compiled form of an ``xgboost.Booster`` (read from its JSON model)."""
        return cls.from_xgboost_json(json.loads(bytes(booster.save_raw(raw_format="json"))))

    @classmethod
    def from_xgboost_json(cls, model: dict[str, Any]) -> CompiledTrees:
        learner = model["learner"]
        objective = str(learner["objective"]["name"])
        if objective not in OBJECTIVES:
            raise CompiledFormUnsupported(f"objective {objective} (the compiled form runs {', '.join(OBJECTIVES)})")
        booster = learner["gradient_booster"]
        if booster.get("name") != "gbtree":
            raise CompiledFormUnsupported(f"booster {booster.get('name')} (the compiled form runs gbtree)")
        params = learner["learner_model_param"]
        n_features = int(params["num_feature"])
        groups = max(1, int(params.get("num_class", 0) or 0)) if objective == "multi:softprob" else 1
        trees = booster["model"]["trees"]
        tree_group = np.asarray(booster["model"]["tree_info"], dtype=np.int32)
        if len(tree_group) != len(trees):
            raise CompiledFormUnsupported("tree_info does not give one output per tree")
        for tree in trees:
            if any(int(t) != 0 for t in tree.get("split_type", [])):
                raise CompiledFormUnsupported("categorical splits (the compiled form runs numeric splits only)")
        depth = max((_tree_depth(t["left_children"], t["right_children"]) for t in trees), default=0)
        if depth > MAX_DEPTH:
            raise CompiledFormUnsupported(f"trees {depth} levels deep (the compiled form pads every tree to its "
                                          f"depth and stops at {MAX_DEPTH})")
        inner = (1 << depth) - 1
        nodes = np.zeros((len(trees), inner), dtype=np.uint32)
        thresholds = np.full((len(trees), inner), np.inf, dtype=np.float32)
        leaves = np.zeros((len(trees), inner + 1), dtype=np.float32)
        for t, tree in enumerate(trees):
            _pad_tree(tree, depth, nodes[t], thresholds[t], leaves[t])
        base_score = np.float32(float(params["base_score"]))
        base = _prob_to_margin(objective, base_score)
        return cls(objective, n_features, depth, np.full(groups, base, dtype=np.float32), tree_group,
                   nodes, thresholds, leaves)

    # --- bytes ---------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        header = {"objective": self.objective, "n_features": self.n_features, "depth": self.depth,
                  "trees": self.trees, "groups": self.groups}
        arrays = (self.base_margin, self.tree_group, self.nodes, self.thresholds, self.leaves)
        return b"".join([MAGIC, json.dumps(header, sort_keys=True).encode(), b"\n",
                         *(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes() for a in arrays)])

    @classmethod
    def from_bytes(cls, data: bytes) -> CompiledTrees:
        """A form's bytes, checked so that the kernel never reads outside its arrays."""
        if not data.startswith(MAGIC):
            raise CompiledFormInvalid("not a compiled-trees form (bad magic)")
        end = data.find(b"\n", len(MAGIC))
        if end < 0:
            raise CompiledFormInvalid("unreadable header: no end of line")
        try:
            header = json.loads(data[len(MAGIC):end])
            objective, n_features = str(header["objective"]), int(header["n_features"])
            depth, trees, groups = int(header["depth"]), int(header["trees"]), int(header["groups"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CompiledFormInvalid(f"unreadable header: {exc}") from exc
        if (objective not in OBJECTIVES or not 0 <= depth <= MAX_DEPTH or n_features < 1 or trees < 0 or groups < 1
                or trees << depth >= 1 << 32):  # the kernel indexes nodes with 32 bits
            raise CompiledFormInvalid(f"header out of range: {header}")
        inner = (1 << depth) - 1
        layout = [("base_margin", "<f4", (groups,)), ("tree_group", "<i4", (trees,)), ("nodes", "<u4", (trees, inner)),
                  ("thresholds", "<f4", (trees, inner)), ("leaves", "<f4", (trees, inner + 1))]
        offset, arrays = end + 1, {}
        for name, dtype, shape in layout:
            size = int(np.prod(shape)) * 4
            if offset + size > len(data):
                raise CompiledFormInvalid(f"{name}: the form ends early ({len(data)} bytes)")
            arrays[name] = np.frombuffer(data, dtype=dtype, count=size // 4, offset=offset).reshape(shape).astype(dtype[1:])
            offset += size
        if offset != len(data):
            raise CompiledFormInvalid(f"{len(data) - offset} bytes after the last array")
        if trees and (arrays["tree_group"].min() < 0 or arrays["tree_group"].max() >= groups):
            raise CompiledFormInvalid("a tree adds to an output column that does not exist")
        if inner and int((arrays["nodes"] & _FEATURE_BITS).max(initial=0)) >= n_features:
            raise CompiledFormInvalid("a split reads a feature index beyond the model's features")
        return cls(objective, n_features, depth, **arrays)

    # --- scoring -------------------------------------------------------------------

    def margins(self, x: np.ndarray) -> np.ndarray:
        """Raw scores (n, groups), float32, of ``x``: (n, n_features) float32, C order."""
        if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != self.n_features or not x.flags.c_contiguous:
            raise ValueError(f"the compiled form scores a C-ordered float32 matrix of {self.n_features} features, "
                             f"got {x.dtype} {x.shape}")
        out = np.empty((x.shape[0], self.groups), dtype=np.float32)
        out[:] = self.base_margin
        _kernels().add_trees(x.reshape(-1), self.n_features, self.nodes.reshape(-1), self.thresholds.reshape(-1),
                  self.leaves.reshape(-1), self.tree_group, self.depth, out)
        return out

    def predict(self, x: np.ndarray) -> np.ndarray:
        """What ``Booster.inplace_predict`` gives: P(class 1) for binary, (n, k)
        probabilities for multiclass, the value for regression."""
        out = self.margins(x)
        if self.objective == "binary:logistic":
            return _kernels().sigmoid(out.reshape(-1))
        if self.objective == "multi:softprob":
            return _kernels().softmax_rows(out)
        return out.reshape(-1)


def _tree_depth(left: list[int], right: list[int]) -> int:
    """Levels of splits on the longest path of a tree given by its child lists."""
    depth, stack, seen = 0, [(0, 0)], 0
    while stack:
        node, level = stack.pop()
        seen += 1
        if seen > len(left) or not 0 <= node < len(left):
            raise CompiledFormUnsupported("a tree's child lists do not form a tree")
        if left[node] != -1:
            depth = max(depth, level + 1)
            stack += [(left[node], level + 1), (right[node], level + 1)]
    return depth


def _pad_tree(tree: dict[str, Any], depth: int, nodes: np.ndarray, thresholds: np.ndarray, leaves: np.ndarray) -> None:
    """Lay ``tree`` out as a perfect tree of ``depth`` levels: a leaf above the last level
    fills every leaf slot below it (the splits between never change the outcome)."""
    left, right = tree["left_children"], tree["right_children"]
    feature, condition, default_left = tree["split_indices"], tree["split_conditions"], tree["default_left"]
    inner = (1 << depth) - 1
    stack = [(0, 0, 0)]  # (node in XGBoost's numbering, slot in the perfect tree, level)
    while stack:
        node, slot, level = stack.pop()
        if left[node] == -1:  # a leaf: XGBoost keeps its value in split_conditions
            first = ((slot + 1) << (depth - level)) - 1 - inner
            leaves[first:first + (1 << (depth - level))] = np.float32(condition[node])
            continue
        nodes[slot] = np.uint32(int(feature[node])) | (np.uint32(0) if default_left[node] else _RIGHT_ON_MISSING)
        thresholds[slot] = np.float32(condition[node])
        stack += [(left[node], 2 * slot + 1, level + 1), (right[node], 2 * slot + 2, level + 1)]


def _prob_to_margin(objective: str, base_score: np.float32) -> np.float32:
    """XGBoost's ProbToMargin in float32: the logit (libm's logf) for binary:logistic, the
    value itself for the others."""
    if objective == "binary:logistic":
        return np.float32(_kernels().logit(np.float32(base_score)))
    return np.float32(base_score)


# --- the kernels (numba; compiled on first use and cached on disk) ------------------------


def _kernels() -> Any:
    """:mod:`driftloop.compiled_kernels`, imported on first use: numba is needed only where
    a compiled form is built or run (ImportError where it is not installed)."""
    from driftloop import compiled_kernels

    return compiled_kernels
