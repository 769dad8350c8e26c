"""`kill -9` of a training process between registration and promotion: the process dies
at each step of the hand-over (version registered, reference written, card written), for
real, in a child running `driftloop train`. No alias may then point at a version without
its artifact, card and reference, and a rerun must work."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from driftloop.registry import open_registry
from driftloop.storage import read_bytes
from tests.support.data import make_loans, write_spec

pytestmark = [pytest.mark.prefect, pytest.mark.usefixtures("prefect_server")]

# The child is the real CLI; the only thing added is the fault: it kills itself with
# SIGKILL right after the named step of flows/train.py returns.
_KILLED_TRAINER = """
import os, signal, sys
import driftloop.flows.train as train_flow
step = sys.argv[1]
original = getattr(train_flow, step)
def die_after(*args, **kwargs):
    result = original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(train_flow, step, die_after)
from driftloop.cli import main
sys.exit(main(sys.argv[2:]))
"""

STEPS = ["register_task", "store_reference_task", "model_card_task"]


def _train_args(spec: Path, data: Path) -> list[str]:
    return ["train", "--spec", str(spec), str(data), "--trials", "1", "--algorithms", "lightgbm"]


def _driftloop(*args: str) -> subprocess.CompletedProcess[str]:
    driftloop = Path(sys.executable).with_name("driftloop")
    return subprocess.run([str(driftloop), *args], capture_output=True, text=True, timeout=600, check=False,
                          env=os.environ.copy())


def _assert_aliases_whole(registry, name: str) -> None:
    """Every alias points at a version whose artifact, reference and card exist and match."""
    for alias, version in registry.aliases(name).items():
        record = registry.resolve(f"{name}:{version}")
        assert hashlib.sha256(read_bytes(record.onnx_uri)).hexdigest() == record.onnx_sha256, alias
        assert record.reference_uri and record.reference_sha256, f"{alias} -> v{version} has no reference"
        assert hashlib.sha256(read_bytes(record.reference_uri)).hexdigest() == record.reference_sha256, alias
        assert record.card_uri and read_bytes(record.card_uri), f"{alias} -> v{version} has no model card"


def test_a_training_killed_between_registration_and_promotion_leaves_no_alias_on_a_half_version(
        tmp_path: Path, home: Path) -> None:
    spec = write_spec(tmp_path, {"gate": {"thresholds": {"roc_auc": {"min": 0.6}}}})
    data = tmp_path / "loans.parquet"
    make_loans(3000, seed=5).write_parquet(data)
    registry_url = f"sqlite:///{home / 'registry.db'}"

    for attempt, step in enumerate(STEPS, start=1):
        child = subprocess.run([sys.executable, "-c", _KILLED_TRAINER, step, *_train_args(spec, data)],
                               capture_output=True, text=True, timeout=600, check=False, env=os.environ.copy())
        assert child.returncode == -9, f"{step}: the child was not killed: {child.stderr[-2000:]}"
        registry = open_registry(registry_url)
        versions = registry.list_versions("loans")
        # The version was registered before the kill, and no alias was moved onto it.
        assert sorted(v.version for v in versions) == list(range(1, attempt + 1)), step
        assert registry.aliases("loans") == {}, f"killed after {step}: an alias points at a half-done version"
        _assert_aliases_whole(registry, "loans")

    done = _driftloop(*_train_args(spec, data), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    registry = open_registry(registry_url)
    assert registry.aliases("loans") == {"champion": len(STEPS) + 1}
    _assert_aliases_whole(registry, "loans")

    # With a champion in place, a challenger killed just before promotion leaves the
    # champion where it was, whole.
    child = subprocess.run([sys.executable, "-c", _KILLED_TRAINER, "model_card_task", *_train_args(spec, data)],
                           capture_output=True, text=True, timeout=600, check=False, env=os.environ.copy())
    assert child.returncode == -9, child.stderr[-2000:]
    registry = open_registry(registry_url)
    assert registry.aliases("loans") == {"champion": len(STEPS) + 1}
    assert max(v.version for v in registry.list_versions("loans")) == len(STEPS) + 2
    _assert_aliases_whole(registry, "loans")
