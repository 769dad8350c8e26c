"""How long monitoring takes on a large analysis window, and how much memory: driftloop
(NannyML univariate + multivariate drift + CBPE + realized performance, calibrated
thresholds) and Evidently's DataDriftPreset on the same data, each in its own process.

Data: a 250k-row reference and 1M analysis rows x 20 features (16 continuous, 4
categorical), the first 4 features shifted; chunks of 50k rows. Written to Parquet once,
read by every measured process (as the monitor flow reads its inputs). Seconds are the
monitoring call alone (imports and reading excluded); peak RSS is the whole process's
(imports, inputs and all), from ``getrusage``.

- ``calibration``: the one-off calibration of the thresholds for this reference, chunk
  size and policy (``tasks.monitor_calculators.ensure_calibration``), into an empty store.
- ``driftloop``: a monitoring run that reads those stored thresholds (``fit_monitoring``
  on the reference, then the analysis is read, then ``monitor_analysis`` with a
  ``CalibrationStore``), as every monitor flow run after the first does.
- ``evidently``: Evidently's DataDriftPreset, one report on the whole analysis window
  against the reference (``--evidently-per-chunk``: one per chunk, as driftloop judges
  drift; much slower), univariate drift only, in a side virtual environment this script creates with ``uv`` (a pinned
  Evidently, outside the project's lock; cached under ``bench/.cache/``). If it cannot be
  created, the line says why instead of a figure.
- ``--levers``: the driftloop run again with each memory lever switched off (and float32
  features switched on), with whether its results equal the default run's.
- ``--baseline-tree DIR``: the driftloop run with the code of another checkout (e.g. a
  clone of the commit before, set up with ``make venv``), run by that checkout's own
  ``.venv/bin/python`` (its editable install maps ``driftloop.tasks`` to its own
  ``tasks/``; this environment's would not), without stored thresholds; its results are
  compared with this checkout's (``results_equal``).

Prints one JSON line on stdout (progress on stderr). Figures are printed, not asserted.

    .venv/bin/python bench/monitoring.py                  # 1M analysis rows, 250k reference
    .venv/bin/python bench/monitoring.py --quick          # 100k / 25k, a smoke run
    .venv/bin/python bench/monitoring.py --levers --baseline-tree /tmp/base
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ["NML_DISABLE_USAGE_LOGGING"] = "1"

ROOT = Path(__file__).resolve().parent.parent
N_CONTINUOUS, N_CATEGORICAL = 16, 4
EVIDENTLY_PINS = ["evidently==0.7.23", "pandas==2.3.3", "pyarrow"]  # Evidently 0.7 breaks on pandas 3
SIDE_ENV = ROOT / "bench" / ".cache" / "evidently-0.7.23"


def make_frame(rows: int, seed: int, shift: float) -> Any:
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(seed)
    data: dict[str, object] = {f"x{i:02d}": rng.normal(shift if i < 4 else 0.0, 1.0, rows) for i in range(N_CONTINUOUS)}
    for j in range(N_CATEGORICAL):
        data[f"c{j}"] = rng.choice(["a", "b", "c", "d"], rows)
    logit = sum(np.asarray(data[f"x{i:02d}"]) * 0.5 for i in range(4))
    proba = 1 / (1 + np.exp(-logit))
    data["probability"] = proba
    data["prediction"] = (proba >= 0.5).astype(np.int64)
    data["y"] = (rng.random(rows) < proba).astype(np.int64)
    data["ts"] = (np.datetime64("2025-01-01T00:00:00") + np.arange(rows).astype("timedelta64[s]")).astype("datetime64[us]")
    return pl.DataFrame(data)


def bench_spec(chunk: int) -> Any:
    from driftloop.spec import parse_spec

    columns: dict[str, Any] = {f"x{i:02d}": {"dtype": "float"} for i in range(N_CONTINUOUS)}
    columns |= {f"c{j}": {"dtype": "category"} for j in range(N_CATEGORICAL)}
    return parse_spec({"name": "bench", "task": "binary_classification", "target": "y", "timestamp": "ts",
                       "columns": {**columns, "y": {"dtype": "int"}, "ts": {"dtype": "datetime"}},
                       "monitoring": {"chunk_size": chunk}})


def import_nannyml() -> float:
    """Seconds to import NannyML (several on 2 cores): paid once per process, kept out of
    the monitoring figures as in every earlier run of this bench."""
    try:  # as monitoring imports it (in either checkout)
        from driftloop.tasks.monitor_frames import nannyml
    except ImportError:  # a baseline checkout from before tasks/monitor.py was split
        from driftloop.tasks.monitor_frames import nannyml

    started = time.perf_counter()
    nannyml()
    return time.perf_counter() - started


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


# --- measured processes ---------------------------------------------------------------

def child_calibrate(data: Path, store_dir: Path, chunk: int) -> dict[str, Any]:
    import polars as pl

    from driftloop.storage import ArtifactStore
    from driftloop.tasks.calibration import CalibrationStore
    from driftloop.tasks.monitor_calculators import ensure_calibration

    import_seconds = import_nannyml()
    spec = bench_spec(chunk)
    reference = pl.read_parquet(data / "reference.parquet")
    store = CalibrationStore(ArtifactStore(str(store_dir)), "bench")
    started = time.perf_counter()
    found = ensure_calibration(reference, spec, spec.monitoring, store)
    seconds = time.perf_counter() - started
    assert found is not None
    return {"seconds": seconds, "peak_rss_gb": peak_rss_gb(), "source": found[1], "import_seconds": import_seconds}


def child_monitor(data: Path, store_dir: Path | None, chunk: int, levers: dict[str, Any], dump: Path | None) -> dict[str, Any]:
    import polars as pl

    from driftloop.tasks import monitor

    import_seconds = import_nannyml()
    spec = bench_spec(chunk)
    reference = pl.read_parquet(data / "reference.parquet")
    if store_dir is None:  # a baseline checkout (recalibrates every run): both frames first
        analysis = pl.read_parquet(data / "analysis.parquet")
        started = time.perf_counter()
        report = monitor.run_monitoring(reference, analysis, spec, spec.monitoring, with_plots=False)
        seconds = time.perf_counter() - started
    else:  # as the monitor flow runs: fit on the reference, then read the analysis
        from driftloop.storage import ArtifactStore
        from driftloop.tasks.calibration import CalibrationStore

        started = time.perf_counter()
        fit = monitor.fit_monitoring(reference, spec, spec.monitoring, levers=monitor.Levers(**levers))
        del reference
        seconds = time.perf_counter() - started
        analysis = pl.read_parquet(data / "analysis.parquet")  # not timed, as the reads above
        started = time.perf_counter()
        report = monitor.monitor_analysis(fit, analysis, with_plots=False,
                                          calibrations=CalibrationStore(ArtifactStore(str(store_dir)), "bench"))
        seconds += time.perf_counter() - started
    out = {"seconds": seconds, "peak_rss_gb": peak_rss_gb(), "results": len(report.results),
           "calibration": getattr(report, "calibration_source", "computed"), "import_seconds": import_seconds}
    if dump is not None:
        with dump.open("wb") as fh:
            pickle.dump(report.results, fh)
    return out


# --- the parent -------------------------------------------------------------------------

def baseline_python(tree: Path) -> Path:
    """The other checkout's own interpreter: the one that imports its code."""
    python = tree.resolve() / ".venv" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"--baseline-tree {tree}: no {python}; run `make venv` in that checkout first")
    return python


def run_child(args: list[str], *, python: str = sys.executable, env: dict[str, str] | None = None,
              timeout: float = 3600) -> dict[str, Any]:
    """A measured process; its last stdout line is its JSON result."""
    proc = subprocess.run([python, *args], check=False, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-5:]
        raise RuntimeError(f"{args[:3]} exited {proc.returncode}: {' | '.join(tail)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def side_env() -> tuple[str | None, str | None]:
    """The side environment's python (created on first use), or why there is none."""
    python = SIDE_ENV / "bin" / "python"
    marker = SIDE_ENV / ".ready"
    if marker.exists() and marker.read_text() == " ".join(EVIDENTLY_PINS) and python.exists():
        return str(python), None
    uv = str(ROOT / ".venv" / "bin" / "uv") if (ROOT / ".venv" / "bin" / "uv").exists() else shutil.which("uv")
    if uv is None:
        return None, "side environment not created: no uv (make venv installs it)"
    shutil.rmtree(SIDE_ENV, ignore_errors=True)
    try:
        subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(SIDE_ENV)], check=True,
                       capture_output=True, text=True, timeout=300)
        subprocess.run([uv, "pip", "install", "--quiet", "--python", str(python), *EVIDENTLY_PINS], check=True,
                       capture_output=True, text=True, timeout=900)
        subprocess.run([str(python), "-c", "import evidently"], check=True, capture_output=True, text=True, timeout=300)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        return None, f"side environment not created ({' '.join(EVIDENTLY_PINS)}): {str(detail).strip()[-300:]}"
    marker.write_text(" ".join(EVIDENTLY_PINS))
    return str(python), None


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k analysis rows, 25k reference")
    parser.add_argument("--rows", type=int, default=None, help="analysis rows (default 1M)")
    parser.add_argument("--reference-rows", type=int, default=None, help="reference rows (default rows / 4)")
    parser.add_argument("--levers", action="store_true", help="also measure each memory lever switched off")
    parser.add_argument("--baseline-tree", type=Path, default=None,
                        help="also run the monitoring of this checkout (its own code, no stored thresholds)")
    parser.add_argument("--no-evidently", action="store_true")
    parser.add_argument("--evidently-per-chunk", action="store_true", help="one Evidently report per chunk")
    parser.add_argument("--child", choices=["calibrate", "monitor"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--lever-args", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--dump", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "calibrate":
        print(json.dumps(child_calibrate(args.data, args.store, args.chunk)))
        return
    if args.child == "monitor":
        print(json.dumps(child_monitor(args.data, args.store, args.chunk, json.loads(args.lever_args), args.dump)))
        return

    rows = args.rows or (100_000 if args.quick else 1_000_000)
    reference_rows = args.reference_rows or rows // 4  # 5 reference chunks
    chunk = rows // 20
    script = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory(prefix="bench-monitoring-") as tmp:
        work = Path(tmp)
        data, store = work / "data", work / "store"
        data.mkdir()
        make_frame(reference_rows, 1, 0.0).write_parquet(data / "reference.parquet")
        make_frame(rows, 2, 0.3).write_parquet(data / "analysis.parquet")
        common = ["--data", str(data), "--chunk", str(chunk)]
        log(f"analysis {rows:,} rows x 20 features, reference {reference_rows:,}, chunks of {chunk:,}")

        calibration = run_child([script, "--child", "calibrate", "--store", str(store), *common])
        log(f"  calibration (once per reference, chunk size, policy): {calibration['seconds']:.1f} s, "
            f"peak RSS {calibration['peak_rss_gb']:.2f} GB")
        default_dump = work / "default.pkl"
        driftloop = run_child([script, "--child", "monitor", "--store", str(store), *common, "--dump", str(default_dump)])
        assert driftloop["calibration"] == "stored", driftloop
        log(f"  driftloop, stored thresholds: {driftloop['seconds']:.1f} s, peak RSS {driftloop['peak_rss_gb']:.2f} GB")
        line: dict[str, Any] = {
            "rows": rows, "reference_rows": reference_rows, "chunk_rows": chunk,
            "driftloop": {"seconds": round(driftloop["seconds"], 2), "peak_rss_gb": round(driftloop["peak_rss_gb"], 3),
                          "calibration_seconds": round(calibration["seconds"], 2),
                          "calibration_peak_rss_gb": round(calibration["peak_rss_gb"], 3),
                          "nannyml_import_seconds": round(driftloop["import_seconds"], 2)},
        }

        if args.no_evidently:
            line["evidently"] = "not run (--no-evidently)"
        else:
            python, why = side_env()
            if python is None:
                line["evidently"] = why
            else:
                peer = str(ROOT / "bench" / "evidently_peer.py")
                try:
                    evidently = run_child([peer, "--data", str(data), "--chunk", str(chunk if args.evidently_per_chunk else 0)],
                                          python=python)
                    line["evidently"] = {"seconds": round(evidently["seconds"], 2),
                                         "peak_rss_gb": round(evidently["peak_rss_gb"], 3),
                                         "version": evidently["version"], "reports": evidently["reports"]}
                    log(f"  Evidently DataDriftPreset: {evidently['seconds']:.1f} s, peak RSS {evidently['peak_rss_gb']:.2f} GB")
                except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
                    line["evidently"] = f"side environment present, run failed: {exc}"

        if args.levers:
            with default_dump.open("rb") as fh:
                expected = pickle.load(fh)
            line["levers"] = {}
            variants = {"no batches (whole analysis in pandas)": {"batch_rows": None},
                        "no categoricals (Python strings)": {"categoricals": False},
                        "no views (pandas copies of polars columns)": {"views": False},
                        "none of the three": {"batch_rows": None, "categoricals": False, "views": False},
                        "float32 analysis features (not adopted)": {"float32": True}}
            for name, levers in variants.items():
                dump = work / "lever.pkl"
                out = run_child([script, "--child", "monitor", "--store", str(store), *common,
                                 "--lever-args", json.dumps(levers), "--dump", str(dump)])
                with dump.open("rb") as fh:
                    equal, detail = compare(expected, pickle.load(fh))
                line["levers"][name] = {"seconds": round(out["seconds"], 2), "peak_rss_gb": round(out["peak_rss_gb"], 3),
                                        "results_equal": equal, **detail}
                log(f"  lever off: {name}: {out['seconds']:.1f} s, peak RSS {out['peak_rss_gb']:.2f} GB, equal {equal}")

        if args.baseline_tree is not None:
            dump = work / "baseline.pkl"
            baseline = run_child([script, "--child", "monitor", *common, "--dump", str(dump)],
                                 python=str(baseline_python(args.baseline_tree)))
            with default_dump.open("rb") as fh, dump.open("rb") as fh_base:
                equal, detail = compare(pickle.load(fh_base), pickle.load(fh))
            line["baseline"] = {"tree": str(args.baseline_tree), "seconds": round(baseline["seconds"], 2),
                                "peak_rss_gb": round(baseline["peak_rss_gb"], 3), "results_equal": equal, **detail}
            log(f"  baseline {args.baseline_tree}: {baseline['seconds']:.1f} s, peak RSS {baseline['peak_rss_gb']:.2f} GB")
    print(json.dumps(line))


def compare(expected: list[dict[str, Any]], found: list[dict[str, Any]]) -> tuple[bool, dict[str, Any]]:
    """Whether two runs' result rows are equal; else how many differ and by how much."""
    def keyed(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
        return {(r["chunk_index"], r["kind"], r["name"], r["method"]): r for r in rows}

    a, b = keyed(expected), keyed(found)
    if a.keys() != b.keys():
        return False, {"rows_differ": "different result rows"}
    alerts = sum(a[k]["alert"] != b[k]["alert"] for k in a)
    worst = 0.0
    for k in a:
        x, y = a[k]["value"], b[k]["value"]
        if x != y:
            worst = max(worst, abs(x - y) / max(abs(x), 1e-12) if x is not None and y is not None else float("inf"))
    equal = all(a[k] == b[k] for k in a)
    return equal, ({} if equal else {"alerts_differ": alerts, "max_relative_value_difference": worst})


if __name__ == "__main__":
    main()
