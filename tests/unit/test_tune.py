from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from driftloop.errors import DriftloopError
from driftloop.tasks.fit import check_device
from tests.support.data import write_spec

# Runs in a fresh process: tune `n` trials of a shared study with a worker-specific seed.
_WORKER = """
import sys
from pathlib import Path
from driftloop.spec import load_spec
from driftloop.tasks.split import split_dataset
from driftloop.tasks.fit import prepare_training_data
from driftloop.tasks.tune import tune
from tests.support.data import make_loans
storage, worker, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
spec = load_spec(sys.argv[4])
split = split_dataset(make_loans(1500), spec, seed=0)
data, _, _ = prepare_training_data(spec, split.train, split.valid)
result = tune("lightgbm", data, study_name="shared", storage=storage, n_trials=n, seed=100 + worker, threads=1)
print(result.trials_run)
"""


def run_workers(storage: str, tmp_path: Path, trials: tuple[int, ...]) -> None:
    spec = write_spec(tmp_path)
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, storage, str(i), str(n), str(spec)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i, n in enumerate(trials)
    ]
    for proc, n in zip(procs, trials, strict=True):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        assert out.strip().splitlines()[-1] == str(n)


def assert_shared_study(storage: str, total: int) -> None:
    study = optuna.load_study(study_name="shared", storage=storage)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == total and sorted(numbers) == list(range(total))


def test_two_processes_tune_one_study_on_sqlite(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    run_workers(storage, tmp_path, (4, 3))
    assert_shared_study(storage, 7)


@pytest.mark.postgres
def test_two_processes_tune_one_study_on_postgres(tmp_path: Path, postgres) -> None:
    storage = postgres.create_database("studies")
    run_workers(storage, tmp_path, (3, 3))
    assert_shared_study(storage, 6)


def _cuda_visible() -> bool:
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def test_cuda_without_a_gpu_fails_before_training() -> None:
    check_device("cpu")
    with pytest.raises(DriftloopError, match="'tpu' is not supported"):
        check_device("tpu")
    if _cuda_visible():  # a GPU machine: cuda must be accepted
        check_device("cuda")
    else:
        with pytest.raises(DriftloopError, match="set DRIFTLOOP_DEVICE=cpu"):
            check_device("cuda")
