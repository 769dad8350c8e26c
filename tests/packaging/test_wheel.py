"""The wheel as a user gets it: built from the sdist, installed into fresh virtual
environments (dependencies from requirements/lock.txt, through uv's cache where it has
them) and run from a directory outside the clone, so nothing imports from the repository.

- the full install (the lock, then the wheel with ``--no-deps``): ``driftloop --version``,
  ``driftloop infra apply --dry-run``, and ingest -> train -> score in one process;
- the edge install (the core dependencies only, constrained by the lock): no training or
  monitoring library, and the edge agent's flow scores with the ONNX champion the full
  install registered. Its size on disk is printed (``pytest -s``).

Flows run in-process against the session's Prefect server (PREFECT_API_URL), as on a
device that reports to a central server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.support.data import make_loans, write_spec
from tests.support.services import free_port

pytestmark = [pytest.mark.wheel, pytest.mark.prefect]

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements" / "lock.txt"
SCRIPTS = Path(__file__).with_name("scripts")
UV = Path(sys.executable).with_name("uv")
# Repository folder -> where the wheel installs it (pyproject.toml's package-dir mapping).
MAPPED = {"driftloop": "driftloop", "flows": "driftloop/flows", "tasks": "driftloop/tasks",
          "blocks": "driftloop/blocks", "deployments": "driftloop/deployments", "infra": "driftloop/infra"}
# Data files the code reads at run time (or alembic needs), by repository path pattern.
PACKAGE_DATA = ("deployments/specs/*.yaml", "infra/pools/*.json", "infra/kubernetes/*.yaml", "infra/compose/*.yml",
                "infra/Dockerfile", "driftloop/registry/migrations/script.py.mako")
# What an edge device must not be made to install.
NOT_ON_EDGE = ("xgboost", "lightgbm", "optuna", "nannyml", "sklearn", "pandas")
TRAIN_ROWS, SCORE_ROWS = 3000, 2000


def _project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def _run(cmd: Sequence[str | Path], *, env: dict[str, str] | None = None, cwd: Path | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(c) for c in cmd], check=False, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _uv(*args: str | Path, timeout: float = 300) -> None:
    """A uv command from the package cache alone, else with the index (a cache that lacks
    a package, or its index metadata)."""
    first = subprocess.run([str(UV), *map(str, args), "--offline"], check=False, capture_output=True, text=True, timeout=timeout)
    if first.returncode != 0:
        _run([UV, *args], timeout=timeout)


def _fresh_venv(path: Path) -> Path:
    _run([UV, "venv", "--quiet", "--python", sys.executable, path])
    return path / "bin" / "python"


def _site_packages(python: Path) -> Path:
    found = sorted((python.parent.parent / "lib").glob("python3.*/site-packages"))
    assert len(found) == 1, found
    return found[0]


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


def _outside_env(python: Path, home: Path) -> dict[str, str]:
    """The environment a user's shell would give the installed venv: its bin first, nothing
    pointing into the clone."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=f"{python.parent}{os.pathsep}{env.get('PATH', '')}", DRIFTLOOP_HOME=str(home),
               DRIFTLOOP_PARITY_MIN_ROWS=str(SCORE_ROWS))
    return env


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory outside the clone (nothing on sys.path reaches the repository)."""
    path = tmp_path_factory.mktemp("outside")
    assert not path.resolve().is_relative_to(REPO)
    return path


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built the way a release is: the sdist first, the wheel from the sdist (a
    file the sdist forgets is missing from the wheel too)."""
    out = tmp_path_factory.mktemp("dist")
    _uv("build", "--quiet", "-o", out, REPO)
    wheels = list(out.glob("driftloop-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    make_loans(TRAIN_ROWS, seed=1).write_parquet(root / "train.parquet")
    make_loans(SCORE_ROWS, seed=2).drop("repaid").write_parquet(root / "score.parquet")
    return {"spec": write_spec(root), "train": root / "train.parquet", "score": root / "score.parquet",
            "home": root / "home"}


@pytest.fixture(scope="module")
def full_install(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """Every locked dependency, then the wheel alone: the venv's python."""
    python = _fresh_venv(tmp_path_factory.mktemp("full") / "venv")
    _uv("pip", "sync", "--quiet", "--python", python, LOCK)
    _uv("pip", "install", "--quiet", "--no-deps", "--python", python, wheel)
    return python


@pytest.fixture(scope="module")
def edge_install(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """The wheel with its core dependencies only (no extras), at the lock's versions."""
    python = _fresh_venv(tmp_path_factory.mktemp("edge") / "venv")
    _uv("pip", "install", "--quiet", "--python", python, wheel, "-c", LOCK)
    return python


@pytest.fixture(scope="module")
def lifecycle(prefect_server, full_install: Path, data: dict[str, Path], outside: Path) -> dict:
    """ingest -> train -> score in one process of the full install (flows in-process)."""
    script = shutil.copy(SCRIPTS / "lifecycle.py", outside / "lifecycle.py")
    proc = _run([full_install, script, data["spec"], data["train"], data["score"]],
                env=_outside_env(full_install, data["home"]), cwd=outside, timeout=600)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_wheel_installs_the_driftloop_namespace_only(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n.split("/")[0] for n in names} == {"driftloop", f"driftloop-{_project_version()}.dist-info"}
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    expected = set()
    for path in map(Path, tracked):
        top = path.parts[0]
        if top in MAPPED and (path.suffix == ".py" or any(path.match(p) for p in PACKAGE_DATA)):
            expected.add(f"{MAPPED[top]}/{'/'.join(path.parts[1:])}")
    missing = sorted(expected - names)
    # A module or a subpackage not named in pyproject.toml's packages is missing here.
    assert not missing, f"missing from the wheel: {missing}"
    assert {"driftloop/deployments/specs/car_loan.yaml", "driftloop/infra/pools/edge.json",
            "driftloop/registry/migrations/env.py", "driftloop/registry/migrations/script.py.mako",
            "driftloop/registry/migrations/versions/0001_datasets.py", "driftloop/flows/score_edge.py",
            "driftloop/tasks/score.py", "driftloop/blocks/__init__.py"} <= names


def test_version_from_outside_the_clone(full_install: Path, data: dict[str, Path], outside: Path) -> None:
    proc = _run([full_install.with_name("driftloop"), "--version"], env=_outside_env(full_install, data["home"]),
                cwd=outside)
    assert proc.stdout.strip() == f"driftloop {_project_version()}"


def test_infra_apply_dry_run_reads_the_pools_from_the_package(full_install: Path, data: dict[str, Path],
                                                               outside: Path) -> None:
    env = _outside_env(full_install, data["home"])
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{free_port()}/api"  # nothing listens: a dry run contacts no server
    proc = _run([full_install.with_name("driftloop"), "infra", "apply", "--dry-run", "--json", "--gpus", "2",
                 "--gpu-device", "cpu"], env=env, cwd=outside, timeout=120)
    payload = json.loads(proc.stdout)
    assert payload["dry_run"] is True
    pools = {p["pool"]: p for p in payload["pools"]}
    assert list(pools) == ["cpu", "gpu", "edge"]
    assert pools["gpu"]["concurrency_limit"] == 2
    assert pools["gpu"]["env"]["DRIFTLOOP_DEVICE"] == "cpu"  # --gpu-device overrides the template's cuda
    shipped = json.loads((REPO / "infra" / "pools" / "edge.json").read_text())
    assert pools["edge"]["env"] == shipped["variables"]["properties"]["env"]["default"]


def test_ingest_train_score_from_the_wheel(lifecycle: dict, full_install: Path) -> None:
    site = _site_packages(full_install)
    # Imported from the installed wheel, not the clone; no top-level `tasks` anywhere.
    assert Path(lifecycle["driftloop_file"]).is_relative_to(site)
    assert Path(lifecycle["tasks_file"]) == site / "driftloop" / "tasks" / "score.py"
    assert lifecycle["top_level_tasks"] is False
    assert not (site / "tasks").exists() and not (site / "flows").exists() and not (site / "blocks").exists()
    assert lifecycle["rows_valid"] == TRAIN_ROWS
    assert lifecycle["trained_version"] == 1 and lifecycle["champion_version"] == 1
    scored = lifecycle["scored"]
    assert (scored["rows_in"], scored["rows_scored"], scored["rows_quarantined"]) == (SCORE_ROWS, SCORE_ROWS, 0)
    assert (scored["model"], scored["version"]) == ("loans", 1)
    assert lifecycle["table_rows"] == SCORE_ROWS  # every scored row is in the predictions table


def test_edge_install_scores_with_the_registered_onnx_model(lifecycle: dict, edge_install: Path,
                                                            data: dict[str, Path], outside: Path) -> None:
    site = _site_packages(edge_install)
    for name in ("xgboost", "lightgbm", "optuna", "nannyml", "scikit_learn", "pandas"):
        assert not list(site.glob(f"{name}-*.dist-info")), f"{name} is installed on the edge"
    sizes = sorted(((_size_mb(p), p.name) for p in site.iterdir() if p.is_dir() and not p.name.endswith("-info")),
                   reverse=True)
    total = _size_mb(site)
    print(f"\nedge install (core only): site-packages {total:.0f} MB; largest: "
          + ", ".join(f"{name} {mb:.0f}" for mb, name in sizes[:6]))

    script = shutil.copy(SCRIPTS / "edge.py", outside / "edge.py")
    output = outside / "edge-output"
    proc = _run([edge_install, script, data["score"], output], env=_outside_env(edge_install, data["home"]),
                cwd=outside, timeout=600)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(report["driftloop_file"]).is_relative_to(site)
    assert report["absent"] == {name: True for name in NOT_ON_EDGE}
    result = report["result"]
    assert (result["model"], result["version"]) == ("loans", lifecycle["champion_version"])
    assert (result["rows_in"], result["rows_scored"], result["rows_quarantined"]) == (SCORE_ROWS, SCORE_ROWS, 0)
    assert result["cache_hit"] is False and result["offline"] is False  # fetched from the registry, verified
    assert report["rows_read_back"] == SCORE_ROWS
