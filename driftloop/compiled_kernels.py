"""The numba kernels of :mod:`driftloop.compiled_trees` (imported only when a compiled form
runs: numba comes with the ``train`` extra). The machine code is cached on disk (beside
this file, or numba's user cache where that is read-only), so only the first process on a
machine pays the compile (~1.5 s for all four).

Float32 throughout, in XGBoost's order of operations: the scores must equal XGBoost's
bit for bit (``tests/unit/test_compiled_trees.py``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


def jit(**options: object):
    """numba's ``njit`` with the machine code cached on disk where numba finds a writable
    place for it; where it finds none (a read-only install and home), numba refuses
    ``cache=True`` outright, and the kernels are compiled in each process instead."""

    def compile_(function):
        try:
            return njit(cache=True, **options)(function)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return njit(cache=False, **options)(function)

    return compile_


_FEATURE = np.uint32(0x7FFFFFFF)
_SHIFT = np.uint32(31)
_ONE = np.uint32(1)
_TWO = np.uint32(2)


@jit(nogil=True, boundscheck=False)
def add_trees(x, n_features, nodes, thresholds, leaves, tree_group, depth, out):  # pragma: no cover - compiled
    """Add every tree's leaf to ``out`` (rows, groups; holding the base margins), tree by
    tree, for the rows of ``x`` (rows * n_features, flat). Rows go eight at a time: eight
    independent walks per tree that the CPU overlaps (each step is loads, a compare and
    ``node = 2 * node + 1 + right``, no branch). A missing value (NaN) fails ``>=``, so
    it goes right only where the node's high bit says so."""
    # The eight walks are spelled out as eight scalars so that they stay in registers: a
    # local array of eight node indices goes through memory (1.3x slower, measured).
    rows = out.shape[0]
    inner = (1 << depth) - 1
    trees = tree_group.shape[0]
    full = rows - rows % 8
    for start in range(0, full, 8):
        o0 = np.uint64((start + 0) * n_features)
        o1 = np.uint64((start + 1) * n_features)
        o2 = np.uint64((start + 2) * n_features)
        o3 = np.uint64((start + 3) * n_features)
        o4 = np.uint64((start + 4) * n_features)
        o5 = np.uint64((start + 5) * n_features)
        o6 = np.uint64((start + 6) * n_features)
        o7 = np.uint64((start + 7) * n_features)
        for t in range(trees):
            base = np.uint32(t * inner)
            g = tree_group[t]
            j0 = j1 = j2 = j3 = j4 = j5 = j6 = j7 = np.uint32(0)
            for _ in range(depth):
                w = nodes[base + j0]
                v = x[o0 + np.uint64(w & _FEATURE)]
                j0 = _TWO * j0 + _ONE + np.uint32((v >= thresholds[base + j0]) | (math.isnan(v) & ((w >> _SHIFT) == _ONE)))
                w = nodes[base + j1]
                v = x[o1 + np.uint64(w & _FEATURE)]
                j1 = _TWO * j1 + _ONE + np.uint32((v >= thresholds[base + j1]) | (math.isnan(v) & ((w >> _SHIFT) == _ONE)))
                w = nodes[base + j2]
                v = x[o2 + np.uint64(w & _FEATURE)]
                j2 = _TWO * j2 + _ONE + np.uint32((v >= thresholds[base + j2]) | (math.isnan(v) & ((w >> _SHIFT) == _ONE)))
                w = nodes[base + j3]
                v = x[o3 + np.uint64(w & _FEATURE)]
                j3 = _TWO * j3 + _ONE + np.uint32((v >= thresholds[base + j3]) | (math.isnan(v) & ((w >> _SHIFT) == _ONE)))
                w = nodes[base + j4]
                v = x[o4 + np.uint64(w & _FEATURE)]
                j4 = _TWO * j4 + _ONE + np.uint32((v >= thresholds[base + j4]) | (math.isnan(v) & ((w >> _SHIFT) == _ONE)))
                w = nodes[base + j5]
                v = x[o5 + np.uint64(w & _FEATURE)]
                j5 = _TWO * j5 + _ONE + np.uint32((v >= thresholds[base + j5]) | (math.isnan(v) & ((w >> _SHIFT) == _ONE)))
                w = nodes[base + j6]
                v = x[o6 + np.uint64(w & _FEATURE)]
                j6 = _TWO * j6 + _ONE + np.uint32((v >= thresholds[base + j6]) | (math.isnan(v) & ((w >> _SHIFT) == _ONE)))
                w = nodes[base + j7]
                v = x[o7 + np.uint64(w & _FEATURE)]
                j7 = _TWO * j7 + _ONE + np.uint32((v >= thresholds[base + j7]) | (math.isnan(v) & ((w >> _SHIFT) == _ONE)))
            leaf = t * (inner + 1) - inner  # j ends in [inner, 2 * inner]: leaf j - inner
            out[start + 0, g] += leaves[leaf + j0]
            out[start + 1, g] += leaves[leaf + j1]
            out[start + 2, g] += leaves[leaf + j2]
            out[start + 3, g] += leaves[leaf + j3]
            out[start + 4, g] += leaves[leaf + j4]
            out[start + 5, g] += leaves[leaf + j5]
            out[start + 6, g] += leaves[leaf + j6]
            out[start + 7, g] += leaves[leaf + j7]
    for row in range(full, rows):
        o = np.uint64(row * n_features)
        for t in range(trees):
            base = np.uint32(t * inner)
            j = np.uint32(0)
            for _ in range(depth):
                w = nodes[base + j]
                v = x[o + np.uint64(w & _FEATURE)]
                j = _TWO * j + _ONE + np.uint32((v >= thresholds[base + j]) | (math.isnan(v) & ((w >> _SHIFT) == _ONE)))
            out[row, tree_group[t]] += leaves[t * (inner + 1) - inner + j]


@jit(nogil=True)
def sigmoid(margins):  # pragma: no cover - compiled
    """XGBoost's ``common::Sigmoid`` (float32): 1 / (expf(min(-x, 88.7)) + 1 + 1e-16)."""
    out = np.empty_like(margins)
    cap = np.float32(88.7)
    one = np.float32(1.0)
    eps = np.float32(1e-16)
    for i in range(margins.shape[0]):
        out[i] = one / (math.exp(min(-margins[i], cap)) + one + eps)
    return out


@jit(nogil=True)
def softmax_rows(margins):  # pragma: no cover - compiled
    """XGBoost's ``common::Softmax`` per row: expf(x - max) in float32, summed in double,
    each divided by the sum cast to float32."""
    out = np.empty_like(margins)
    for i in range(margins.shape[0]):
        top = margins[i, 0]
        for k in range(1, margins.shape[1]):
            top = max(margins[i, k], top)
        total = 0.0
        for k in range(margins.shape[1]):
            out[i, k] = math.exp(margins[i, k] - top)
            total += np.float64(out[i, k])
        scale = np.float32(total)
        for k in range(margins.shape[1]):
            out[i, k] = out[i, k] / scale
    return out


@jit()
def logit(p):  # pragma: no cover - compiled
    """XGBoost's ProbToMargin for binary:logistic: -logf(1 / p - 1), float32."""
    one = np.float32(1.0)
    return -math.log(one / p - one)
