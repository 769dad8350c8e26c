"""Test isolation and the real services the tests run against.

Environment is set at import, before anything imports Prefect (its settings are read
once): every run gets its own DRIFTLOOP_HOME and PREFECT_HOME, analytics and NannyML
telemetry off, and PREFECT_API_URL pointing at one real `prefect server` on a free
loopback port, started on first use by the tests that need it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tests.support.services import free_port

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="driftloop-tests-"))
_SESSION_DIR.chmod(0o755)  # the postgres user must reach its data directory
_PREFECT_PORT = free_port()
os.environ.update(
    {
        "DRIFTLOOP_HOME": str(_SESSION_DIR / "home"),
        "PREFECT_HOME": str(_SESSION_DIR / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{_PREFECT_PORT}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
        "NML_DISABLE_USAGE_LOGGING": "1",
        # Every training in the suite checks ONNX parity on 5,000 rows, not the workers'
        # default 100,000 (tests/flows/test_train_flow.py checks that default through the CLI).
        "DRIFTLOOP_PARITY_MIN_ROWS": "5000",
    }
)
# Several pytest workers on two cores, each training or scoring with two OpenMP threads, run
# more threads than cores. libgomp's default makes a waiting thread spin; oversubscribed,
# the spinning took 10-15x the CPU of the work itself (LightGBM, 50k rows x 200 rounds:
# 20.6 s CPU spinning vs 1.3 s passive). Passive waiting sleeps instead. Read by libgomp
# when LightGBM or XGBoost loads, so it must be set before either is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.pop("DRIFTLOOP_REGISTRY_URL", None)
os.environ.pop("DRIFTLOOP_ARTIFACT_ROOT", None)
(_SESSION_DIR / "prefect").mkdir(parents=True, exist_ok=True)

import pytest

from tests.support.services import PostgresServer, PrefectServer, S3Server


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def prefect_server() -> PrefectServer:
    """A real `prefect server start` on 127.0.0.1 (SQLite), shared by the session."""
    server = PrefectServer(port=_PREFECT_PORT, home=_SESSION_DIR / "prefect")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres() -> PostgresServer:
    """A real PostgreSQL server on loopback in a temp directory, shared by the session."""
    server = PostgresServer(_SESSION_DIR / "postgres")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    """A real S3 endpoint (moto's server mode) on loopback, shared by the session; while
    it runs, the environment points s3fs at it."""
    server = S3Server()
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in server.environment().items():
            mp.setenv(name, value)
        yield server
    server.stop()


@pytest.fixture()
def s3_bucket(s3_server: S3Server) -> str:
    """A new, empty bucket for one test: its ``s3://`` URI."""
    import uuid

    return s3_server.create_bucket(f"driftloop-{uuid.uuid4().hex[:12]}")


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh DRIFTLOOP_HOME for one test."""
    path = tmp_path / "home"
    monkeypatch.setenv("DRIFTLOOP_HOME", str(path))
    return path


# The longest files first: `make test` runs three workers (`-n 3 --dist loadfile`), each taking
# the next file as it frees up, so the long end-to-end files start at once and the short
# unit files fill the gaps at the end. Within a file the order stays as written.
_LONGEST_FIRST = (
    "tests/e2e/test_loop.py",
    "tests/faults/test_object_store.py",
    "tests/e2e/test_server_restart.py",
    "tests/e2e/test_distributed_tuning.py",
    "tests/faults/test_training_killed.py",
    "tests/flows/test_retrain_flow.py",
    "tests/flows/test_backtest_flows.py",
    "tests/flows/test_rollout_flow.py",
    "tests/packaging/test_wheel.py",
    "tests/e2e/test_storm.py",
    "tests/flows/test_train_flow.py",
    "tests/unit/test_cli.py",
    "tests/faults/test_registry_outages.py",
    "tests/flows/test_monitor_flow.py",
    "tests/flows/test_no_secrets.py",
    "tests/flows/test_score_flow.py",
    "tests/flows/test_monitor_labels.py",
    "tests/flows/test_score_engines.py",
    "tests/flows/test_score_partitioned.py",
    "tests/faults/test_edge_failures.py",
    "tests/e2e/test_ui.py",
    "tests/unit/test_tune.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> tuple[int, bool]:
        path = item.nodeid.split("::")[0]
        first = _LONGEST_FIRST.index(path) if path in _LONGEST_FIRST else len(_LONGEST_FIRST)
        return first, "unit/" in path  # then flows and faults before unit tests

    items.sort(key=rank)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadfile`` in collection order (xdist's own reorders files by test count,
    which put the one-test end-to-end files last), handing a worker its next file only when
    it is down to its last test: a worker always holds one test ahead (it must know its next
    test), so with xdist's threshold of two a long file could queue two more behind it."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LongestFirst(LoadFileScheduling):
        def _reschedule(self, node) -> None:
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
                return
            if self._pending_of(self.assigned_work[node]) <= 1:
                self._assign_work_unit(node)

    config.option.loadscopereorder = False
    return LongestFirst(config, log)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    """With DRIFTLOOP_TEST_CPU_LOG=FILE, append each test's CPU seconds (this process, and
    the child processes it reaped: CLI runs, workers, flow runs), wall seconds, node id,
    xdist worker and end time (epoch seconds) to FILE:
    the suite is CPU-bound on two cores, so CPU, not wall time, says what to make cheaper."""
    log = os.environ.get("DRIFTLOOP_TEST_CPU_LOG")
    if not log:
        yield
        return
    import resource
    import time

    def cpu(who: int) -> float:
        usage = resource.getrusage(who)
        return usage.ru_utime + usage.ru_stime

    before = (cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN), time.monotonic())
    yield
    own, children, wall = (cpu(resource.RUSAGE_SELF) - before[0], cpu(resource.RUSAGE_CHILDREN) - before[1],
                           time.monotonic() - before[2])
    # Which xdist worker and when it ended: the suite's timeline, to see idle cores.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"{own:.1f}\t{children:.1f}\t{wall:.1f}\t{item.nodeid}\t{worker}\t{time.time():.1f}\n")
