"""Scoring forms: the ways one registered version can be run, and which one a scorer uses.

Every version has the ONNX tree-kernel form (``onnx``: portable, the only one on edge
devices). Training may register two more beside it, each with its own sha256, a parity
check against the native model and a speed measured at registration:

- ``native``: the booster in its library's own format (XGBoost UBJSON, LightGBM text).
  Runs where that library is installed; XGBoost's predictor is ~2x ONNX Runtime's tree
  kernel on CPU.
- ``tensor``: the ensemble written in standard ONNX tensor ops (perfect tree traversal),
  which every execution provider runs, CUDA included; slower than the tree kernel on CPU.
- ``compiled`` (XGBoost): the trees as flat arrays, run by driftloop's branch-free kernel
  that numba compiles for the CPU (:mod:`driftloop.compiled_trees`); ~1.8x XGBoost's own
  predictor per thread, with XGBoost's scores bit for bit (registration keeps it only where
  they are equal on every parity row). Runs where numba is installed; xgboost is not needed.

The ONNX form's metadata (spec, feature encoding, classes) describes every form: a form's
bytes never carry a second description of the features. Only onnxruntime is imported at
module level: the training libraries are imported when a native form is loaded.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from typing import Any, Literal, Self

import numpy as np
import polars as pl
from pydantic import BaseModel, Field

from driftloop.errors import DriftloopError
from driftloop.features import FeatureEncoding
from driftloop.onnx_model import LoadedModel, input_feed, load_model, run_feed

FormKind = Literal["onnx", "native", "tensor", "compiled"]
Engine = Literal["auto", "onnx", "native", "tensor", "compiled"]
Device = Literal["cpu", "cuda"]
ENGINES: tuple[str, ...] = ("auto", "onnx", "native", "tensor", "compiled")


class FormRecord(BaseModel):
    """One verified form of a version, as the registry keeps it."""

    kind: FormKind
    uri: str
    sha256: str
    parity_rows: int = Field(description="rows compared with the native model at registration")
    parity_max_abs_diff: float
    parity_flips: int
    rows_per_s: float = Field(description="predict speed on the parity rows at registration (1 thread, CPU)")
    library: str | None = Field(default=None, description="what runs it besides onnxruntime, e.g. 'xgboost 2.1.4'")


class FormUnavailable(DriftloopError):
    """The asked-for form is not registered, or cannot run on this machine."""


def _library_of(algorithm: str) -> str:
    return "xgboost" if algorithm == "xgboost" else "lightgbm"


def why_unavailable(form: FormRecord, algorithm: str, device: Device) -> str | None:
    """None if ``form`` can run here on ``device``, else the reason it cannot."""
    if device == "cuda":
        if form.kind != "tensor":
            return f"the {form.kind} form has no CUDA path (ONNX Runtime runs tree-ensemble ops on CPU only)"
        if not cuda_provider_available():
            return "ONNX Runtime's CUDAExecutionProvider is not available here (install onnxruntime-gpu on a CUDA machine)"
        return None
    if form.kind == "native" and not _installed(_library_of(algorithm)):
        return f"{_library_of(algorithm)} is not installed here (pip install 'driftloop[train]')"
    if form.kind == "compiled" and not _installed("numba"):
        return "numba is not installed here (pip install 'driftloop[train]')"
    return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # an import hook that refuses it (a locked-down install)
        return False


def cuda_provider_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def choose_form(forms: Sequence[FormRecord], *, engine: Engine, algorithm: str, device: Device = "cpu") -> tuple[FormRecord, str]:
    """The form to score with, and why. ``auto``: the fastest verified form that runs here
    (on CUDA: the tensor form). A forced engine that cannot run here is an error."""
    by_kind = {f.kind: f for f in forms}
    if engine != "auto":
        if engine not in by_kind:
            raise FormUnavailable(
                f"this version has no {engine} form (registered: {', '.join(sorted(by_kind)) or 'none'}); "
                "train it again with this release, or pick --engine onnx"
            )
        reason = why_unavailable(by_kind[engine], algorithm, device)
        if reason:
            raise FormUnavailable(f"--engine {engine} cannot run here: {reason}")
        return by_kind[engine], f"{engine} (forced)"
    runnable = [f for f in forms if why_unavailable(f, algorithm, device) is None]
    if device == "cuda":
        runnable = [f for f in runnable if f.kind == "tensor"]
        if not runnable:
            reason = why_unavailable(by_kind["tensor"], algorithm, device) if "tensor" in by_kind else "no tensor form registered"
            raise FormUnavailable(f"--device cuda: {reason}")
    if not runnable:
        raise FormUnavailable("no registered form of this version can run here")
    best = max(runnable, key=lambda f: f.rows_per_s)
    others = ", ".join(f"{f.kind} {f.rows_per_s:,.0f}" for f in forms if f is not best)
    return best, f"{best.kind} (auto: fastest verified form here, {best.rows_per_s:,.0f} rows/s at registration; {others})"


# --- running a form ----------------------------------------------------------------


class StagedPredict:
    """A form's ``predict`` in two stages, so a pipeline can run them on different threads:
    ``prepare`` builds the kernel's input from validated rows (the native form's
    contiguous float32 matrix, the ONNX form's feed), ``run`` scores it (the kernel
    alone). Called whole, it is ``run(prepare(frame))``: the same scores either way.

    ``lanes`` > 1: ``run_lane`` is a single-threaded kernel that ``lanes`` threads may run
    at once, each on its own rows (a pipeline then keeps ``lanes`` batches in flight and
    its threads score pieces of them, instead of one batch on ``lanes`` threads); the
    scores of the pieces, in order, are the batch's scores."""

    def __init__(self, prepare: Callable[[pl.DataFrame], Any], run: Callable[[Any], np.ndarray], *,
                 run_lane: Callable[[Any], np.ndarray] | None = None, lanes: int = 1) -> None:
        self.prepare = prepare
        self.run = run
        self.run_lane = run_lane if run_lane is not None else run
        self.lanes = lanes if run_lane is not None else 1

    def __call__(self, frame: pl.DataFrame) -> np.ndarray:
        return self.run(self.prepare(frame))


@dataclass
class FormScorer:
    """A loaded form: ``predict`` takes validated rows and gives what the ONNX form gives
    (P(class 1) for binary, (n, k) probabilities for multiclass, the value for regression)."""

    kind: FormKind
    descriptor: LoadedModel  # the ONNX form: spec, classes, encoding
    predict: Callable[[pl.DataFrame], np.ndarray]  # a StagedPredict where the form has stages
    # Releases what the form holds besides memory (the ONNX form's helper thread). Call
    # ``close()`` (or use the scorer as a context manager) when scoring is done.
    release: Callable[[], None] | None = None

    def close(self) -> None:
        if self.release is not None:
            self.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Parallel batches: ORT's tree kernel hands work to its intra-op pool once per 128-row
# block; two single-thread runs on the two halves of a batch scored 5-25% more rows/s in
# the streamed scorer at 2 threads on 2 cores (bench/scoring.py). Smaller batches are
# scored whole.
HALVES_MIN_ROWS = 2048


def onnx_scorer(descriptor: LoadedModel, *, halves: LoadedModel | None = None) -> FormScorer:
    """The ONNX form. With ``halves`` (the same ONNX form loaded with 1 thread), each batch
    is split in two halves scored at once on that session, one in a helper thread and one
    in the caller's (``session.run`` is thread-safe and releases the GIL): the same scores
    as one single-thread run on the whole batch."""
    prepare = partial(input_feed, descriptor)
    if halves is None:
        return FormScorer("onnx", descriptor, StagedPredict(prepare, partial(run_feed, descriptor)))
    from concurrent.futures import ThreadPoolExecutor

    helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="driftloop-onnx-half")

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        rows = len(next(iter(feed.values()))) if feed else 0
        if rows < HALVES_MIN_ROWS:
            return run_feed(halves, feed)
        return _parts_at_once(partial(run_feed, halves), lambda a, b: {k: v[a:b] for k, v in feed.items()}, rows,
                              parts=2, pool=helper)

    return FormScorer("onnx", descriptor, StagedPredict(prepare, run), release=lambda: helper.shutdown(wait=True))


def _parts_at_once(run: Callable[[Any], np.ndarray], part: Callable[[int, int], Any], rows: int, *, parts: int,
                   pool: Any) -> np.ndarray:
    """A batch's ``rows`` in ``parts`` contiguous parts (``part(start, stop)``) scored at
    once, the first on this thread and the others on ``pool`` (single-threaded kernels that
    release the GIL): the scores of the parts, in order."""
    bounds = np.linspace(0, rows, parts + 1).astype(int)
    others = [pool.submit(run, part(a, b)) for a, b in pairwise(bounds[1:])]
    first = run(part(bounds[0], bounds[1]))
    return np.concatenate([first, *(other.result() for other in others)])


# On CPU the tensor form runs fastest on small slices (its per-level tensors stay in cache):
# ~1.5x on 1k-row slices against 100k-row batches in bench/scoring.py.
TENSOR_SLICE_ROWS = 1024


def tensor_scorer(descriptor: LoadedModel, data: bytes, *, threads: int | None, device: Device) -> FormScorer:
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    model = load_model(data, threads=threads, providers=providers)

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        rows = len(next(iter(feed.values()))) if feed else 0
        if device == "cuda" or rows <= TENSOR_SLICE_ROWS:
            return run_feed(model, feed)
        return np.concatenate([run_feed(model, {k: v[start:start + TENSOR_SLICE_ROWS] for k, v in feed.items()})
                               for start in range(0, rows, TENSOR_SLICE_ROWS)])

    return FormScorer("tensor", descriptor, StagedPredict(partial(input_feed, model), run))


def native_scorer(descriptor: LoadedModel, data: bytes, *, threads: int | None) -> FormScorer:
    encoding = FeatureEncoding.from_dict(descriptor.metadata["encoding"])
    algorithm = str(descriptor.metadata["algorithm"])
    task = descriptor.task
    if algorithm == "xgboost":
        import xgboost as xgb

        booster = xgb.Booster()
        booster.load_model(bytearray(data))
        if threads:
            booster.set_param({"nthread": threads})

        def run(x: np.ndarray) -> np.ndarray:
            return _as_form_output(np.asarray(booster.inplace_predict(x)), task)

        if threads and threads > 1:
            # Lanes: n threads, each running a 1-thread booster on its own rows
            # (inplace_predict is thread-safe). One batch on n threads waits at the end
            # of every call for its slowest thread, and a pipeline's reader, prepare and
            # writer threads preempt one of them each batch.
            lane = xgb.Booster()
            lane.load_model(bytearray(data))
            lane.set_param({"nthread": 1})

            def run_lane(x: np.ndarray) -> np.ndarray:
                return _as_form_output(np.asarray(lane.inplace_predict(x)), task)

            return FormScorer("native", descriptor, StagedPredict(encoding.matrix, run, run_lane=run_lane,
                                                                  lanes=threads))
    else:
        import lightgbm as lgb

        booster = lgb.Booster(model_str=data.decode("utf-8"))
        options = {"num_threads": threads} if threads else {}

        def run(x: np.ndarray) -> np.ndarray:
            return _as_form_output(np.asarray(booster.predict(x, **options)), task)

    # The matrix (contiguous float32, C order: what both libraries read without a copy)
    # is built in prepare, which a pipeline runs off the scoring thread.
    return FormScorer("native", descriptor, StagedPredict(encoding.matrix, run))


def compiled_scorer(descriptor: LoadedModel, data: bytes, *, threads: int | None) -> FormScorer:
    """The compiled form. Its kernel is single-threaded and releases the GIL: at n threads a
    pipeline runs n lanes of it, and a whole batch scored at once is split into n parts
    scored at once (the same scores, in order)."""
    from driftloop.compiled_trees import CompiledTrees

    trees = CompiledTrees.from_bytes(data)
    task = descriptor.task
    matrix = FeatureEncoding.from_dict(descriptor.metadata["encoding"]).matrix

    def run_lane(x: np.ndarray) -> np.ndarray:
        return _as_form_output(trees.predict(x), task)

    if not threads or threads < 2:
        return FormScorer("compiled", descriptor, StagedPredict(matrix, run_lane))
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="driftloop-compiled")
    parts = threads

    def run(x: np.ndarray) -> np.ndarray:
        if len(x) < HALVES_MIN_ROWS * parts:
            return run_lane(x)
        return _parts_at_once(run_lane, lambda a, b: x[a:b], len(x), parts=parts, pool=pool)

    return FormScorer("compiled", descriptor, StagedPredict(matrix, run,
                                                            run_lane=run_lane, lanes=threads),
                      release=lambda: pool.shutdown(wait=True))


def _as_form_output(out: np.ndarray, task: str) -> np.ndarray:
    if task == "binary_classification" and out.ndim == 2:
        return out[:, 1]
    if task == "regression":
        return out.reshape(-1)
    return out


def load_form(form: FormRecord, descriptor: LoadedModel, data: bytes, *, threads: int | None,
              device: Device = "cpu") -> FormScorer:
    """A verified form's bytes (``data``, already checked against ``form.sha256``), loaded.
    The ONNX form's bytes are optional (``descriptor`` already runs it); given them, at 2
    threads it scores the halves of each batch on a 1-thread session (parallel batches;
    measured at 2 threads only, so other thread counts keep ORT's intra-op threads)."""
    if form.kind == "onnx":
        parallel = bool(data) and threads == 2 and device == "cpu"
        return onnx_scorer(descriptor, halves=load_model(data, threads=1) if parallel else None)
    if form.kind == "tensor":
        return tensor_scorer(descriptor, data, threads=threads, device=device)
    if form.kind == "compiled":
        return compiled_scorer(descriptor, data, threads=threads)
    return native_scorer(descriptor, data, threads=threads)


def rows_per_second(predict: Callable[[pl.DataFrame], np.ndarray], frame: pl.DataFrame, *, min_seconds: float = 0.3) -> float:
    """Rows a second of ``predict`` on ``frame``, repeated until ``min_seconds`` have passed
    (best of the repeats: the least disturbed by other work on the machine)."""
    predict(frame.head(16))  # warm-up: lazy initialisation is not scoring speed
    best = float("inf")
    spent, repeats = 0.0, 0
    while spent < min_seconds or repeats < 3:
        started = time.perf_counter()
        predict(frame)
        took = time.perf_counter() - started
        best, spent, repeats = min(best, took), spent + took, repeats + 1
    return frame.height / best if best > 0 else float("inf")


def describe(forms: Sequence[FormRecord] | None) -> list[dict[str, Any]]:
    return [f.model_dump() for f in forms or ()]


def registered_forms(record: Any) -> list[FormRecord]:
    """The forms of a registered version (``ModelVersionRecord``). Versions registered
    before forms existed have their ONNX form only (speed unknown)."""
    if record.forms:
        return [FormRecord.model_validate(f) for f in record.forms]
    parity = record.parity or {}
    return [FormRecord(kind="onnx", uri=record.onnx_uri, sha256=record.onnx_sha256, parity_rows=int(parity.get("rows", 0)),
                       parity_max_abs_diff=float(parity.get("max_abs_diff", 0.0)), parity_flips=int(parity.get("label_flips", 0)),
                       rows_per_s=0.0)]
