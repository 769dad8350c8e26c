"""A full disk while the scoring output is written (the child process's file-size limit
stands in for it): a clear error, nothing committed, the earlier output intact and
nothing left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from driftloop.onnx_model import load_model
from driftloop.spec import load_spec
from driftloop.storage import read_predictions
from driftloop.tasks.export import build_onnx
from driftloop.tasks.fit import fit_model, prepare_training_data
from driftloop.tasks.score import score_stream
from driftloop.tasks.split import split_dataset
from tests.support.data import make_loans, write_spec

_LIMITED_SCORER = """
import resource, signal, sys
from driftloop.errors import DriftloopError
from driftloop.onnx_model import load_model
from driftloop.tasks.score import score_stream
model = load_model(open(sys.argv[1], "rb").read())
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
try:
    score_stream(model, sys.argv[2], sys.argv[3], model_name="loans", model_version=2, batch_size=5_000)
except DriftloopError as exc:
    print(exc)
    sys.exit(3)
"""


def test_a_full_disk_commits_nothing_and_keeps_the_earlier_output(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path))
    split = split_dataset(make_loans(3000, seed=1), spec, seed=0)
    data, encoding, _ = prepare_training_data(spec, split.train, split.valid)
    onnx = build_onnx(fit_model("lightgbm", {"num_leaves": 7}, data, seed=0), encoding, spec,
                      {"spec": spec.model_dump(mode="json")})
    (tmp_path / "model.onnx").write_bytes(onnx)
    earlier, later = tmp_path / "earlier.parquet", tmp_path / "later.parquet"
    make_loans(1_000, seed=2).drop("repaid").write_parquet(earlier)
    make_loans(60_000, seed=3).drop("repaid").write_parquet(later)
    out = tmp_path / "predictions"
    score_stream(load_model(onnx), str(earlier), str(out), model_name="loans", model_version=1)

    done = subprocess.run([sys.executable, "-c", _LIMITED_SCORER, str(tmp_path / "model.onnx"), str(later), str(out)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "disk full or a file-size limit" in done.stdout and "nothing was committed" in done.stdout
    kept = read_predictions(str(out))
    assert kept.height == 1_000 and kept["model_version"].unique().to_list() == [1]  # the earlier output, whole
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
